"""Read a GGUF file (llama.cpp's format) as a :class:`~lowrank_jax.models.Llama` and its tokenizer.

Supported ``general.architecture``: ``llama`` (LLaMA, SmolLM, Mistral-style files), ``qwen2``,
``qwen3``, ``gemma2`` and ``gemma3``. Tensors of any type the ``gguf`` package dequantizes
(F32, F16, BF16, Q8_0, Q4_0/1, K-quants, ...) are dequantized to float32 and cast to the
model's ``param_dtype``. The conversions llama.cpp's ``convert_hf_to_gguf.py`` applied are
undone: LLaMA's q/k rows are permuted back from interleaved to half-split rotary pairs, and
Gemma's norm weights, stored as ``1 + w``, get their 1 back. Hyperparameters llama.cpp fixes
instead of storing follow llama.cpp: Gemma 3's local rotary base 10000 and every-sixth-layer
global pattern (unless the file states one), the attention scale ``head_dim ** -0.5`` except
``hidden / heads`` for the 27B models. A GGUF stores no sliding window for Qwen2/Qwen3 (every
released checkpoint has ``use_sliding_window: false``): their layers attend fully. LLaMA
3.1-3.3 files carry their rotary scaling as per-frequency factors (``rope_freqs``), read back
as HF's ``llama3`` rope parameters.

The tokenizer (:func:`gguf_tokenizer`) is rebuilt from ``tokenizer.ggml.*`` for byte-level BPE
vocabularies (``tokenizer.ggml.model == "gpt2"``), with the pre-tokenizer llama.cpp uses for
the file's ``tokenizer.ggml.pre``, and for SentencePiece BPE vocabularies (``"llama"``: LLaMA
1/2, Mistral, Gemma), whose merges follow ``tokenizer.ggml.scores`` with byte fallback and the
``"▁"`` space prefix unless ``tokenizer.ggml.add_space_prefix`` is false
(:mod:`~lowrank_jax.models.gguf_sentencepiece`). Other vocabularies (``"bert"``, the unigram
``"t5"``, ...) are an :class:`UnsupportedCheckpointError` (use the checkpoint's
``tokenizer.json``).

Example:
  >>> from lowrank_jax.models.gguf import gguf_tokenizer, load_gguf
  >>> model = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")      # doctest: +SKIP
  >>> tokenizer = gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from lowrank_jax.models.hf import from_tensors
from lowrank_jax.models.hf_config import UnsupportedCheckpointError, config_from_hf
from lowrank_jax.models.llama import Llama, LlamaConfig

__all__ = ["ARCHITECTURES", "gguf_config", "gguf_tokenizer", "load_gguf", "open_gguf"]

ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
_GEMMA = ("gemma2", "gemma3")
_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp's test for the 27B attention scale


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UnsupportedCheckpointError(
            "reading .gguf files needs the `gguf` package: pip install 'lowrank_jax[finetune]'"
        ) from None
    return gguf


def open_gguf(path: Any) -> Any:
    """A ``gguf.GGUFReader`` of ``path`` (or ``path`` itself when it is one: parsing a large
    vocabulary takes seconds, so the model and the tokenizer can share one reader)."""
    if not isinstance(path, (str, os.PathLike)):
        return path
    if not os.path.isfile(path):
        raise UnsupportedCheckpointError(f"{path}: no such GGUF file")
    return _gguf().GGUFReader(path)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _architecture(reader: Any) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedCheckpointError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}."
        )
    return arch


def gguf_config(path_or_reader: Any, **overrides: Any) -> LlamaConfig:
    """The :class:`LlamaConfig` a GGUF file describes (``overrides``: our own fields).

    Raises:
      UnsupportedCheckpointError: another architecture, per-layer head counts, a partial or
        YaRN rotary scaling, or ``rope_freqs`` that are not LLaMA 3's scaling (LLaMA 3.1-3.3's
        are read as HF's ``llama3`` rope parameters).
    """
    reader = open_gguf(path_or_reader)
    arch = _architecture(reader)

    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    heads, kv_heads = get("attention.head_count"), get("attention.head_count_kv")
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise UnsupportedCheckpointError("per-layer attention head counts are not supported.")
    hidden, layers = int(get("embedding_length")), int(get("block_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if get("attention.value_length", head_dim) != head_dim:
        raise UnsupportedCheckpointError("key_length != value_length is not supported.")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedCheckpointError("a partial rotary dimension is not supported.")
    hf: dict[str, Any] = dict(
        model_type=ARCHITECTURES[arch],
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=int(heads),
        num_key_value_heads=int(kv_heads if kv_heads is not None else heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        rope_theta=float(get("rope.freq_base", 1e6 if arch == "gemma3" else 1e4)),
    )
    scaling = get("rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        if scaling != "none":
            raise UnsupportedCheckpointError(
                f"rope_freqs together with rope scaling {scaling!r} is not supported."
            )
        factors = tensors["rope_freqs.weight"]
        hf["rope_scaling"] = _llama3_scaling(factors, hf["rope_theta"], head_dim)
    elif scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling != "none":
        raise UnsupportedCheckpointError(f"GGUF rope scaling {scaling!r} is not supported.")
    if arch in _GEMMA:
        hf.update(_gemma_settings(arch, get, hidden, int(heads), head_dim, layers))
    return config_from_hf(hf, **overrides)


# LLaMA 3.1-3.3's rotary scaling constants besides the factor: convert_hf_to_gguf.py stores only
# the per-frequency factors they produce (the rope_freqs tensor), not the constants.
_LLAMA3_ROPE = dict(
    low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


def _llama3_scaling(tensor: Any, theta: float, head_dim: int) -> dict:
    """HF's ``llama3`` rope parameters behind a GGUF's ``rope_freqs`` tensor: llama.cpp divides
    each rotary frequency by its factor, as HF's ``llama3`` rescaling does. The factor is the
    largest one; the other constants are LLaMA 3's, checked against every factor.

    Raises:
      UnsupportedCheckpointError: factors that LLaMA 3's scaling does not produce.
    """
    from lowrank_jax.models.config import rope_frequencies

    gguf = _gguf()
    factors = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
    factors = factors.reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise UnsupportedCheckpointError(
            f"rope_freqs has {factors.size} factors; head_dim {head_dim} needs {head_dim // 2}."
        )
    unscaled = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    factor = _llama3_factor(factors, 2 * np.pi / unscaled)
    scaling = {"rope_type": "llama3", "factor": factor, **_LLAMA3_ROPE}
    probe = LlamaConfig(hidden_size=head_dim, num_heads=1, head_dim=head_dim, rope_theta=theta,
                        rope_scaling=tuple(scaling.items()))  # fmt: skip
    expected = unscaled / rope_frequencies(probe).astype(np.float64)
    if not np.allclose(expected, factors, rtol=1e-4):
        raise UnsupportedCheckpointError(
            "rope_freqs are not LLaMA 3's rotary scaling (factor "
            f"{scaling['factor']:g}, low/high frequency factors 1 and 4, original context "
            "8192); load the HF checkpoint instead."
        )
    return scaling


def _llama3_factor(factors: np.ndarray, wavelengths: np.ndarray) -> float:
    """LLaMA 3's ``factor`` from the divisors: that of a wavelength above the original context
    (divided by ``factor`` itself), else solved from one in the smoothed band, where the
    divisor is ``1 / ((1 - s) / factor + s)``; 1 when every wavelength is short. Either way
    the caller checks every divisor against the result."""
    original = _LLAMA3_ROPE["original_max_position_embeddings"]
    low, high = _LLAMA3_ROPE["low_freq_factor"], _LLAMA3_ROPE["high_freq_factor"]
    long = wavelengths > original / low
    if long.any():
        return _significant(factors[long][0])
    smooth = (original / wavelengths - low) / (high - low)
    for f, s in zip(factors, smooth):
        if 0 <= s < 1 and abs(1 / f - s) > 1e-9:
            return _significant((1 - s) / (1 / f - s))
    return 1.0


def _significant(x: float) -> float:
    """``x`` to 6 significant digits: the float32 divisors' round-off off the factor."""
    return float(f"{float(x):.6g}")


def _gemma_settings(arch: str, get: Any, hidden: int, heads: int, head_dim: int, layers: int):
    scalar = hidden // heads if layers == _27B_LAYERS[arch] else head_dim
    settings = dict(
        query_pre_attn_scalar=scalar,
        sliding_window=get("attention.sliding_window"),
        final_logit_softcapping=get("final_logit_softcapping"),
        attn_logit_softcapping=get("attn_logit_softcapping"),
    )
    pattern = get("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if isinstance(pattern, list):
        kinds = ["sliding_attention" if swa else "full_attention" for swa in pattern]
    else:  # llama.cpp: layer i slides when i % pattern < pattern - 1
        kinds = [
            "sliding_attention" if i % pattern < pattern - 1 else "full_attention"
            for i in range(layers)
        ]
    settings["layer_types"] = kinds
    if arch == "gemma3":
        settings["rope_local_base_freq"] = float(get("rope.freq_base_swa", 10000.0))
    return settings


def _tensor_names(config: LlamaConfig, arch: str) -> Iterator[tuple[tuple, int | None, str, bool]]:
    """``(our path, layer, GGUF name, transpose)`` of every parameter."""
    yield ("embed", "embedding"), None, "token_embd.weight", False
    norms = {"input_norm": "attn_norm", "post_attn_norm": "ffn_norm"}
    if arch in _GEMMA:
        norms = {
            "input_norm": "attn_norm",
            "post_attn_norm": "post_attention_norm",
            "pre_mlp_norm": "ffn_norm",
            "post_mlp_norm": "post_ffw_norm",
        }
    projections = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
    }
    mlp = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i in range(config.num_layers):

        def ours(*path: str, i: int = i) -> tuple:
            return ("layers",) + path if config.scan_layers else ("layers", i) + path

        for name, gguf_name in norms.items():
            yield ours(name, "scale"), i, f"blk.{i}.{gguf_name}.weight", False
        for block, table in (("attn", projections), ("mlp", mlp)):
            for name, gguf_name in table.items():
                yield ours(block, name, "kernel"), i, f"blk.{i}.{gguf_name}.weight", True
                bias = (
                    config.mlp_bias
                    if block == "mlp"
                    else (config.o_bias if name == "o_proj" else config.qkv_bias)
                )
                if bias:
                    yield ours(block, name, "bias"), i, f"blk.{i}.{gguf_name}.bias", False
        if config.qk_norm:
            yield ours("attn", "q_norm", "scale"), i, f"blk.{i}.attn_q_norm.weight", False
            yield ours("attn", "k_norm", "scale"), i, f"blk.{i}.attn_k_norm.weight", False
    yield ("final_norm", "scale"), None, "output_norm.weight", False
    if not config.tie_embeddings:
        yield ("lm_head", "kernel"), None, "output.weight", True


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes convert_hf_to_gguf's LLaMA q/k permutation (interleaved -> half-split pairs)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def load_gguf(path: Any, **overrides: Any) -> Llama:
    """Loads a GGUF file of a supported architecture into a :class:`Llama`.

    Args:
      path: the ``.gguf`` file (or a ``gguf.GGUFReader`` of it).
      **overrides: :class:`LlamaConfig` fields of ours (``scan_layers``, ``param_dtype``, ...).

    Returns:
      The model, its parameters the file's dequantized tensors.

    Raises:
      UnsupportedCheckpointError: unsupported architecture or feature, a missing tensor, or a
        tensor the model does not use.
    """
    gguf = _gguf()
    reader = open_gguf(path)
    arch = _architecture(reader)
    config = gguf_config(reader, **overrides)
    tensors = {t.name: t for t in reader.tensors}
    names = list(_tensor_names(config, arch))
    missing = [name for _, _, name, _ in names if name not in tensors]
    if missing:
        raise UnsupportedCheckpointError(f"{reader.data.filename} has no tensor {missing[0]!r}.")
    # rope_freqs: LLaMA 3's rotary factors, read into the config (gguf_config)
    extra = sorted(set(tensors) - {name for _, _, name, _ in names} - {"rope_freqs.weight"})
    if extra:
        raise UnsupportedCheckpointError(
            f"{reader.data.filename} has tensors this {arch} model does not use: {extra[:5]}"
        )
    loaded = []
    for ours, layer, name, transpose in names:
        tensor = tensors[name]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            array = _unpermute(array, config.num_heads if "attn_q" in name else config.num_kv_heads)
        if arch in _GEMMA and name.endswith("norm.weight"):
            array = array - 1.0
        loaded.append((ours, layer, array, transpose, name))
    return from_tensors(config, loaded)


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (digits split one by one, split regex or None for GPT-2's, NFC)
_PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt2", "mpt", "olmo", "jais", "default"), (False, None, False)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), (True, None, False)
    ),
    **dict.fromkeys(
        ("llama3", "llama-bpe", "llama-v3", "dbrx", "smaug-bpe"), (False, _LLAMA3_SPLIT, False)
    ),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen"), (False, _QWEN2_SPLIT, True)),
}


def _pre_tokenizer(tokenizers: Any, pre: str) -> tuple[Any, Any]:
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedCheckpointError(
            f"GGUF pre-tokenizer {pre!r} is not supported ({', '.join(sorted(_PRE_TOKENIZERS))}); "
            "use the checkpoint's tokenizer.json"
        )
    digits, split, nfc = _PRE_TOKENIZERS[pre]
    pre_tokenizers = tokenizers.pre_tokenizers
    if split is not None:
        steps = [
            pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    else:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if digits:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    normalizer = tokenizers.normalizers.NFC() if nfc else None
    return pre_tokenizers.Sequence(steps), normalizer


def _sentencepiece(
    reader: Any, tokenizers: Any, tokens: list, types: list, merges: list, unk: int | None
) -> Any:
    from lowrank_jax.models.gguf_sentencepiece import sentencepiece_bpe

    if unk is None:  # the UNKNOWN-typed token, as llama.cpp
        unk = next((i for i, kind in enumerate(types) if kind == 2), None)
    return sentencepiece_bpe(
        tokenizers,
        tokens,
        _field(reader, "tokenizer.ggml.scores"),
        unk_token=None if unk is None else tokens[unk],
        add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)),
        merges=merges or None,
    )


def gguf_tokenizer(path: Any) -> Any:
    """The tokenizer stored in a GGUF file's metadata (``path``: the file or a
    ``gguf.GGUFReader``), as an :class:`~lowrank_jax.data.hf_tokenizer.HFTokenizer` (chat
    template and special ids too).

    Raises:
      UnsupportedCheckpointError: no tokenizer in the file, a vocabulary other than byte-level
        BPE (``gpt2``) or SentencePiece BPE (``llama``), or an unknown pre-tokenizer.
    """
    from lowrank_jax.data.hf_tokenizer import HFTokenizer, _import_tokenizers, bos_eos_processor

    reader = open_gguf(path)
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        raise UnsupportedCheckpointError(
            f"{reader.data.filename} has no tokenizer (tokenizer.ggml.model)."
        )
    if model not in ("gpt2", "llama"):
        raise UnsupportedCheckpointError(
            f"GGUF tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' and "
            "SentencePiece BPE 'llama' are); use the checkpoint's tokenizer.json"
        )
    tokenizers = _import_tokenizers()
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    ids = {
        name: _field(reader, f"tokenizer.ggml.{key}_token_id")
        for name, key in (
            ("bos_token", "bos"),
            ("eos_token", "eos"),
            ("unk_token", "unknown"),
            ("pad_token", "padding"),
        )
    }
    if model == "llama":
        tok = _sentencepiece(reader, tokenizers, tokens, types, merges, ids["unk_token"])
    else:
        tok = tokenizers.Tokenizer(
            tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges)
        )
        tok.pre_tokenizer, normalizer = _pre_tokenizer(
            tokenizers, _field(reader, "tokenizer.ggml.pre", "default")
        )
        if normalizer is not None:
            tok.normalizer = normalizer
        tok.decoder = tokenizers.decoders.ByteLevel()
    # llama.cpp matches CONTROL (and, for SentencePiece, UNKNOWN) tokens whole as special
    # tokens, USER_DEFINED ones whole as text
    special = (2, 3) if model == "llama" else (3,)
    control = [t for t, kind in zip(tokens, types) if kind in special]
    user = [t for t, kind in zip(tokens, types) if kind == 4]
    tok.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in control]
    )
    tok.add_tokens([tokenizers.AddedToken(t, normalized=False) for t in user])
    specials = {name: tokens[i] for name, i in ids.items() if i is not None}
    tok.post_processor = bos_eos_processor(
        tok,
        specials.get("bos_token"),
        specials.get("eos_token"),
        # llama.cpp adds bos to a SentencePiece vocabulary unless the file says not to
        bool(_field(reader, "tokenizer.ggml.add_bos_token", model == "llama")),
        bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
    )
    stops = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    return HFTokenizer(
        tok,
        special_tokens=specials,
        chat_template=_field(reader, "tokenizer.chat_template"),
        eos_ids=[int(i) for i in stops if i is not None],
    )
