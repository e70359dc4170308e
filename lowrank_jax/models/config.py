"""The architecture config of :class:`~lowrank_jax.models.Llama` and its named sizes.

One dataclass describes LLaMA and the decoder families that differ from it only in switches:
Qwen2/2.5 (q/k/v biases), Qwen3 (q/k RMSNorm), Mistral (sliding-window attention) and Gemma 3
(GeGLU, ``(1 + w)`` norms around both sub-blocks, q/k norm, scaled embeddings, local/global
layers with their own rotary bases, soft-capping). Every switch defaults to LLaMA, so the
LLaMA configs, parameter paths and computation are unchanged by their existence.

Example:
  >>> from lowrank_jax.models import get_config
  >>> get_config("llama_tiny", vocab_size=259).num_params()
  857984
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["CONFIGS", "LAYER_TYPES", "LlamaConfig", "get_config", "rope_frequencies"]

LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a :class:`~lowrank_jax.models.Llama`.

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
      model_type: the HF ``model_type`` this config exports as (``llama``, ``mistral``, ``qwen2``,
        ``qwen3``, ``gemma2``, ``gemma3_text``).
      qkv_bias, o_bias, mlp_bias: biases on the q/k/v, output and MLP projections.
      qk_norm: RMSNorm over ``head_dim`` on queries and keys before the rotation (Qwen3, Gemma 3).
      norm_plus_one: Gemma's RMSNorm ``x̂ · (1 + w)`` in float32 (weights initialised at 0).
      sandwich_norms: Gemma 3's four norms per layer: around attention (``input_norm``,
        ``post_attn_norm`` on its output) and around the MLP (``pre_mlp_norm``, ``post_mlp_norm``).
      activation: MLP gate activation, ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU).
      scale_embeddings: multiply the embeddings by ``sqrt(hidden_size)`` (Gemma).
      query_pre_attn_scalar: attention scores are scaled by ``query_pre_attn_scalar ** -0.5``
        (``None``: ``head_dim ** -0.5``).
      attn_softcap, final_softcap: ``c · tanh(x / c)`` on attention scores / output logits.
      sliding_window: a sliding layer attends to the last ``sliding_window`` positions
        (itself included); ``None``: no sliding layers.
      layer_types: per layer ``"full_attention"`` or ``"sliding_attention"``; ``None`` makes every
        layer sliding when ``sliding_window`` is set (Mistral), else full.
      local_rope_theta: rotary base of the sliding layers (Gemma 3's local layers, unscaled);
        ``None``: they use ``rope_theta`` and ``rope_scaling`` like the full layers.
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
    model_type: str = "llama"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_plus_one: bool = False
    sandwich_norms: bool = False
    activation: str = "silu"
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None

    def __post_init__(self):
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}."
            )
        hd = self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim
        object.__setattr__(self, "num_kv_heads", kv)
        object.__setattr__(self, "head_dim", hd)
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {kv}.")
        if hd % 2:
            raise ValueError(f"head_dim {hd} must be even for rotary embeddings.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}; choose one of {ACTIVATIONS}.")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}.")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers."
                )
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"layer_types {bad} unknown; each is one of {LAYER_TYPES}.")

    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends through the sliding window."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        if self.layer_types is None:
            return (True,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    def num_params(self) -> int:
        """Number of parameters (embedding and head included)."""
        h, hd = self.hidden_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = h * (2 * q + 2 * kv)
        attn += (q + 2 * kv) * self.qkv_bias + h * self.o_bias + 2 * hd * self.qk_norm
        mlp = 3 * h * self.intermediate_size
        mlp += (2 * self.intermediate_size + h) * self.mlp_bias
        layer = attn + mlp + (4 if self.sandwich_norms else 2) * h
        embed = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + h


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


def rope_frequencies(config: LlamaConfig, *, local: bool = False) -> np.ndarray:
    """Inverse rotary frequencies ``θ^(-2i/d)``, rescaled as HF's ``linear``/``llama3`` types.

    Args:
      config: the architecture.
      local: the frequencies of the sliding layers (``local_rope_theta``, unscaled) when the
        config gives them their own base.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    if local and config.local_rope_theta is not None:
        return (1.0 / (config.local_rope_theta**exponents)).astype(np.float32)
    inv_freq = 1.0 / (config.rope_theta**exponents)
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
