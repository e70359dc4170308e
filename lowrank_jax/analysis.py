r"""What a fine-tuning update did to a weight: intruder dimensions and effective rank.

* :func:`intruder_dimensions` (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence"): a top singular vector ``y_j`` of the fine-tuned weight is an *intruder* when it
  is dissimilar to every singular vector ``x_i`` of the pre-trained one,
  ``max_i |cos(y_j, x_i)| < ε``; LoRA tends to create them, full fine-tuning does not.
* :func:`reduce_intruders`: PEFT's mitigation (``peft.tuners.lora.intruders``): shrink the
  intruders' singular values by ``λ`` in ``W + ΔW`` and re-factorise the adapter.
* :func:`effective_rank`: how many directions an update really uses (entropy, stable or energy
  rank).

Weights are in any layout: ``dims`` names the in and out axes (default Flax ``(in, out)``);
other axes are batch axes (one matrix each, decomposed one at a time in float32).

References:
  Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", NeurIPS 2025,
  https://arxiv.org/abs/2410.21228
  Roy & Vetterli, "The effective rank: A measure of effective dimensionality", EUSIPCO 2007.
  Rudelson & Vershynin, "Sampling from large matrices: an approach through geometric
  functional analysis" (stable rank), J. ACM 2007.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.reparam.core import Adapters
from lowrank_jax.reparam.lora import LoRA
from lowrank_jax.targets import MatrixDims, path_str

__all__ = ["Intruders", "effective_rank", "intruder_dimensions", "reduce_intruders"]

_SIDES = ("output", "input")
_RANKS = ("entropy", "stable", "energy")
_FLAX = MatrixDims()  # (in, out)


class Intruders(NamedTuple):
    """Intruder analysis of one weight (leading axes: the weight's batch axes).

    Attributes:
      count: number of intruders among the top ``k`` singular vectors.
      mask: ``(..., k)`` bool, which of the top ``k`` fine-tuned singular vectors intrude.
      similarity: ``(..., k)`` their ``max_i |cos(y_j, x_i)|`` with the pre-trained vectors.
      singular_values: ``(..., k)`` the fine-tuned weight's top ``k`` singular values.
    """

    count: jax.Array
    mask: jax.Array
    similarity: jax.Array
    singular_values: jax.Array


def _torch_layout(w: Any, dims: MatrixDims, name: str) -> jax.Array:
    """``w`` as float32 ``(..., out, in)`` (PyTorch's weight layout)."""
    w = jnp.asarray(w)
    if w.ndim < 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating-point matrix (ndim >= 2), got {w.dtype}{w.shape}."
        )
    d = dims.normalize(w.ndim, name)
    return jnp.moveaxis(w.astype(jnp.float32), (d.out_axis, d.in_axis), (-2, -1))


def _per_matrix(fn: Any, *arrays: jax.Array) -> Any:
    batch = arrays[0].shape[:-2]
    outs = [fn(*(x[i] for x in arrays)) for i in np.ndindex(*batch)] if batch else [fn(*arrays)]
    return jax.tree.map(lambda *xs: jnp.stack(xs).reshape(*batch, *xs[0].shape), *outs)


def _vectors(w: jax.Array, side: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    return (u if side == "output" else vh.T), s, (u, vh)


def intruder_dimensions(
    w_before: Any,
    w_after: Any,
    *,
    top_k: int = 10,
    epsilon: float = 0.5,
    dims: MatrixDims = _FLAX,
    side: str = "output",
) -> Intruders:
    r"""Intruder dimensions of a fine-tuned weight: new top singular vectors unlike all old ones.

    .. math:: \text{intruder}_j \iff \max_i |\langle y_j, x_i\rangle| < ε, \quad j < k

    with ``y_j`` the singular vectors of ``W_after`` in decreasing singular value order and
    ``x_i`` *all* singular vectors of ``W_before`` (unit vectors: the inner product is the
    cosine). ``side="output"`` compares output-space vectors, PEFT's choice (the left singular
    vectors of the PyTorch ``(out, in)`` weight, the right ones of a Flax kernel).

    Args:
      w_before: the pre-trained weight.
      w_after: the fine-tuned weight (same shape).
      top_k: ``k``, how many top singular vectors of ``W_after`` to examine (at most
        ``min(in, out)`` are); PEFT's default 10.
      epsilon: ``ε``; PEFT's default 0.5 (the paper reports a range of thresholds).
      dims: the in and out axes (default Flax ``(in, out)``); other axes are batch axes.
      side: ``"output"`` or ``"input"`` singular vectors.

    Returns:
      :class:`Intruders`.

    Example:
      >>> import jax.numpy as jnp
      >>> from lowrank_jax import analysis
      >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0, 0.0]))[:, :3]     # (in=4, out=3), in e_0..e_2
      >>> spike = 5.0 * jnp.outer(jnp.eye(4)[3], jnp.array([0.0, 0.6, 0.8]))  # input e_3: new
      >>> analysis.intruder_dimensions(w, w + spike, top_k=3, side="input").count
      Array(1, dtype=int32)

    Reference:
      Shuttleworth et al., NeurIPS 2025, https://arxiv.org/abs/2410.21228.
    """
    if side not in _SIDES:
        raise ValueError(f"intruder_dimensions: side must be one of {_SIDES}, got {side!r}.")
    if top_k < 1 or not 0 < epsilon <= 1:
        raise ValueError(
            f"intruder_dimensions: need top_k >= 1 and 0 < epsilon <= 1, got {top_k}, {epsilon}."
        )
    if np.shape(w_before) != np.shape(w_after):
        raise ValueError(
            f"intruder_dimensions: w_before {np.shape(w_before)} and w_after "
            f"{np.shape(w_after)} must have one shape (the same weight before and after)."
        )
    before = _torch_layout(w_before, dims, "w_before")
    after = _torch_layout(w_after, dims, "w_after")

    def one(b: jax.Array, a: jax.Array) -> tuple:
        x, _, _ = _vectors(b, side)
        y, s, _ = _vectors(a, side)
        k = min(top_k, s.shape[0])
        similarity = jnp.max(jnp.abs(y[:, :k].T @ x), axis=1)
        mask = similarity < epsilon
        return jnp.sum(mask, dtype=jnp.int32), mask, similarity, s[:k]

    return Intruders(*_per_matrix(one, before, after))


def effective_rank(
    w: Any, *, method: str = "entropy", energy: float = 0.9, dims: MatrixDims = _FLAX
) -> jax.Array:
    r"""The effective rank of a matrix, e.g. of a fine-tuning update ``ΔW = W_after - W_before``.

    .. math::
        \text{entropy: } \exp\Big(-\sum_i p_i \log p_i\Big),\ p_i = \frac{σ_i}{\sum_j σ_j};\quad
        \text{stable: } \frac{\sum_i σ_i^2}{σ_1^2};\quad
        \text{energy: } \min\Big\{k : \sum_{i \le k} σ_i^2 \ge e \sum_i σ_i^2\Big\}

    Each equals ``r`` for a matrix with ``r`` equal non-zero singular values; a zero matrix
    has rank 0.

    Args:
      w: the matrix (any layout; ``dims`` names its in and out axes, others are batch axes).
      method: ``"entropy"`` (Roy & Vetterli), ``"stable"`` or ``"energy"``.
      energy: ``e`` for ``method="energy"``, in ``(0, 1]``.
      dims: the in and out axes (default Flax ``(in, out)``).

    Returns:
      float32 array with ``w``'s batch shape.

    Example:
      >>> import jax.numpy as jnp
      >>> from lowrank_jax import analysis
      >>> update = jnp.diag(jnp.array([2.0, 2.0, 2.0, 0.0, 0.0]))
      >>> float(analysis.effective_rank(update))
      3.0...
    """
    if method not in _RANKS:
        raise ValueError(f"effective_rank: method must be one of {_RANKS}, got {method!r}.")
    if not 0 < energy <= 1:
        raise ValueError(f"effective_rank: energy must be in (0, 1], got {energy}.")
    m = _torch_layout(w, dims, "w")

    def one(x: jax.Array) -> jax.Array:
        s = jnp.linalg.svd(x, compute_uv=False)
        total = jnp.sum(s)
        if method == "entropy":
            p = s / jnp.where(total > 0, total, 1.0)
            h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
            return jnp.where(total > 0, jnp.exp(h), 0.0)
        sq = s**2
        if method == "stable":
            return jnp.where(total > 0, jnp.sum(sq) / jnp.where(total > 0, sq[0], 1.0), 0.0)
        share = jnp.cumsum(sq) / jnp.where(total > 0, jnp.sum(sq), 1.0)
        k = jnp.sum(share < energy * (1 - 1e-6)) + 1  # round-off in the cumulative sum
        return jnp.where(total > 0, k, 0).astype(jnp.float32)

    return _per_matrix(one, m)


def reduce_intruders(
    params: Any,
    adapters: Adapters,
    *,
    top_k: int = 10,
    epsilon: float = 0.5,
    mitigation_lambda: float = 0.75,
) -> tuple[Adapters, dict[str, jax.Array]]:
    r"""PEFT's intruder-dimension mitigation for LoRA adapters (a new, re-factorised adapter).

    Per matrix, with ``W' = W + s·ΔK`` and its intruders ``I`` (output side, as
    :func:`intruder_dimensions`), ``W'' = W' + (λ - 1) U_I S_I V_I^\top`` shrinks them by
    ``λ``; the new adapter is the rank-``r`` SVD of ``(W'' - W)/s`` with ``√S`` on each factor
    (scale ``s`` kept). Matrices without intruders keep their factors.

    Args:
      params: the base parameters.
      adapters: plain LoRA :class:`~lowrank_jax.reparam.Adapters` on ``params``.
      top_k, epsilon: as :func:`intruder_dimensions` (PEFT's defaults).
      mitigation_lambda: ``λ``; PEFT's default 0.75.

    Returns:
      ``(new_adapters, {path: intruder count per matrix})``.

    Reference:
      PEFT ``reduce_intruder_dimension``; Shuttleworth et al., https://arxiv.org/abs/2410.21228.
    """
    leaves = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    trainable, counts = {}, {}
    for site in adapters.sites:
        m = site.method
        if type(m) is not LoRA or m.init_weights not in ("kaiming", "gaussian"):
            raise ValueError(
                f"reduce_intruders: leaf '{site.path}' is {type(m).__name__} "
                f"(init {getattr(m, 'init_weights', '?')}); it rewrites plain LoRA adapters."
            )
        if site.path not in leaves:
            raise ValueError(f"reduce_intruders: params have no leaf '{site.path}'.")
        frozen, train = adapters.frozen[site.path], adapters.trainable[site.path]
        a, b = m._ab(frozen, train)
        w = jnp.swapaxes(site.canonical(jnp.asarray(leaves[site.path], jnp.float32)), -1, -2)
        delta = m.scale * jnp.swapaxes(a.astype(jnp.float32) @ b.astype(jnp.float32), -1, -2)
        r = m.rank

        def one(w: jax.Array, dw: jax.Array, a: jax.Array, b: jax.Array, r=r, s=m.scale) -> tuple:
            merged = w + dw
            u_base = jnp.linalg.svd(w, full_matrices=False)[0]
            u, sv, vh = jnp.linalg.svd(merged, full_matrices=False)
            k = min(top_k, sv.shape[0])
            similarity = jnp.max(jnp.abs(u[:, :k].T @ u_base), axis=1)
            hit = jnp.zeros(sv.shape, bool).at[:k].set(similarity < epsilon)
            shrink = jnp.where(hit, (mitigation_lambda - 1) * sv, 0.0)
            mitigated = (merged + (u * shrink) @ vh - w) / s
            ud, sd, vd = jnp.linalg.svd(mitigated, full_matrices=False)
            root = jnp.sqrt(sd[:r])
            new_a, new_b = (root[:, None] * vd[:r]).T, (ud[:, :r] * root).T
            keep = ~jnp.any(hit)
            return (
                jnp.where(keep, a, new_a.astype(a.dtype)),
                jnp.where(keep, b, new_b.astype(b.dtype)),
                jnp.sum(hit, dtype=jnp.int32),
            )

        new_a, new_b, count = _per_matrix(jax.jit(one), w, delta, a, b)
        trainable[site.path] = {**train, "A": new_a, "B": new_b}
        counts[site.path] = count
    # the re-factorised A is new: trainable (also for FFA-LoRA adapters, whose A was frozen)
    frozen = {p: {k: v for k, v in f.items() if k != "A"} for p, f in adapters.frozen.items()}
    sites = tuple(
        s._replace(method=dataclasses.replace(s.method, train_a=True)) for s in adapters.sites
    )
    return Adapters(trainable, frozen, sites), counts
