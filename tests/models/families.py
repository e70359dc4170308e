"""Tiny checkpoints of every supported family, written by transformers (the `compare` extra)."""

import numpy as np
import pytest

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
# (transformers config class, model class, config kwargs). Sequences in the tests are longer
# than every sliding window here, so a wrong window cannot hide.
FAMILIES = {
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=6,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=6,
            sliding_window_pattern=2,
            final_logit_softcapping=3.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
}


MODEL_TYPES = {
    "llama_bias": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen2_tied": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}


def tiny_config(name, **overrides):
    """The :class:`LlamaConfig` of family ``name``'s tiny checkpoint (no torch needed)."""
    from lowrank_jax.models.hf_config import config_from_hf

    _, _, extra = FAMILIES[name]
    return config_from_hf({**BASE, **extra, "model_type": MODEL_TYPES[name]}, **overrides)


def randomize(model, seed=0, scale=0.3):
    """Adds noise to every norm scale and bias (the 1-D leaves), in place."""
    import jax
    from flax import nnx

    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [
        x + scale * jax.random.normal(k, x.shape, x.dtype) if x.ndim == 1 else x
        for x, k in zip(leaves, keys)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def require_transformers():
    """``(torch, transformers)``, or a skip naming the `compare` extra."""
    torch = pytest.importorskip("torch", reason="needs torch (the `compare` extra)")
    transformers = pytest.importorskip("transformers", reason="needs transformers (`compare`)")
    return torch, transformers


def tiny_reference(name, seed=0, sharpen=1.0, **overrides):
    """A random transformers model of family ``name`` with random norms and biases (its
    matrices scaled by ``sharpen``: larger logits, less repetitive greedy text)."""
    torch, transformers = require_transformers()
    config_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(seed)
    kwargs = {**BASE, **extra, **overrides}
    config = getattr(transformers, config_cls)(**kwargs, attn_implementation="eager")
    model = getattr(transformers, model_cls)(config).eval()
    gemma = name.startswith("gemma")
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "norm" in param_name:  # Gemma's norms scale by (1 + w)
                p.uniform_(-0.5, 0.5) if gemma else p.uniform_(0.5, 1.5)
            elif param_name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
            else:
                p.mul_(sharpen)
    return model


def reference_logits(model, tokens):
    """transformers' logits of ``tokens`` (numpy in, numpy out)."""
    torch, _ = require_transformers()
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()


def relative_error(got, expected):
    """``max |got - expected| / max |expected|``."""
    return float(np.abs(np.asarray(got) - expected).max() / np.abs(expected).max())
