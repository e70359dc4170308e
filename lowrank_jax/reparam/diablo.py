r"""DiaBlo: train only the diagonal blocks of each weight matrix.

.. math:: W' = W + \mathrm{blockdiag}(D_1, \dots, D_N), \qquad
   D_n \in \mathbb{R}^{(in/N)\times(out/N)}

The ``N`` blocks start at zero (a no-op at init) and hold ``in·out/N`` parameters per matrix.
No matrix product of factors: the forward adds ``x_n @ D_n`` per block (``x`` split into ``N``
chunks along its in axis), so ``ΔW`` is never built.

Reference: "DiaBlo: Diagonal Blocks Are Sufficient For Finetuning", 2025.
https://arxiv.org/abs/2506.03230
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.reparam.method import Method, check_rate, f32, positive_int, register
from lowrank_jax.reparam.wrapper import Reparam

__all__ = ["DiaBlo", "diablo"]


@register
@dataclasses.dataclass(frozen=True)
class DiaBlo(Method):
    """``W' = W + blockdiag(D)`` with ``D: (..., N, in/N, out/N)`` trained."""

    blocks: int = 4
    dropout: float = 0.0

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        *_, n_in, n_out = shape
        if self.blocks < 1 or n_in % self.blocks or n_out % self.blocks:
            raise ValueError(
                f"DiaBlo: blocks={self.blocks} must divide both in={n_in} and out={n_out} of "
                f"leaf '{path}'; pick a common divisor or exclude the leaf with `targets=`."
            )

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        *batch, n_in, n_out = w.shape
        n = self.blocks
        return {}, {"D": jnp.zeros((*batch, n, n_in // n, n_out // n), jnp.float32)}

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        d = f32(trainable["D"])
        *batch, n, p, q = d.shape
        full = jnp.einsum("...npq,nm->...npmq", d, jnp.eye(n, dtype=d.dtype))
        return full.reshape(*batch, n * p, n * q)

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        return c.into(x, w) + c.blocks(x_drop, trainable["D"].astype(x.dtype))


def diablo(
    blocks: int = 4,
    *,
    dropout: float = 0.0,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """DiaBlo: train the ``N`` diagonal blocks of every targeted matrix.

    Args:
      blocks: ``N``; must divide both matrix dims. Trainable parameters ``in·out/N``.
      dropout, targets, dims, dtype: as :func:`~lowrank_jax.reparam.lora`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((16, 8))}
      >>> _, adapters = reparam.diablo(blocks=4).init(jax.random.key(0), params)
      >>> reparam.num_trainable(adapters)  # 16 * 8 / 4
      32

    Reference: https://arxiv.org/abs/2506.03230.
    """
    positive_int("diablo", "blocks", blocks)
    check_rate("diablo", "dropout", dropout)
    return Reparam(DiaBlo(blocks=blocks, dropout=dropout), targets, dims, (), dtype)
