"""Load and save HuggingFace LLaMA checkpoints (``config.json`` + safetensors) as a :class:`Llama`.

The layout is ``LlamaForCausalLM``'s: ``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``model.layers.{i}.mlp.{gate,up,down}_proj
.weight``, ``model.layers.{i}.{input,post_attention}_layernorm.weight``, ``model.norm.weight`` and
``lm_head.weight`` (PyTorch ``(out, in)`` weights; our kernels are their transposes). A single
``model.safetensors`` and sharded ``model.safetensors.index.json`` checkpoints both load; saving
shards when ``max_shard_bytes`` is given.

Everything the config says is honoured -- grouped-query attention (``num_key_value_heads``),
``head_dim``, tied embeddings, ``rope_theta`` and the ``linear``/``llama3`` rope scalings, the
RMSNorm epsilon, the vocabulary size -- and a feature this model does not implement (biases,
another activation, dropout, other rope types, quantisation) raises
:class:`UnsupportedCheckpointError` instead of loading something silently different.

Example:
  >>> from lowrank_jax.models import hf
  >>> model = hf.load_hf("path/to/llama")          # doctest: +SKIP
  >>> hf.save_hf(model, "out/", max_shard_bytes=2**30)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.models.llama import Llama, LlamaConfig

__all__ = [
    "UnsupportedCheckpointError",
    "config_from_hf",
    "config_to_hf",
    "load_hf",
    "save_hf",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_ROPE_TYPES = ("default", "linear", "llama3")
# Keys of rope_parameters each supported type needs (besides rope_type / rope_theta).
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


class UnsupportedCheckpointError(ValueError):
    """The checkpoint uses a feature this LLaMA does not implement, or is malformed."""


def _rope(hf: dict) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    params = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        params.update(hf["rope_scaling"])
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
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


def config_from_hf(hf: dict, **overrides: Any) -> LlamaConfig:
    """A :class:`LlamaConfig` from an HF ``config.json`` dict, rejecting what we cannot honour.

    Args:
      hf: the parsed ``config.json``.
      **overrides: :class:`LlamaConfig` fields that are ours, not the checkpoint's
        (``scan_layers``, ``remat``, ``dtype``, ``param_dtype``, sharding axes).

    Raises:
      UnsupportedCheckpointError: not a LLaMA, or a feature this model does not implement.
    """
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise UnsupportedCheckpointError(
            f"model_type {model_type!r} is not supported; only 'llama' (LlamaForCausalLM)."
        )
    checks = [
        (
            hf.get("hidden_act", "silu") != "silu",
            f"hidden_act {hf.get('hidden_act')!r} (only silu)",
        ),
        (bool(hf.get("attention_bias", False)), "attention_bias=true (biases on q/k/v/o)"),
        (bool(hf.get("mlp_bias", False)), "mlp_bias=true (biases in the MLP)"),
        (float(hf.get("attention_dropout", 0.0) or 0.0) > 0, "attention_dropout > 0"),
        (bool(hf.get("quantization_config")), "quantized weights (quantization_config)"),
    ]
    for failed, what in checks:
        if failed:
            raise UnsupportedCheckpointError(f"unsupported LLaMA feature: {what}.")
    try:
        theta, scaling = _rope(hf)
        kwargs = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_heads=int(hf["num_attention_heads"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except KeyError as err:
        raise UnsupportedCheckpointError(f"config.json lacks the required key {err}.") from None
    kwargs.update(overrides)
    try:
        return LlamaConfig(**kwargs)
    except ValueError as err:
        raise UnsupportedCheckpointError(f"inconsistent config.json: {err}") from None


def config_to_hf(config: LlamaConfig, *, torch_dtype: str | None = None) -> dict:
    """The HF ``config.json`` dict of ``config`` (``LlamaForCausalLM``)."""
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    rope_parameters.update(dict(config.rope_scaling or ()))
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.init_std,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": torch_dtype or config.param_dtype,
    }
    if config.rope_scaling:
        hf["rope_scaling"] = dict(rope_parameters)
    return hf


_LAYER_WEIGHTS = (
    (("attn", "q_proj", "kernel"), "self_attn.q_proj.weight", True),
    (("attn", "k_proj", "kernel"), "self_attn.k_proj.weight", True),
    (("attn", "v_proj", "kernel"), "self_attn.v_proj.weight", True),
    (("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", True),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", True),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", True),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", True),
    (("input_norm", "scale"), "input_layernorm.weight", False),
    (("post_attn_norm", "scale"), "post_attention_layernorm.weight", False),
)


def _name_map(config: LlamaConfig) -> Iterator[tuple[tuple, int | None, str, bool]]:
    """``(our path, layer index or None, HF name, transpose)`` for every weight."""
    yield ("embed", "embedding"), None, "model.embed_tokens.weight", False
    for i in range(config.num_layers):
        for path, name, transpose in _LAYER_WEIGHTS:
            ours = ("layers",) + path if config.scan_layers else ("layers", i) + path
            yield ours, i, f"model.layers.{i}.{name}", transpose
    yield ("final_norm", "scale"), None, "model.norm.weight", False
    if not config.tie_embeddings:
        yield ("lm_head", "kernel"), None, "lm_head.weight", True


def _get(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _open_tensors(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file holding it."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    if not os.path.exists(single):
        raise UnsupportedCheckpointError(
            f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} (PyTorch .bin is not supported)."
        )
    from safetensors import safe_open

    with safe_open(single, framework="flax") as f:
        return {name: single for name in f.keys()}


def load_hf(path: str, **overrides: Any) -> Llama:
    """Loads an HF LLaMA checkpoint directory into a :class:`Llama`.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
      **overrides: :class:`LlamaConfig` fields of ours (``scan_layers``, ``remat``, ``dtype``,
        ``param_dtype``, ...); weights are cast to ``param_dtype`` (default float32).

    Returns:
      The model, its parameters equal to the checkpoint's (transposed to ``(in, out)``).

    Raises:
      UnsupportedCheckpointError: unsupported architecture, missing or mis-shaped tensors.
    """
    from safetensors import safe_open

    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise UnsupportedCheckpointError(f"{path} has no config.json.")
    with open(config_path) as f:
        config = config_from_hf(json.load(f), **overrides)
    files = _open_tensors(path)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    params = nnx.to_pure_dict(abstract)
    names = list(_name_map(config))
    missing = [name for _, _, name, _ in names if name not in files]
    if missing:
        raise UnsupportedCheckpointError(f"the checkpoint has no tensor {missing[0]!r}.")
    loaded: dict[str, Any] = {}
    for file in sorted({files[name] for _, _, name, _ in names}):
        with safe_open(file, framework="flax") as f:
            loaded.update({n: f.get_tensor(n) for _, _, n, _ in names if files[n] == file})
    dtype = jnp.dtype(config.param_dtype)
    stacks: dict[tuple, list] = {}
    for ours, layer, name, transpose in names:
        value = (loaded[name].T if transpose else loaded[name]).astype(dtype)
        if config.scan_layers and layer is not None:
            stacks.setdefault(ours, []).append(value)
        else:
            _check_shape(name, value, _get(params, ours))
            _set(params, ours, value)
    for ours, values in stacks.items():
        value = jnp.stack(values)
        _check_shape(ours, value, _get(params, ours))
        _set(params, ours, value)
    ignorable = ("rotary_emb.inv_freq", "lm_head.weight")
    wanted = {name for _, _, name, _ in names}
    extra = sorted(n for n in files if n not in wanted and not n.endswith(ignorable))
    if extra:
        raise UnsupportedCheckpointError(
            f"the checkpoint has tensors this LLaMA does not use: {extra[:5]}"
            + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        )
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)


def _check_shape(name: Any, value: Any, target: Any) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise UnsupportedCheckpointError(
            f"tensor {name!r} has shape {tuple(value.shape)} but config.json implies "
            f"{tuple(target.shape)}."
        )


def save_hf(model: Llama, path: str, *, max_shard_bytes: int | None = None) -> list[str]:
    """Saves ``model`` as an HF ``LlamaForCausalLM`` checkpoint directory.

    Args:
      model: a :class:`Llama` (scanned or not).
      path: output directory (created).
      max_shard_bytes: split the weights into ``model-0000k-of-0000n.safetensors`` files of at
        most this size (one tensor may exceed it) with a ``model.safetensors.index.json``;
        ``None`` writes one ``model.safetensors``.

    Returns:
      The safetensors files written.
    """
    from safetensors.flax import save_file

    config = model.config
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors: dict[str, jax.Array] = {}
    for ours, layer, name, transpose in _name_map(config):
        value = _get(params, ours)
        if config.scan_layers and layer is not None:
            value = value[layer]
        tensors[name] = jnp.asarray(value.T if transpose else value)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)
    shards = _shard(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1 and max_shard_bytes is None:
        target = os.path.join(path, SINGLE_FILE)
        save_file(shards[0], target, metadata=metadata)
        return [target]
    written, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata=metadata)
        weight_map.update({name: file for name in shard})
        written.append(os.path.join(path, file))
    total = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in tensors.values())
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return written


def _shard(tensors: dict[str, jax.Array], max_bytes: int | None) -> list[dict[str, jax.Array]]:
    if max_bytes is None:
        return [tensors]
    shards: list[dict[str, jax.Array]] = [{}]
    size = 0
    for name, value in tensors.items():
        n_bytes = math.prod(value.shape) * value.dtype.itemsize
        if shards[-1] and size + n_bytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += n_bytes
    return shards
