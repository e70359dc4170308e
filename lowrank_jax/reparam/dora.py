r"""DoRA: weight-decomposed low-rank adaptation (magnitude and direction).

.. math::
    W' = m \odot \frac{W + sAB}{\lVert W + sAB \rVert_c}, \qquad
    \lVert V \rVert_c = \text{the norm of each output column over the in axis}

(PEFT's per-row norm of the ``(out, in)`` weight). ``m`` starts at ``‖W + sAB‖_c`` (``‖W‖_c`` with
``B = 0``), so DoRA is a no-op at init. The norm is treated as a constant in backprop (paper
§4.3) and computed from the factors, never from a materialised ``W + sAB``:

.. math::
    \lVert W + sAB \rVert_c^2 = \lVert W \rVert_c^2 + 2s\,\mathrm{colsum}(B \odot A^\top W)
      + s^2\,\mathrm{colsum}(B \odot (A^\top A) B)

which needs ``O(r(in + out))`` memory beyond ``W`` (the identity proposed in PEFT PR #3387).

Reference: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024.
https://arxiv.org/abs/2402.09353
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.reparam.lora import LoRA, check_lora_args
from lowrank_jax.reparam.method import f32, register
from lowrank_jax.reparam.wrapper import Reparam, overrides_from_patterns

__all__ = ["DoRA", "column_norm", "dora"]


def column_norm(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``‖W + s·A@B‖`` per output column ``(..., out)`` from the factors, in float32."""
    w, a, b = f32(w), f32(a), f32(b)
    w_sq = jnp.sum(w * w, axis=-2)
    cross = jnp.sum(b * (jnp.swapaxes(a, -1, -2) @ w), axis=-2)
    gram = jnp.swapaxes(a, -1, -2) @ a
    ab_sq = jnp.sum(b * (gram @ b), axis=-2)
    return jnp.sqrt(jnp.maximum(w_sq + 2.0 * scale * cross + scale * scale * ab_sq, 0.0))


@register
@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA on top of :class:`~lowrank_jax.reparam.LoRA` (every LoRA field and init applies)."""

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        frozen, trainable = super().init(key, w, path=path, stats=stats)
        a, b = self._ab(frozen, trainable)
        base = self.residual(w, frozen, trainable)
        trainable["magnitude"] = column_norm(base, a, b, self.scale)
        return frozen, trainable

    def _column_scale(self, w: jax.Array, frozen: dict, trainable: dict) -> jax.Array:
        a, b = self._ab(frozen, trainable)
        norm = jax.lax.stop_gradient(column_norm(w, a, b, self.scale))
        return f32(trainable["magnitude"]) / norm

    def affine(self, w, frozen: dict, trainable: dict, scale=None):
        if scale is None:
            scale = self._column_scale(w, frozen, trainable)[..., None, :]
        return scale, scale * self.delta(w, frozen, trainable)

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        a, b = self._ab(frozen, trainable)
        col = self._column_scale(w, frozen, trainable).astype(x.dtype)
        low = self.scale * c.then(c.into(x_drop, a.astype(x.dtype)), b.astype(x.dtype))
        if x_drop is x:  # reuse the base product (PEFT PR #2122)
            return col * (c.into(x, w) + low)
        # PEFT: the magnitude correction of the base term sees the dropped-out input.
        return c.into(x, w) + (col - 1.0) * c.into(x_drop, w) + col * low


def dora(
    rank: int = 8,
    alpha: float | None = None,
    *,
    rslora: bool = False,
    dropout: float = 0.0,
    init: str = "kaiming",
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
    **init_options: Any,
) -> Reparam:
    """DoRA: LoRA's direction update with a trained per-output magnitude ``m``.

    Args: as :func:`~lowrank_jax.reparam.lora` (every LoRA init works, e.g. ``init="pissa"``).

    Returns:
      A :class:`~lowrank_jax.reparam.Reparam`; trainable parameters ``r(in + out) + out``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.sin(jnp.arange(128.0)).reshape(16, 8)}
      >>> base, adapters = reparam.dora(rank=2).init(jax.random.key(1), params)
      >>> reparam.num_trainable(adapters)  # 2 * (16 + 8) + 8
      56

    Reference: Liu et al., ICML 2024, https://arxiv.org/abs/2402.09353.
    """
    check_lora_args("dora", rank, alpha, dropout, rank_pattern)
    method = DoRA(
        rank=rank,
        alpha=float(rank if alpha is None else alpha),
        rslora=rslora,
        dropout=dropout,
        init_weights=init,
        **init_options,
    )
    overrides = overrides_from_patterns(rank=rank_pattern, alpha=alpha_pattern)
    return Reparam(method, targets, dims, overrides, dtype)
