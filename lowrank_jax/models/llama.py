"""A Flax NNX LLaMA: RMSNorm, rotary embeddings, SwiGLU MLP, causal grouped-query attention.

The architecture is HuggingFace's ``LlamaForCausalLM`` (so checkpoints convert one-to-one, see
:mod:`lowrank_jax.models.hf`), with Flax ``(in, out)`` kernels named so that GaLore's default
targeting picks exactly the attention and MLP projections::

    embed/embedding                  (vocab, hidden)
    layers/3/input_norm/scale        (hidden,)
    layers/3/attn/q_proj/kernel      (hidden, heads * head_dim)   k_proj, v_proj, o_proj alike
    layers/3/post_attn_norm/scale    (hidden,)
    layers/3/mlp/gate_proj/kernel    (hidden, intermediate)       up_proj, down_proj alike
    final_norm/scale                 (hidden,)
    lm_head/kernel                   (hidden, vocab)              absent with tied embeddings

With ``scan_layers=True`` the layers are one module whose weights are stacked ``[L, ...]``
(``layers/attn/q_proj/kernel`` is ``[L, hidden, heads * head_dim]``) and run by ``lax.scan``:
one compiled layer, and GaLore treats ``L`` as a batch axis.

Kernels carry ``nnx.with_partitioning`` metadata over two mesh axes, ``fsdp`` (data / fully
sharded) and ``tensor`` (Megatron-style: q/k/v/gate/up split their output, o/down their input).
Under ``jax.set_mesh`` the parameters are created sharded; without a mesh the names are only
metadata (``nnx.get_partition_spec``).

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from lowrank_jax.models import Llama, get_config
  >>> model = Llama(get_config("llama_tiny", vocab_size=259), rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 16), jnp.int32)).shape
  (2, 16, 259)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["CONFIGS", "Llama", "LlamaConfig", "get_config", "rope_frequencies"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a :class:`Llama`.

    Attributes:
      vocab_size: number of token ids.
      hidden_size, intermediate_size: model and MLP widths.
      num_heads: query heads; ``num_kv_heads`` key/value heads (grouped-query attention when
        fewer; ``None`` means ``num_heads``).
      num_layers: decoder layers.
      head_dim: per-head width (``None``: ``hidden_size // num_heads``).
      rope_theta: rotary base. ``rope_scaling`` is ``None`` or a tuple of ``(key, value)`` pairs
        of HF's ``rope_parameters`` for the ``"linear"`` and ``"llama3"`` rope types.
      rms_norm_eps: RMSNorm epsilon.
      tie_embeddings: the output projection is the transposed embedding (no ``lm_head``).
      max_position_embeddings: context length the checkpoint was trained for (HF export).
      init_std: standard deviation of the normal initialisation of kernels and embeddings.
      scan_layers: stack the layers ``[L, ...]`` and run them with ``lax.scan``.
      remat: rematerialise each layer's activations in the backward pass.
      dtype: computation dtype (``"float32"``, ``"bfloat16"``); ``param_dtype``: storage dtype.
      fsdp_axis, tensor_axis: mesh axis names in the sharding metadata (``None``: replicated).
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_heads: int = 8
    num_layers: int = 8
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    init_std: float = 0.02
    scan_layers: bool = False
    remat: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    fsdp_axis: str | None = "fsdp"
    tensor_axis: str | None = "tensor"

    def __post_init__(self):
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        hd = self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim
        object.__setattr__(self, "num_kv_heads", kv)
        object.__setattr__(self, "head_dim", hd)
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}."
            )
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {kv}.")
        if hd % 2:
            raise ValueError(f"head_dim {hd} must be even for rotary embeddings.")

    def num_params(self) -> int:
        """Number of parameters (embedding and head included)."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        layer = attn + mlp + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + self.hidden_size


# hidden / intermediate / heads / layers: GaLore's configs/llama_*.json (reference galore.md
# §4.3). llama_20m is ours (GaLore has none): the 60M shape at half width and half depth.
# llama_tiny (~1M parameters with a byte vocabulary) is for tests and quick demos.
CONFIGS: dict[str, LlamaConfig] = {
    "llama_tiny": LlamaConfig(
        hidden_size=128,
        intermediate_size=344,
        num_heads=4,
        num_layers=4,
        max_position_embeddings=1024,
    ),
    "llama_20m": LlamaConfig(hidden_size=256, intermediate_size=688, num_heads=4, num_layers=4),
    "llama_60m": LlamaConfig(hidden_size=512, intermediate_size=1376, num_heads=8, num_layers=8),
    "llama_130m": LlamaConfig(hidden_size=768, intermediate_size=2048, num_heads=12, num_layers=12),
    "llama_350m": LlamaConfig(
        hidden_size=1024, intermediate_size=2736, num_heads=16, num_layers=24
    ),
    "llama_1b": LlamaConfig(hidden_size=2048, intermediate_size=5461, num_heads=32, num_layers=24),
    "llama_7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_heads=32, num_layers=32),
}


def get_config(name: str, **overrides: Any) -> LlamaConfig:
    """The named config (``llama_tiny``, ``llama_20m``, ... ``llama_7b``) with ``overrides``.

    Args:
      name: a key of :data:`CONFIGS`.
      **overrides: :class:`LlamaConfig` fields, e.g. ``vocab_size=259, scan_layers=True``.

    Raises:
      ValueError: unknown name (the message lists the choices) or unknown field.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown LlamaConfig fields {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(CONFIGS[name], **overrides)


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse rotary frequencies ``θ^(-2i/d)``, rescaled as HF's ``linear``/``llama3`` types."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = dict(config.rope_scaling or ())
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor, low, high = (
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
        )
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (default, linear, llama3).")
    return inv_freq.astype(np.float32)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's ``x * cos + rotate_half(x) * sin`` (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


def _spec(config: LlamaConfig, *axes: str | None) -> tuple[str | None, ...]:
    names = {"fsdp": config.fsdp_axis, "tensor": config.tensor_axis, None: None}
    return tuple(names[a] for a in axes)


def _linear(config: LlamaConfig, n_in: int, n_out: int, spec: tuple, rngs: nnx.Rngs) -> nnx.Linear:
    init = nnx.with_partitioning(nnx.initializers.normal(config.init_std), _spec(config, *spec))
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=False,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=init,
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x²) + ε) · scale``, normalised in float32 as HF's ``LlamaRMSNorm``."""

    def __init__(self, config: LlamaConfig):
        init = nnx.with_partitioning(nnx.initializers.ones, (None,))
        self.eps = config.rms_norm_eps
        self.scale = nnx.Param(init(None, (config.hidden_size,), jnp.dtype(config.param_dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * h.astype(x.dtype)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        h, hd = config.hidden_size, config.head_dim
        self.q_proj = _linear(config, h, config.num_heads * hd, ("fsdp", "tensor"), rngs)
        self.k_proj = _linear(config, h, config.num_kv_heads * hd, ("fsdp", "tensor"), rngs)
        self.v_proj = _linear(config, h, config.num_kv_heads * hd, ("fsdp", "tensor"), rngs)
        self.o_proj = _linear(config, config.num_heads * hd, h, ("tensor", "fsdp"), rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, _ = x.shape
        groups = cfg.num_heads // cfg.num_kv_heads
        q = self.q_proj(x).reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
        k = self.k_proj(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        q = _rotate(q, cos[:, :, None, None], sin[:, :, None, None])
        k = _rotate(k, cos[:, :, None], sin[:, :, None])
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(cfg.head_dim)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
        return self.o_proj(out.reshape(batch, length, cfg.num_heads * cfg.head_dim))


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        h, m = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(config, h, m, ("fsdp", "tensor"), rngs)
        self.up_proj = _linear(config, h, m, ("fsdp", "tensor"), rngs)
        self.down_proj = _linear(config, m, h, ("tensor", "fsdp"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attn_norm(x))


def _mesh_is_set() -> bool:
    return not jax.sharding.get_abstract_mesh().empty


class Llama(nnx.Module):
    """LLaMA decoder-only language model (HF ``LlamaForCausalLM`` architecture).

    Args:
      config: the architecture (:func:`get_config`).
      rngs: ``nnx.Rngs`` for the initialisation (keyword-only).

    Call with ``tokens: int[batch, length]`` (and optional ``positions``); returns logits
    ``[batch, length, vocab]`` in ``config.dtype``.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        with nnx.use_eager_sharding(_mesh_is_set()):
            embed_init = nnx.with_partitioning(
                nnx.initializers.normal(config.init_std), _spec(config, "tensor", "fsdp")
            )
            self.embed = nnx.Embed(
                config.vocab_size,
                config.hidden_size,
                dtype=jnp.dtype(config.dtype),
                param_dtype=jnp.dtype(config.param_dtype),
                embedding_init=embed_init,
                rngs=rngs,
            )
            if config.scan_layers:
                self.layers = _stacked_layers(config, rngs)
            else:
                self.layers = nnx.List(
                    [DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)]
                )
            self.final_norm = RMSNorm(config)
            if not config.tie_embeddings:
                self.lm_head = _linear(
                    config, config.hidden_size, config.vocab_size, ("fsdp", "tensor"), rngs
                )

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        x, context = self.embed_inputs(tokens, positions)
        run_layer = self.run_layer
        if cfg.remat:
            run_layer = nnx.remat(run_layer, static_argnums=(3,))
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(x: jax.Array, layer_state: Any) -> tuple[jax.Array, None]:
                return run_layer(nnx.merge(graphdef, layer_state), x, context, None), None

            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for index, layer in enumerate(self.layers):
                x = run_layer(layer, x, context, index)
        return self.output_logits(x)

    def embed_inputs(
        self, tokens: jax.Array, positions: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The embedded tokens and what every layer needs (the rotary ``cos``, ``sin``)."""
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        angles = positions[..., None].astype(jnp.float32) * rope_frequencies(cfg)
        angles = jnp.concatenate([angles, angles], axis=-1)
        dtype = jnp.dtype(cfg.dtype)
        cos, sin = jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)
        return self.embed(tokens), (cos, sin)

    @staticmethod
    def run_layer(layer: DecoderLayer, x: jax.Array, context: Any, index: Any) -> jax.Array:
        """Decoder layer ``index`` (an int, a traced int or ``None`` inside a scan) on ``x``."""
        del index  # every LLaMA layer is alike
        return layer(x, *context)

    def output_logits(self, x: jax.Array) -> jax.Array:
        """The final norm and the LM head (or the tied embedding)."""
        x = self.final_norm(x)
        if self.config.tie_embeddings:
            return self.embed.attend(x)
        return self.lm_head(x)


def _stacked_layers(config: LlamaConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """One :class:`DecoderLayer` whose parameters are stacked ``[num_layers, ...]``."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make(rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(config, rngs=rngs)

    return make(rngs)
