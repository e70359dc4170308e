"""Q-GaLore's lazy, layer-adaptive projector refresh: a per-matrix gap that doubles when stable.

At every refresh of a matrix the cosine similarity between the first basis vector of the new
and of the previous basis is pushed into a FIFO of ``queue_size`` values; once the FIFO is full
and its mean is at least ``threshold``, the matrix's gap is multiplied by ``growth`` (the FIFO is
not cleared, so it can grow again at the next refresh). A matrix refreshes when
``count % gap == 0``, so after a doubling its next refresh is at the next multiple of the new
gap. Matrices that are not due compute no decomposition at all: each matrix of a leaf (batch
axes included) goes through its own ``lax.cond`` inside a ``lax.map``.

Reference: Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive
Low-Rank Gradients", 2024 (``q_galore_torch/q_galore_projector.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lowrank_jax.projection import Projector

__all__ = ["AdaptiveRefresh", "RefreshState", "svd_count"]

_MAX_GAP = 2**30  # doubling stops here instead of overflowing int32


class AdaptiveRefresh(NamedTuple):
    """Settings of the lazy refresh (Q-GaLore defaults).

    Attributes:
      threshold: mean cosine similarity over the FIFO at or above which the gap grows.
      queue_size: number of successive similarities averaged.
      growth: factor applied to the gap (Q-GaLore: 2).
      sign_invariant: compare ``|cos|``. Q-GaLore compares the signed cosine, so an arbitrary
        SVD sign flip of an unchanged vector reads as -1 and blocks the doubling; ``True``
        fixes that (off by default to reproduce the reference).
    """

    threshold: float = 0.4
    queue_size: int = 5
    growth: int = 2
    sign_invariant: bool = False


class RefreshState(NamedTuple):
    """Per-matrix refresh bookkeeping of one leaf (arrays over the leaf's batch axes).

    Attributes:
      gap: current refresh gap (``int32``).
      similarities: the FIFO of cosine similarities, oldest first (``float32[..., queue]``).
      n_similarities: how many entries of the FIFO are filled (``int32``).
      svd_count: decompositions computed so far (``int32``).
    """

    gap: jax.Array
    similarities: jax.Array
    n_similarities: jax.Array
    svd_count: jax.Array


def check(config: AdaptiveRefresh, method: str) -> AdaptiveRefresh:
    """Validates ``config`` (a clear error for each field)."""
    if not isinstance(config, AdaptiveRefresh):
        raise TypeError(f"{method}: adaptive_refresh must be an AdaptiveRefresh, got {config!r}.")
    if int(config.queue_size) < 1 or int(config.queue_size) != config.queue_size:
        raise ValueError(f"{method}: AdaptiveRefresh.queue_size must be a positive integer.")
    if int(config.growth) < 1 or int(config.growth) != config.growth:
        raise ValueError(f"{method}: AdaptiveRefresh.growth must be an integer >= 1.")
    return config


def init_state(batch: tuple[int, ...], gap: Any, config: AdaptiveRefresh) -> RefreshState:
    return RefreshState(
        gap=jnp.full(batch, gap, jnp.int32),
        similarities=jnp.zeros((*batch, config.queue_size), jnp.float32),
        n_similarities=jnp.zeros(batch, jnp.int32),
        svd_count=jnp.zeros(batch, jnp.int32),
    )


def _first_vector(proj: Projector) -> jax.Array:
    basis = proj.in_basis if proj.in_basis is not None else proj.out_basis
    return basis[:, 0].astype(jnp.float32)


def refresh_leaf(
    batch: tuple[int, ...],
    g: jax.Array,
    old: Projector,
    state: RefreshState,
    count: jax.Array,
    key: Callable[[jax.Array], jax.Array],
    compute: Callable[[jax.Array, Projector, jax.Array], Projector],
    config: AdaptiveRefresh,
) -> tuple[Projector, RefreshState, jax.Array]:
    """Refreshes the due matrices of one leaf; returns ``(projector, state, any_due)``.

    ``compute(g, old, key)`` returns the new projector of one ``(in, out)`` matrix; ``key(m)``
    is the key of the leaf's matrix ``m``.
    """
    size = math.prod(batch)
    flat = lambda x: None if x is None else x.reshape((size, *x.shape[len(batch) :]))
    unflat = lambda x: None if x is None else x.reshape((*batch, *x.shape[1:]))

    def one(args: tuple) -> tuple[Projector, RefreshState, jax.Array]:
        g_m, old_m, state_m, key_m = args
        due = count % state_m.gap == 0

        def refresh() -> tuple[Projector, RefreshState]:
            new = compute(g_m, old_m, key_m)
            a, b = _first_vector(old_m), _first_vector(new)
            cos = jnp.dot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-8)
            cos = jnp.abs(cos) if config.sign_invariant else cos
            # No similarity on the first refresh (no previous basis) or on a non-finite
            # gradient (the previous basis is kept, so it would compare with itself).
            push = (state_m.svd_count > 0) & jnp.all(jnp.isfinite(g_m))
            sims = jnp.where(
                push, jnp.roll(state_m.similarities, -1).at[-1].set(cos), state_m.similarities
            )
            filled = jnp.where(
                push, jnp.minimum(state_m.n_similarities + 1, config.queue_size),
                state_m.n_similarities,
            )
            grow = push & (filled == config.queue_size) & (jnp.mean(sims) >= config.threshold)
            gap = jnp.where(
                grow, jnp.minimum(state_m.gap * config.growth, _MAX_GAP), state_m.gap
            )
            return new, RefreshState(gap, sims, filled, state_m.svd_count + 1)

        new_m, state_m = jax.lax.cond(due, refresh, lambda: (old_m, state_m))
        return new_m, state_m, due

    keys = jax.vmap(key)(jnp.arange(size))
    new, state, due = jax.lax.map(
        one, (flat(g), jax.tree.map(flat, old), jax.tree.map(flat, state), keys)
    )
    return jax.tree.map(unflat, new), jax.tree.map(unflat, state), jnp.any(due)


def svd_count(state: Any) -> int:
    """Total decompositions computed, over every :class:`RefreshState` found in ``state``.

    Example:
      >>> import jax.numpy as jnp, optax, lowrank_jax as lr
      >>> tx = lr.galore(optax.scale_by_adam(), rank=2,
      ...                adaptive_refresh=lr.transforms.AdaptiveRefresh())
      >>> lr.transforms.svd_count(tx.init({"w": jnp.ones((8, 4))}))
      0
    """
    nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, RefreshState))
    return int(sum(int(jnp.sum(n.svd_count)) for n in nodes if isinstance(n, RefreshState)))
