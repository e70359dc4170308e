r"""RandLoRA: a full-rank update from frozen random low-rank bases with trained diagonal scalings.

With ``d = min(in, out)``, ``D = max(in, out)`` and ``N = ⌈d/r⌉`` terms (``N·r ≥ d``: full rank),

.. math::
    \Delta = s\sum_{i=1}^{N} B_i\,\mathrm{diag}(\lambda_{:, i})\,A\,\mathrm{diag}(\gamma_{i})
    \in \mathbb{R}^{D\times d}, \qquad s = \alpha / r

with one frozen ``A ∈ R^{r×d}`` shared by all terms, frozen ``B ∈ R^{D×N×r}`` (``B_i = B[:, i, :]``)
and trained ``λ ∈ R^{r×N}`` (init 0: a no-op) and ``γ ∈ R^{N×d}`` (init ``1/max(N, d)``); the
trainable scalings always sit on the *smaller* dimension. PEFT pairs the terms through its flatten
orders -- ``Δ = s·B̃Ã`` with ``B̃ = B.reshape(D, N·r)`` (column ``b·r+k`` is ``B[:, b, k]``) and
``Ã = (λ[:, :, None]·A[:, None]·γ[None]).reshape(r·N, d)`` (row ``k·N+b``) -- a fixed permutation of
the paper's ``(i, k)`` pairing; this module uses PEFT's orders, so PEFT's tensors give PEFT's
outputs. If ``in ≤ out`` the torch ``ΔW = Δ``, so ``ΔK = Δᵀ``; otherwise ``ΔK = Δ``. The forward
keeps the factors: ``x@W + s·(x F₁)F₂`` with ``F₁: (in, N·r)``, ``F₂: (N·r, out)``.

The bases are Kaiming-uniform as PEFT's (``A ~ U(±1/√d)``, ``B ~ U(±1/√r)``), regenerated from
``seed`` at every forward (8 bytes stored per site; ``store_bases=True`` stores them, like PEFT's
``save_projection``). Every site uses the same seed, so layers of one shape share their bases; PEFT
draws one pair at the largest targeted shape and slices it per layer, which torch's generator
makes impossible to reproduce in JAX -- PEFT's own bases can be given as ``frozen["A"]`` (``r×d``)
and ``frozen["B"]`` (``D×N×r``) instead of the seed (the parity tests do). PEFT's default is
``α = 640``, ``r = 32`` (``s = 20``); the official NLG code uses ``α/r/√N``
(``scale_by_terms=True``). PEFT draws the bases in bfloat16; here in float32. The ``sparse``
ternary bases (a proof of concept in the paper) are not implemented.

Reference: Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large models",
ICLR 2025. https://arxiv.org/abs/2502.00987 (PEFT ``tuners/randlora``; PaulAlbert31/RandLoRA).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.reparam import _validate as check
from lowrank_jax.reparam.method import Method, f32, kaiming_uniform, register
from lowrank_jax.reparam.wrapper import Reparam

__all__ = ["RandLoRA", "randlora"]


@register
@dataclasses.dataclass(frozen=True)
class RandLoRA(Method):
    """``ΔK`` from ``N`` frozen random bases scaled by trained ``λ``, ``γ`` (module docstring)."""

    rank: int = 32
    alpha: float = 640.0
    seed: int = 0
    store_bases: bool = False
    scale_by_terms: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        check.positive_int("RandLoRA", "rank", self.rank)
        check.nonnegative("RandLoRA", "alpha", self.alpha)
        check.rate("RandLoRA", "dropout", self.dropout)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"RandLoRA: seed must be an int >= 0, got {self.seed!r}.")

    def terms(self, n_in: int, n_out: int) -> int:
        """``N = ⌈min(in, out)/r⌉``."""
        return math.ceil(min(n_in, n_out) / self.rank)

    def scale(self, n_in: int, n_out: int) -> float:
        s = self.alpha / self.rank
        return s / math.sqrt(self.terms(n_in, n_out)) if self.scale_by_terms else s

    def bases(self, frozen: dict, n_in: int, n_out: int) -> tuple[jax.Array, jax.Array]:
        """``(A: (r, d), B: (D, N, r))``, stored or regenerated from the seed."""
        if "A" in frozen:
            return f32(frozen["A"]), f32(frozen["B"])
        small, large, terms = min(n_in, n_out), max(n_in, n_out), self.terms(n_in, n_out)
        key_a, key_b = jax.random.split(jax.random.wrap_key_data(frozen["seed"]))
        a = kaiming_uniform(key_a, (self.rank, small), small)
        b = kaiming_uniform(key_b, (large, terms, self.rank), self.rank)
        return a, b

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        *batch, n_in, n_out = w.shape
        small, terms = min(n_in, n_out), self.terms(n_in, n_out)
        trainable = {
            "lambda": jnp.zeros((*batch, self.rank, terms), jnp.float32),
            "gamma": jnp.full((*batch, terms, small), 1.0 / max(terms, small), jnp.float32),
        }
        frozen = {"seed": jax.random.key_data(jax.random.key(self.seed))}
        if self.store_bases:
            a, b = self.bases(frozen, n_in, n_out)
            frozen = {"A": a, "B": b}
        return frozen, trainable

    def factors(self, frozen: dict, trainable: dict, n_in: int, n_out: int) -> tuple:
        """``(F₁: (..., in, N·r), F₂: (..., N·r, out))`` with ``ΔK = s·F₁F₂``."""
        a, b = self.bases(frozen, n_in, n_out)
        lam, gamma = f32(trainable["lambda"]), f32(trainable["gamma"])
        *batch, rank, terms = lam.shape
        scaled = lam[..., :, :, None] * a[:, None, :] * gamma[..., None, :, :]  # (..., r, N, d)
        a_flat = scaled.reshape(*batch, rank * terms, a.shape[-1])  # row k·N + b
        b_flat = b.reshape(b.shape[0], terms * rank)  # column b·r + k
        if n_in <= n_out:  # torch ΔW = B̃Ã (out×in): ΔK = Ãᵀ B̃ᵀ
            return jnp.swapaxes(a_flat, -1, -2), jnp.broadcast_to(
                b_flat.T, (*batch, *b_flat.T.shape)
            )
        return jnp.broadcast_to(b_flat, (*batch, *b_flat.shape)), a_flat

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        n_in, n_out = w.shape[-2:]
        first, second = self.factors(frozen, trainable, n_in, n_out)
        return self.scale(n_in, n_out) * (first @ second)

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        n_in, n_out = w.shape[-2:]
        first, second = self.factors(frozen, trainable, n_in, n_out)
        shape = w.shape[:-2]
        first = jnp.broadcast_to(first, shape + first.shape[-2:]).astype(x.dtype)
        second = jnp.broadcast_to(second, shape + second.shape[-2:]).astype(x.dtype)
        return c.into(x, w) + self.scale(n_in, n_out) * c.then(c.into(x_drop, first), second)


def randlora(
    rank: int = 32,
    alpha: float = 640.0,
    *,
    seed: int = 0,
    store_bases: bool = False,
    scale_by_terms: bool = False,
    dropout: float = 0.0,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """RandLoRA: a full-rank update from seeded random bases; only diagonal scalings train.

    Args:
      rank: ``r`` of each random basis (PEFT's default 32).
      alpha: ``s = α/r`` (PEFT's default 640).
      seed: seed of the shared bases.
      store_bases: store the bases in the adapter instead of the seed.
      scale_by_terms: ``s = α/r/√N`` (the official NLG code) instead of PEFT's ``α/r``.
      dropout, targets, dims, dtype: as :func:`~lowrank_jax.reparam.lora`.

    Returns:
      A :class:`~lowrank_jax.reparam.Reparam`; trainable parameters ``N(r + d)`` per matrix,
      ``d = min(in, out)``, ``N = ⌈d/r⌉``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((16, 8))}
      >>> _, adapters = reparam.randlora(rank=3).init(jax.random.key(0), params)
      >>> reparam.num_trainable(adapters)  # N = ceil(8 / 3) = 3: 3 * (3 + 8)
      33

    Reference: Albert et al., ICLR 2025, https://arxiv.org/abs/2502.00987.
    """
    method = RandLoRA(
        rank=rank,
        alpha=float(alpha),
        seed=seed,
        store_bases=store_bases,
        scale_by_terms=scale_by_terms,
        dropout=dropout,
    )
    return Reparam(method, targets, dims, (), dtype)
