r"""NOLA: LoRA factors as linear combinations of seeded random bases.

.. math:: W' = W + s\,A B, \qquad A = \sum_{i=1}^{k} \alpha_i A_i, \quad
   B = \sum_{j=1}^{l} \beta_j B_j

with ``A_i: (in, r)`` and ``B_j: (r, out)`` frozen random matrices regenerated from a seed
(never stored: the ``frozen`` tree holds 8 bytes of key data per site, derived from ``seed`` and
the leaf path, so each matrix has its own bases; ``shared=True`` uses one set for every matrix of
a given shape, as VeRA does). Only the coefficients train: ``k + l``
parameters per matrix, independent of ``in``, ``out`` and ``r``. ``β`` starts at 0 (a no-op at
init); ``α ~ U(±1/√k)``; the bases are Kaiming-uniform, ``A_i ~ U(±1/√in)`` as LoRA's ``A``
and ``B_j ~ U(±1/√r)`` as VeRA's (our choice: the reference code was not checked).
The bases are materialised for each forward (``k·in·r + l·r·out`` floats, transient).

Reference: Koohpayegani et al., "NOLA: Compressing LoRA using Linear Combination of Random
Basis", ICLR 2024. https://arxiv.org/abs/2310.02556
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.reparam.method import (
    Method,
    check_rate,
    f32,
    kaiming_uniform,
    positive_int,
    register,
    uniform,
)
from lowrank_jax.reparam.wrapper import Reparam

__all__ = ["NOLA", "nola"]


@register
@dataclasses.dataclass(frozen=True)
class NOLA(Method):
    """``W' = W + s·(Σ α_i A_i)(Σ β_j B_j)`` with seeded random bases ``A_i``, ``B_j``."""

    rank: int = 8
    alpha: float = 8.0
    num_a: int = 64
    num_b: int = 64
    seed: int = 0
    shared: bool = False
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        if min(self.rank, self.num_a, self.num_b) < 1:
            raise ValueError(f"NOLA: rank, num_a and num_b must be >= 1 (leaf '{path}').")

    def factors(self, frozen: dict, trainable: dict, n_in: int, n_out: int) -> tuple:
        key_a, key_b = jax.random.split(jax.random.wrap_key_data(frozen["seed"]))
        bases_a = kaiming_uniform(key_a, (self.num_a, n_in, self.rank), n_in)
        bases_b = kaiming_uniform(key_b, (self.num_b, self.rank, n_out), self.rank)
        a = jnp.einsum("...k,kir->...ir", f32(trainable["alpha"]), bases_a)
        b = jnp.einsum("...k,kro->...ro", f32(trainable["beta"]), bases_b)
        return a, b

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        batch = w.shape[:-2]
        # Bases per site (the seed folded with the path: stable under changes of targets), or
        # one set for every matrix of a shape (``shared``, as VeRA).
        site_key = jax.random.key(self.seed)
        if not self.shared:
            site_key = jax.random.fold_in(site_key, zlib.crc32(path.encode()) >> 1)
        bound = 1.0 / np.sqrt(self.num_a)
        trainable = {
            "alpha": uniform(key, (*batch, self.num_a), bound),
            "beta": jnp.zeros((*batch, self.num_b), jnp.float32),
        }
        return {"seed": jax.random.key_data(site_key)}, trainable

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        a, b = self.factors(frozen, trainable, w.shape[-2], w.shape[-1])
        return self.scale * (a @ b)

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        a, b = self.factors(frozen, trainable, w.shape[-2], w.shape[-1])
        low = c.then(c.into(x_drop, a.astype(x.dtype)), b.astype(x.dtype))
        return c.into(x, w) + self.scale * low


def nola(
    rank: int = 8,
    alpha: float | None = None,
    *,
    num_a: int = 64,
    num_b: int = 64,
    seed: int = 0,
    shared: bool = False,
    dropout: float = 0.0,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """NOLA: train ``k + l`` mixing coefficients of seeded random LoRA bases per matrix.

    Args:
      rank: ``r`` of the generated factors.
      alpha: ``s = α/r``; default ``rank`` (``s = 1``).
      num_a, num_b: ``k`` and ``l``, the numbers of random bases for ``A`` and ``B``.
      seed: seed of the bases.
      shared: one set of bases for every matrix of a shape instead of one per matrix.
      dropout, targets, dims, dtype: as :func:`~lowrank_jax.reparam.lora`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((16, 8))}
      >>> _, adapters = reparam.nola(rank=2, num_a=5, num_b=3).init(jax.random.key(0), params)
      >>> reparam.num_trainable(adapters)
      8

    Reference: Koohpayegani et al., ICLR 2024, https://arxiv.org/abs/2310.02556.
    """
    for name, value in (("rank", rank), ("num_a", num_a), ("num_b", num_b)):
        positive_int("nola", name, value)
    check_rate("nola", "dropout", dropout)
    method = NOLA(
        rank=rank,
        alpha=float(rank if alpha is None else alpha),
        num_a=num_a,
        num_b=num_b,
        seed=seed,
        shared=shared,
        dropout=dropout,
    )
    return Reparam(method, targets, dims, (), dtype)
