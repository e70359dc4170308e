r"""MiSS (and Bone): block-shared updates, additive (``balance``, ``mini``) or block-affine.

In the canonical ``(in, out)`` layout (PEFT's ``miss_block`` has this orientation: no transposes):

* ``balance`` (PEFT's default, ``init_weights=True``; = Bone): ``D ∈ R^{r×out}``,
  ``ΔK[j, :] = D[j mod r, :]`` -- ``D`` tiled down the in axis, a ragged tail block using
  ``D[:in mod r]``. The forward folds the input, ``y = xK + (Σ_chunks x_chunk) D``.
* ``mini``: ``D ∈ R^{r×mini_r}`` repeated along the out axis, ``D_full[k, o] = D[k, o mod mini_r]``,
  then as ``balance`` (``out`` divisible by ``mini_r``).
* ``bat`` (Bone's block-affine transform): ``D ∈ R^{(out/r)×r×r}``; for the ``r×r`` block
  ``K_{ji}`` (in-block ``j``, out-block ``i``), ``K'_{ji} = K_{ji} + D_iᵀK_{ji} + D_iᵀ`` (torch:
  ``W'_{ij} = W_{ij} + W_{ij}D_i + D_i``). It depends on ``W``: the forward builds ``W'`` (as PEFT)
  and unmerge inverts ``(I + wD_iᵀ)`` per block in float32 (PEFT's ``torch.inverse``).
  ``in`` and ``out`` must be multiples of ``r``.

``D`` starts at zero (a no-op). Trainable parameters: ``r·out`` (balance), ``r·mini_r`` (mini),
``out·r`` (bat). No scaling (PEFT warns and ignores one). Bone (PEFT 0.14-0.18, removed in #3051,
#3115) is :func:`bone`: the same formulas.

Reference: Kang, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing"
(earlier "Bone: Block-Affine Adaptation of Large Language Models"), 2024.
https://arxiv.org/abs/2409.15371 (PEFT ``tuners/miss``; JL-er/MiSS).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.reparam import _validate as check
from lowrank_jax.reparam.method import Method, f32, register
from lowrank_jax.reparam.wrapper import Reparam

__all__ = ["MiSS", "bone", "miss"]

_MODES = ("balance", "mini", "bat")


@register
@dataclasses.dataclass(frozen=True)
class MiSS(Method):
    """MiSS's ``balance`` / ``mini`` / ``bat`` update of one matrix (see the module docstring)."""

    rank: int = 64
    mode: str = "balance"
    mini_r: int = 1
    dropout: float = 0.0

    def __post_init__(self):
        check.positive_int("MiSS", "rank", self.rank)
        check.positive_int("MiSS", "mini_r", self.mini_r)
        check.choice("MiSS", "mode", self.mode, _MODES)
        check.rate("MiSS", "dropout", self.dropout)

    @property
    def weight_dependent(self) -> bool:  # type: ignore[override]
        return self.mode == "bat"

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        *_, n_in, n_out = shape
        check.fits("MiSS", path, "rank", self.rank, n_in, shape)
        if self.mode == "bat" and (n_in % self.rank or n_out % self.rank):
            raise ValueError(
                f"MiSS bat: rank={self.rank} must divide in={n_in} and out={n_out} of leaf "
                f"'{path}' (r×r blocks); pick a common divisor or use mode='balance'."
            )
        if self.mode == "mini" and n_out % self.mini_r:
            raise ValueError(
                f"MiSS mini: mini_r={self.mini_r} must divide out={n_out} of leaf '{path}'."
            )

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        *batch, _, n_out = w.shape
        r = self.rank
        shape = {
            "balance": (r, n_out),
            "mini": (r, self.mini_r),
            "bat": (n_out // r, r, r),
        }[self.mode]
        return {}, {"D": jnp.zeros((*batch, *shape), jnp.float32)}

    def _rows(self, d: jax.Array, n_out: int) -> jax.Array:
        """The ``(r, out)`` block shared down the in axis (``mini`` repeats along out)."""
        if self.mode == "mini":
            return jnp.tile(d, (1,) * (d.ndim - 1) + (n_out // self.mini_r,))
        return d

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        *batch, n_in, n_out = w.shape
        d = f32(trainable["D"])
        if self.mode == "bat":
            r = self.rank
            k = f32(w).reshape(*batch, n_in // r, r, n_out // r, r)  # [j, c, i, b]
            mixed = jnp.einsum("...ica,...jcib->...jaib", d, k)
            bias = jnp.swapaxes(jnp.swapaxes(d, -1, -2), -3, -2)  # [a, i, b] = D_i[b, a]
            return (mixed + bias[..., None, :, :, :]).reshape(w.shape)
        rows = self._rows(d, n_out)
        tiled = jnp.tile(rows, (1,) * (rows.ndim - 2) + (math.ceil(n_in / self.rank), 1))
        return jnp.broadcast_to(tiled[..., :n_in, :], w.shape)

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        if self.mode == "bat":
            return super().product(x, x_drop, w, frozen, trainable, c)
        n_in, n_out = w.shape[-2:]
        fold = (jnp.arange(n_in)[:, None] % self.rank == jnp.arange(self.rank)).astype(x.dtype)
        fold = jnp.broadcast_to(fold, w.shape[:-2] + fold.shape)  # x ↦ Σ of its r-chunks
        rows = self._rows(trainable["D"], n_out).astype(x.dtype)
        return c.into(x, w) + c.then(c.into(x_drop, fold), rows)

    def invert(self, merged, frozen: dict, trainable: dict, weight: float) -> jax.Array:
        *batch, n_in, n_out = merged.shape
        r = self.rank
        d = f32(trainable["D"])
        dt = jnp.swapaxes(d, -1, -2)  # D_iᵀ
        inverse = jnp.linalg.inv(jnp.eye(r, dtype=jnp.float32) + weight * dt)
        k = f32(merged).reshape(*batch, n_in // r, r, n_out // r, r)  # [j, a, i, b]
        rhs = k - weight * jnp.swapaxes(dt, -3, -2)[..., None, :, :, :]
        base = jnp.einsum("...iac,...jcib->...jaib", inverse, rhs)
        return base.reshape(merged.shape)


def miss(
    rank: int = 64,
    *,
    mode: str = "balance",
    mini_r: int = 1,
    dropout: float = 0.0,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """MiSS: one ``r×out`` block shared down the in axis (``balance``), its ``mini`` variant, or
    Bone's block-affine ``bat``.

    Args:
      rank: ``r`` (PEFT's default 64); ``r <= in``.
      mode: ``"balance"`` (PEFT's default), ``"mini"`` or ``"bat"``.
      mini_r: the out-axis period of ``mini`` (PEFT's default 1).
      dropout, targets, dims, dtype: as :func:`~lowrank_jax.reparam.lora`.

    Returns:
      A :class:`~lowrank_jax.reparam.Reparam`; trainable parameters ``r·out`` (balance),
      ``r·mini_r`` (mini) or ``out·r`` (bat) per matrix.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((16, 8))}
      >>> _, adapters = reparam.miss(rank=4).init(jax.random.key(0), params)
      >>> reparam.num_trainable(adapters)  # 4 * 8
      32

    Reference: Kang, 2024, https://arxiv.org/abs/2409.15371.
    """
    method = MiSS(rank=rank, mode=mode, mini_r=mini_r, dropout=dropout)
    return Reparam(method, targets, dims, (), dtype)


def bone(rank: int = 64, *, bat: bool = False, **kwargs: Any) -> Reparam:
    """Bone: :func:`miss` with ``mode="balance"`` (``bat=True``: the block-affine ``"bat"``).

    Reference: Kang, 2024, https://arxiv.org/abs/2409.15371 (PEFT 0.14-0.18 ``tuners/bone``).
    """
    return miss(rank, mode="bat" if bat else "balance", **kwargs)
