"""The decoder layer of :class:`~lowrank_jax.models.Llama`: norms, attention, gated MLP.

Attention takes a boolean ``mask`` built once per forward by :func:`attention_mask` (causal,
plus segment ids for packed documents, plus the sliding window, plus the KV cache's filled
slots) and, when decoding, the layer's slice of the KV cache. With no segments, window or
cache the mask is the plain lower triangle, so training computes exactly what LLaMA computes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models.config import LlamaConfig

__all__ = ["MLP", "Attention", "DecoderLayer", "Linear", "RMSNorm", "attention_mask"]


def _spec(config: LlamaConfig, *axes: str | None) -> tuple[str | None, ...]:
    names = {"fsdp": config.fsdp_axis, "tensor": config.tensor_axis, None: None}
    return tuple(names[a] for a in axes)


class Linear(nnx.Linear):
    """``nnx.Linear`` applied to the tokens as one ``[tokens, in]`` matrix.

    The leading axes of ``x`` are merged before the product and split after it (both free
    reshapes), so the numbers are the same; but the weight gradient ``xᵀ·dy`` is then a plain
    2-D GEMM, where XLA:CPU first copies ``dy`` transposed for a contraction over two axes
    (batch and length). The llama_60m float32 train step on a CPU takes ~13% less time, with
    fewer compiled temporaries.

    ``input_hook``: ``None`` (the class default, so the check costs nothing at run time and a
    layer's graph is unchanged), or a callable that gets ``inputs`` before the product, at trace
    time. Set per layer and removed again by
    :func:`lowrank_jax.models.recording.record_input_norms` (OwLore's calibration).
    """

    input_hook: Any = None

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if self.input_hook is not None:
            self.input_hook(inputs)
        if inputs.ndim <= 2 or out_sharding is not None:
            return super().__call__(inputs, out_sharding)
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return y.reshape(*inputs.shape[:-1], y.shape[-1])


def _linear(
    config: LlamaConfig, n_in: int, n_out: int, spec: tuple, rngs: nnx.Rngs, bias: bool = False
) -> nnx.Linear:
    init = nnx.with_partitioning(nnx.initializers.normal(config.init_std), _spec(config, *spec))
    bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), _spec(config, spec[1]))
    return Linear(
        n_in,
        n_out,
        use_bias=bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=init,
        bias_init=bias_init,
        rngs=rngs,
    )


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's ``x * cos + rotate_half(x) * sin`` (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def attention_mask(
    q_slots: jax.Array,
    k_slots: jax.Array,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """Which keys each query sees: ``k ≤ q``, same segment, ``q - k < window``.

    Args:
      q_slots, k_slots: ``int[T]`` / ``int[S]`` sequence (or cache) slots of queries and keys.
      q_segments, k_segments: ``int[B, T]`` / ``int[B, S]`` document ids (``None``: one
        document); a query sees only keys of its own id.
      window: sliding-window length (``None``: unlimited).

    Returns:
      ``bool[T, S]``, or ``bool[B, 1, 1, T, S]`` with segments (broadcast over heads).
    """
    mask = k_slots[None, :] <= q_slots[:, None]
    if window is not None:
        mask = mask & (q_slots[:, None] - k_slots[None, :] < window)
    if q_segments is None:
        return mask
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return (mask[None] & same)[:, None, None]


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x²) + ε) · w`` as HF's ``LlamaRMSNorm`` (or ``· (1 + w)`` as Gemma's).

    LLaMA normalises in float32 and scales in the input dtype; Gemma scales in float32 too.
    """

    def __init__(self, config: LlamaConfig, dim: int | None = None):
        self.eps = config.rms_norm_eps
        self.plus_one = config.norm_plus_one
        init = nnx.initializers.zeros_init() if self.plus_one else nnx.initializers.ones
        init = nnx.with_partitioning(init, (None,))
        dim = config.hidden_size if dim is None else dim
        self.scale = nnx.Param(init(None, (dim,), jnp.dtype(config.param_dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (h * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...] * h.astype(x.dtype)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        h, hd = config.hidden_size, config.head_dim
        q, kv, bias = config.num_heads * hd, config.num_kv_heads * hd, config.qkv_bias
        self.q_proj = _linear(config, h, q, ("fsdp", "tensor"), rngs, bias)
        self.k_proj = _linear(config, h, kv, ("fsdp", "tensor"), rngs, bias)
        self.v_proj = _linear(config, h, kv, ("fsdp", "tensor"), rngs, bias)
        self.o_proj = _linear(config, q, h, ("tensor", "fsdp"), rngs, config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config, hd)
            self.k_norm = RMSNorm(config, hd)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attention output; with ``kv = (keys, values, index)`` (the layer's cache
        ``[B, S, kv_heads, head_dim]`` and the first free slot) also the new ``(keys, values)``
        of ``x``'s tokens, which attend to the cache with themselves written at ``index``."""
        cfg = self.config
        batch, length, _ = x.shape
        groups = cfg.num_heads // cfg.num_kv_heads
        q = self.q_proj(x).reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
        k = self.k_proj(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = _rotate(q, cos[:, :, None, None], sin[:, :, None, None])
        k = _rotate(k, cos[:, :, None], sin[:, :, None])
        new = (k, v)
        if kv is not None:
            keys, values, index = kv
            k = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, index, 0, 0))
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
        if cfg.query_pre_attn_scalar is None:
            scores = scores / math.sqrt(cfg.head_dim)
        else:
            scores = scores * cfg.query_pre_attn_scalar**-0.5
        scores = _softcap(scores, cfg.attn_softcap)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
        out = self.o_proj(out.reshape(batch, length, cfg.num_heads * cfg.head_dim))
        return out if kv is None else (out, new)


class MLP(nnx.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``, SwiGLU (silu) or GeGLU (tanh-gelu)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        h, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.activation = config.activation
        self.gate_proj = _linear(config, h, m, ("fsdp", "tensor"), rngs, bias)
        self.up_proj = _linear(config, h, m, ("fsdp", "tensor"), rngs, bias)
        self.down_proj = _linear(config, m, h, ("tensor", "fsdp"), rngs, bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = self.gate_proj(x)
        if self.activation == "silu":
            gate = jax.nn.silu(gate)
        else:
            gate = jax.nn.gelu(gate, approximate=True)
        return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    With ``sandwich_norms`` (Gemma 3) each sub-block's output is normalised too:
    ``x + post_attn_norm(attn(input_norm(x)))``, ``x + post_mlp_norm(mlp(pre_mlp_norm(x)))``.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.sandwich = config.sandwich_norms
        self.input_norm = RMSNorm(config)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(config)
        if self.sandwich:
            self.pre_mlp_norm = RMSNorm(config)
            self.post_mlp_norm = RMSNorm(config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The layer's output (and with ``kv``, as :class:`Attention`, the new keys/values)."""
        h = self.attn(self.input_norm(x), cos, sin, mask, kv)
        if kv is not None:
            h, new = h
        if self.sandwich:
            x = x + self.post_attn_norm(h)
            x = x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
        else:
            x = x + h
            x = x + self.mlp(self.post_attn_norm(x))
        return x if kv is None else (x, new)
