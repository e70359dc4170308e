r"""VeRA: trained scaling vectors around frozen random bases shared by every layer.

.. math:: W' = W + A\,\mathrm{diag}(d)\,B\,\mathrm{diag}(b), \qquad
   A \in \mathbb{R}^{in\times r},\ B \in \mathbb{R}^{r\times out} \text{ frozen random}

Only ``d`` (``r``, starts at ``d_initial = 0.1``) and ``b`` (``out``, starts at 0) train:
``out + r`` parameters per matrix. ``A`` and ``B`` are never stored: they are regenerated from
the seed (the ``frozen`` tree holds 8 bytes of key data per site), the same seed for every site,
so every layer of a given shape sees the same bases -- VeRA's sharing -- and a saved adapter is
only the vectors. As in PEFT, the bases are Kaiming-uniform: ``A ~ U(±1/√in)``,
``B ~ U(±1/√r)``. The price of not storing them: each forward regenerates ``r(in + out)``
random numbers per matrix (transient; about 25 MB of XLA scratch for a 4096×4096 layer at
``r = 256``, against 64 MB for a materialised ``ΔW``).

Reference: Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024.
https://arxiv.org/abs/2310.11454
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.reparam.method import (
    Method,
    check_rate,
    f32,
    kaiming_uniform,
    positive_int,
    register,
)
from lowrank_jax.reparam.wrapper import Reparam

__all__ = ["VeRA", "vera"]


def seed_data(seed: int) -> jax.Array:
    """The ``uint32[2]`` key data stored instead of random bases."""
    return jax.random.key_data(jax.random.key(seed))


@register
@dataclasses.dataclass(frozen=True)
class VeRA(Method):
    """``W' = W + A·diag(d)·B·diag(b)`` with seeded, shared, frozen ``A`` and ``B``."""

    rank: int = 256
    d_initial: float = 0.1
    seed: int = 0
    dropout: float = 0.0

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        if self.rank < 1:
            raise ValueError(f"VeRA: rank must be >= 1 (leaf '{path}').")

    def bases(self, frozen: dict, n_in: int, n_out: int) -> tuple[jax.Array, jax.Array]:
        key_a, key_b = jax.random.split(jax.random.wrap_key_data(frozen["seed"]))
        a = kaiming_uniform(key_a, (n_in, self.rank), n_in)
        b = kaiming_uniform(key_b, (self.rank, n_out), self.rank)
        return a, b

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        *batch, _, n_out = w.shape
        trainable = {
            "d": jnp.full((*batch, self.rank), self.d_initial, jnp.float32),
            "b": jnp.zeros((*batch, n_out), jnp.float32),
        }
        return {"seed": seed_data(self.seed)}, trainable

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        a, b = self.bases(frozen, w.shape[-2], w.shape[-1])
        d = f32(trainable["d"])[..., None, :]
        return (a * d) @ b * f32(trainable["b"])[..., None, :]

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        a, b = self.bases(frozen, w.shape[-2], w.shape[-1])
        a, b = (jnp.broadcast_to(m, w.shape[:-2] + m.shape) for m in (a, b))
        t = c.into(x_drop, a.astype(x.dtype)) * trainable["d"].astype(x.dtype)
        return c.into(x, w) + c.then(t, b.astype(x.dtype)) * trainable["b"].astype(x.dtype)


def vera(
    rank: int = 256,
    *,
    d_initial: float = 0.1,
    seed: int = 0,
    dropout: float = 0.0,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """VeRA: train two vectors per matrix around frozen random bases regenerated from ``seed``.

    Args:
      rank: ``r`` of the shared bases (PEFT's default 256; may exceed the matrix dims).
      d_initial: initial value of ``d``.
      seed: seed of the shared bases.
      dropout, targets, dims, dtype: as :func:`~lowrank_jax.reparam.lora`.

    Returns:
      A :class:`~lowrank_jax.reparam.Reparam`; trainable parameters ``out + r`` per matrix.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((16, 8))}
      >>> _, adapters = reparam.vera(rank=4).init(jax.random.key(0), params)
      >>> reparam.num_trainable(adapters)  # 8 + 4
      12

    Reference: Kopiczko et al., ICLR 2024, https://arxiv.org/abs/2310.11454.
    """
    positive_int("vera", "rank", rank)
    check_rate("vera", "dropout", dropout)
    method = VeRA(rank=rank, d_initial=d_initial, seed=seed, dropout=dropout)
    return Reparam(method, targets, dims, (), dtype)
