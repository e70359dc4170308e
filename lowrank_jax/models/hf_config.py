"""HF ``config.json`` <-> :class:`~lowrank_jax.models.LlamaConfig`, per architecture family.

Supported ``model_type``: ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3_text``
and the text half of ``gemma3`` (its ``text_config``). Keys a ``config.json`` leaves out take the
defaults of transformers' config class for that family (older files omit defaults). A feature
the model does not implement raises :class:`UnsupportedCheckpointError` naming it.

Example:
  >>> from lowrank_jax.models.hf_config import config_from_hf
  >>> cfg = config_from_hf({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
  ...     "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
  >>> cfg.qkv_bias, cfg.o_bias
  (True, False)
"""

from __future__ import annotations

from typing import Any

from lowrank_jax.models.config import LlamaConfig

__all__ = ["SUPPORTED_MODEL_TYPES", "UnsupportedCheckpointError", "config_from_hf", "config_to_hf"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3")
_ROPE_TYPES = ("default", "linear", "llama3")
# Keys of rope_parameters each supported type needs (besides rope_type / rope_theta).
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_LLAMA_LIKE = dict(
    qk_norm=False,
    norm_plus_one=False,
    sandwich_norms=False,
    activation="silu",
    scale_embeddings=False,
    query_pre_attn_scalar=None,
    attn_softcap=None,
    final_softcap=None,
    local_rope_theta=None,
)
# The switches each family fixes (the rest come from config.json).
_FAMILY = {
    "llama": dict(_LLAMA_LIKE, sliding_window=None, layer_types=None),
    "mistral": dict(_LLAMA_LIKE, qkv_bias=False, o_bias=False, mlp_bias=False, layer_types=None),
    "qwen2": dict(_LLAMA_LIKE, qkv_bias=True, o_bias=False, mlp_bias=False),
    "qwen3": dict(_LLAMA_LIKE, qk_norm=True, mlp_bias=False),
    "gemma2": dict(
        qk_norm=False,
        norm_plus_one=True,
        sandwich_norms=True,
        activation="gelu_tanh",
        scale_embeddings=True,
        mlp_bias=False,
        local_rope_theta=None,
    ),
    # transformers' Gemma 3 attention ignores attn_logit_softcapping (Gemma 3 has none).
    "gemma3_text": dict(
        qk_norm=True,
        norm_plus_one=True,
        sandwich_norms=True,
        activation="gelu_tanh",
        scale_embeddings=True,
        mlp_bias=False,
        attn_softcap=None,
    ),
}
_GEMMA = ("gemma2", "gemma3_text")
# transformers' config-class defaults for keys a config.json may omit.
_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, tie_word_embeddings=False),
    "mistral": dict(max_position_embeddings=4096 * 32, sliding_window=4096, num_key_value_heads=8),
    "qwen2": dict(max_position_embeddings=32768, sliding_window=4096, max_window_layers=28),
    "qwen3": dict(
        max_position_embeddings=32768, sliding_window=4096, max_window_layers=28, head_dim=128
    ),
    "gemma2": dict(
        vocab_size=256_000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    "gemma3_text": dict(
        vocab_size=262_208,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131_072,
        tie_word_embeddings=True,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        sliding_window_pattern=6,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
    ),
}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


class UnsupportedCheckpointError(ValueError):
    """The checkpoint uses a feature this model does not implement, or is malformed."""


def _rope(params: dict) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """``(rope_theta, rope_scaling)`` of one set of HF rope parameters."""
    theta = float(params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedCheckpointError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}."
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedCheckpointError("partial_rotary_factor != 1 is not supported.")
    if rope_type == "default":
        return theta, None
    missing = [k for k in _ROPE_KEYS[rope_type] if k not in params]
    if missing:
        raise UnsupportedCheckpointError(f"rope type {rope_type!r} needs {missing} in the config.")
    scaling = (("rope_type", rope_type),) + tuple((k, params[k]) for k in _ROPE_KEYS[rope_type])
    return theta, scaling


def _flat_rope(hf: dict, default_theta: float = 10000.0) -> dict:
    params = {"rope_theta": hf.get("rope_theta", default_theta)}
    params.update(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    return params


def _gemma_rope(hf: dict) -> dict:
    """Gemma 3's global (rope_theta, scaling) and local (unscaled) rotary settings."""
    per_type = hf.get("rope_parameters") or {}
    if "full_attention" in per_type or "sliding_attention" in per_type:
        full = dict(per_type.get("full_attention") or {})
        full.setdefault("rope_theta", hf["rope_theta"])
        local = dict(per_type.get("sliding_attention") or {})
        local.setdefault("rope_theta", hf["rope_local_base_freq"])
    else:
        full = dict(rope_theta=hf["rope_theta"], **(hf.get("rope_scaling") or {}))
        local = {"rope_theta": hf["rope_local_base_freq"]}
    if _rope(local)[1] is not None:
        raise UnsupportedCheckpointError("a scaled rope on Gemma 3's sliding layers.")
    theta, scaling = _rope(full)
    return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=_rope(local)[0])


def _sliding(model_type: str, hf: dict, num_layers: int) -> dict:
    """``sliding_window`` and ``layer_types`` as transformers derives them per family."""
    if model_type == "llama":
        return {}
    if model_type == "mistral":
        return dict(sliding_window=hf.get("sliding_window"))
    if model_type in _GEMMA:
        types = hf.get("layer_types")
        if types is None:
            default = 2 if model_type == "gemma2" else 6
            pattern = int(
                hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern", default)
            )
            types = [
                "sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(num_layers)
            ]
        return dict(sliding_window=hf.get("sliding_window"), layer_types=tuple(types))
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    if window is None:
        return dict(sliding_window=None, layer_types=None)
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf["max_window_layers"] else "full_attention"
        for i in range(num_layers)
    ]
    return dict(sliding_window=window, layer_types=tuple(types))


def _unsupported(model_type: str, hf: dict) -> None:
    gemma = model_type in _GEMMA
    act_key = "hidden_activation" if gemma else "hidden_act"
    act = hf.get(act_key, "gelu_pytorch_tanh" if gemma else "silu")
    wanted = ("gelu_pytorch_tanh",) if gemma else ("silu",)
    checks = [
        (act not in wanted, f"{act_key} {act!r} (only {wanted[0]})"),
        (float(hf.get("attention_dropout", 0.0) or 0.0) > 0, "attention_dropout > 0"),
        (bool(hf.get("quantization_config")), "quantized weights (quantization_config)"),
        (bool(hf.get("use_bidirectional_attention")), "use_bidirectional_attention=true"),
        (model_type != "llama" and bool(hf.get("mlp_bias")), "mlp_bias=true"),
    ]
    for failed, what in checks:
        if failed:
            raise UnsupportedCheckpointError(f"unsupported {model_type} feature: {what}.")


def config_from_hf(hf: dict, **overrides: Any) -> LlamaConfig:
    """A :class:`LlamaConfig` from an HF ``config.json`` dict, rejecting what we cannot honour.

    Args:
      hf: the parsed ``config.json``.
      **overrides: :class:`LlamaConfig` fields that are ours, not the checkpoint's
        (``scan_layers``, ``remat``, ``dtype``, ``param_dtype``, sharding axes).

    Raises:
      UnsupportedCheckpointError: an unsupported family, or a feature this model does not
        implement (the message names it).
    """
    model_type = hf.get("model_type", "llama")
    if model_type == "gemma3":
        hf = dict(hf.get("text_config") or {}, model_type="gemma3_text")
        model_type = "gemma3_text"
    if model_type not in _FAMILY:
        raise UnsupportedCheckpointError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    hf = {**_DEFAULTS[model_type], **hf}
    _unsupported(model_type, hf)
    family = dict(_FAMILY[model_type])
    try:
        if model_type in _GEMMA:
            family.setdefault("attn_softcap", hf.get("attn_logit_softcapping"))
            family.update(
                query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
                final_softcap=hf.get("final_logit_softcapping"),
            )
        if model_type == "gemma3_text":
            rope = _gemma_rope(hf)
        else:
            theta, scaling = _rope(_flat_rope(hf))
            rope = dict(rope_theta=theta, rope_scaling=scaling)
        bias = bool(hf.get("attention_bias", False))
        kwargs = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_heads=int(hf["num_attention_heads"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf["max_position_embeddings"]),
            init_std=float(hf.get("initializer_range", 0.02)),
            model_type=model_type,
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            **rope,
            **_sliding(model_type, hf, int(hf["num_hidden_layers"])),
        )
    except KeyError as err:
        raise UnsupportedCheckpointError(f"config.json lacks the required key {err}.") from None
    kwargs.update(family)
    kwargs.update(overrides)
    try:
        return LlamaConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise UnsupportedCheckpointError(f"inconsistent config.json: {err}") from None


def _check_family(config: LlamaConfig) -> None:
    if config.model_type not in _FAMILY:
        raise ValueError(
            f"model_type {config.model_type!r} cannot be exported; one of {sorted(_FAMILY)}."
        )
    fixed = _FAMILY[config.model_type]
    wrong = {k: getattr(config, k) for k, v in fixed.items() if getattr(config, k) != v}
    if "o_bias" not in fixed and config.qkv_bias != config.o_bias:
        wrong["o_bias"] = config.o_bias  # one attention_bias covers q/k/v and o
    if wrong:
        raise ValueError(
            f"a config with {wrong} cannot be exported as HF model_type {config.model_type!r}; "
            "set model_type to the family these switches describe."
        )


def config_to_hf(config: LlamaConfig, *, torch_dtype: str | None = None) -> dict:
    """The HF ``config.json`` dict of ``config`` (for its ``model_type``).

    Raises:
      ValueError: the config's switches are not expressible as its ``model_type``.
    """
    _check_family(config)
    model_type = config.model_type
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    rope_parameters.update(dict(config.rope_scaling or ()))
    hf = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.init_std,
        "torch_dtype": torch_dtype or config.param_dtype,
    }
    if model_type == "llama":
        hf["mlp_bias"] = config.mlp_bias
    if model_type not in ("mistral", "qwen2"):  # these two have no attention_bias key
        hf["attention_bias"] = config.qkv_bias
    if model_type in _GEMMA:
        hf["hidden_activation"] = "gelu_pytorch_tanh"
        scalar = config.query_pre_attn_scalar
        hf["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
        hf["attn_logit_softcapping"] = config.attn_softcap
        hf["final_logit_softcapping"] = config.final_softcap
    if model_type == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": config.local_rope_theta}
        hf["rope_parameters"] = {"full_attention": rope_parameters, "sliding_attention": local}
        hf["rope_local_base_freq"] = config.local_rope_theta
    if model_type not in _GEMMA:
        hf["hidden_act"] = "silu"
    if model_type != "llama":
        hf["sliding_window"] = config.sliding_window
    sliding = config.sliding_layers()
    if model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = config.sliding_window is not None
        # Older transformers read no layer_types: sliding from the first sliding layer on.
        hf["max_window_layers"] = sliding.index(True) if any(sliding) else config.num_layers
    if model_type in ("qwen2", "qwen3", *_GEMMA):
        hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    if config.rope_scaling and model_type != "gemma3_text":
        hf["rope_scaling"] = dict(rope_parameters)
    return hf
