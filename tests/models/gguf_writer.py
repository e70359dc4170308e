"""A small HF-checkpoint -> GGUF converter for tests, following llama.cpp's
convert_hf_to_gguf.py conventions (tensor names, LLaMA's q/k permutation, Gemma's ``1 + w``
norms, metadata keys), written independently of lowrank_jax's GGUF reader."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GEMMA_NORMS = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


def _permute(weight, heads):
    """llama.cpp's LLaMA q/k permutation: half-split rotary pairs -> interleaved."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _llama3_factors(rope, head_dim):
    """The per-frequency divisors convert_hf_to_gguf.py writes for LLaMA 3.1's rope scaling:
    1 for wavelengths under original / high, ``factor`` over original / low, and between them
    ``1 / ((1 - s) / factor + s)`` with ``s = (original / wavelength - low) / (high - low)``."""
    import math

    theta = float(rope.get("rope_theta", 10000.0))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            out.append(1.0)
        elif wavelength > original / low:
            out.append(factor)
        else:
            s = (original / wavelength - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.asarray(out, np.float32)


def _tensors(checkpoint, hf):
    tensors = {}
    for file in sorted(os.listdir(checkpoint)):
        if file.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(checkpoint, file)))
    return tensors


def convert(checkpoint, out, *, tokenizer_json=None, chat_template=None, quantize=False):
    """Writes ``out`` (a .gguf) from an HF checkpoint directory; Q8_0 for the 2-D weights whose
    rows are a multiple of 32 when ``quantize``."""
    gguf = pytest.importorskip("gguf", reason="needs the gguf package (the `finetune` extra)")
    with open(os.path.join(checkpoint, "config.json")) as f:
        hf = json.load(f)
    arch = ARCH[hf["model_type"]]
    gemma = arch == "gemma3"
    heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_vocab_size(hf["vocab_size"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = hf.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    writer.add_rope_freq_base(float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_factors(rope, head_dim))
    if gemma:
        writer.add_sliding_window(hf["sliding_window"])
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in hf["layer_types"]])
        if hf.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(hf["final_logit_softcapping"])
    tensors = _tensors(checkpoint, hf)
    for name, value in tensors.items():
        value = np.asarray(value, np.float32)
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        elif name == "lm_head.weight":
            if hf.get("tie_word_embeddings"):
                continue
            target = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            if rest == "post_attention_layernorm.weight" and not gemma:
                mapped = "ffn_norm.weight"
            else:
                mapped = GEMMA_NORMS.get(rest) or LAYER_NAMES[rest]
            target = f"blk.{layer}.{mapped}"
            if arch == "llama" and rest.startswith("self_attn.q_proj"):
                value = _permute(value, heads)
            if arch == "llama" and rest.startswith("self_attn.k_proj"):
                value = _permute(value, kv)
        if gemma and target.endswith("norm.weight"):
            value = value + 1.0
        if quantize and value.ndim == 2 and value.shape[1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(target, gguf.quants.quantize(value, q8), raw_dtype=q8)
        else:
            writer.add_tensor(target, value)
    if tokenizer_json is not None:
        _add_tokenizer(writer, tokenizer_json, chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(out)


def _add_tokenizer(writer, tokenizer_json, chat_template):
    with open(tokenizer_json) as f:
        spec = json.load(f)
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    vocab.update({t["content"]: t["id"] for t in spec["added_tokens"]})
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")  # Digits(individual) + ByteLevel, as the tiny tokenizer
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


def write_vocab(
    out,
    tokens,
    *,
    model="llama",
    arch="llama",
    scores=None,
    types=None,
    special_ids=None,
    add_bos=None,
    add_space_prefix=None,
    chat_template=None,
):
    """Writes ``out``, a GGUF holding only a tokenizer (``tokenizer.ggml.*`` as llama.cpp's
    converter writes a SentencePiece vocabulary: tokens, scores, token types) and the few
    hyperparameters transformers reads to build a config; no tensors.

    Args:
      special_ids: ``{"bos": 1, "eos": 2, "unk": 0, "pad": ...}`` (token ids).
      add_bos, add_space_prefix: written only when not ``None``.
    """
    gguf = pytest.importorskip("gguf", reason="needs the gguf package (the `finetune` extra)")
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    if scores is not None:
        writer.add_token_scores([float(s) for s in scores])
    if types is not None:
        writer.add_token_types([int(t) for t in types])
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for name, index in (special_ids or {}).items():
        setters[name](index)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(out)
