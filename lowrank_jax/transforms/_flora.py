"""Flora: Adafactor with momentum (and gradient accumulation) compressed by random projections."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import projection
from lowrank_jax.projection import Projector
from lowrank_jax.sharding import auto_sharded
from lowrank_jax.targets import Targets
from lowrank_jax.transforms._common import new_key, safe_increment, wrap_key
from lowrank_jax.transforms._lowrank import LeafPlan, ProjectedCore, _check_int, matrix_key
from lowrank_jax.transforms._torch_style import ScaleByAdafactorHFState, scale_by_adafactor_hf

__all__ = [
    "FloraAccumulationState",
    "ScaleByFloraState",
    "flora_accumulation",
    "flora_projection",
    "scale_by_flora",
]

# (path, basis shape (..., dim, r), period) -> basis; the period is a traced int32
FloraProjection = Callable[[str, tuple[int, ...], jax.Array], jax.Array]


class ScaleByFloraState(NamedTuple):
    """State of :func:`scale_by_flora`.

    Attributes:
      count: the step (``int32``).
      key: ``uint32[2]`` key data; projection ``k`` of a matrix is drawn from
        ``fold_in(key, k)`` and the matrix's path and index (never stored).
      momentum: per leaf the compressed first moment (``(..., r, out)`` or ``(..., in, r)``,
        the smaller axis compressed) for targeted matrices, a full-size one elsewhere; ``None``
        without ``b1``.
      second: the Adafactor statistics (factored rows/columns for ``ndim >= 2`` leaves).
    """

    count: jax.Array
    key: jax.Array
    momentum: Any
    second: ScaleByAdafactorHFState


class FloraAccumulationState(NamedTuple):
    """State of :func:`flora_accumulation`.

    Attributes:
      mini_step: micro-batches accumulated since the last update (``int32``).
      count: updates applied (``int32``); the projection of the current window is ``count``'s.
      key: ``uint32[2]`` key data of the projections.
      accumulator: per leaf the compressed gradient sum of targeted matrices, full-size
        elsewhere.
      inner_state: the wrapped optimizer's state.
    """

    mini_step: jax.Array
    count: jax.Array
    key: jax.Array
    accumulator: Any
    inner_state: Any


def flora_projection(path: str, shape: tuple[int, ...], key: jax.Array) -> jax.Array:
    r"""Flora's random projection: i.i.d. :math:`\mathcal N(0, 1/r)` entries, so that
    :math:`\mathbb E[A A^\top] = I` and decompression is unbiased."""
    del path
    return jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[-1])


def _planner(method: str, rank: int, targets: Targets, dims: Any) -> ProjectedCore:
    # only its plan(): which leaves are matrices, their canonical shape and compressed side
    return ProjectedCore(
        optax.identity(), method=method, rank=rank, update_proj_gap=1, proj_type="std",
        basis="random", targets=targets, dims=dims, on_refresh="keep", projector_dtype=None,
        seed=0,
    )


def _compressed(plans: list, rank: int) -> list:
    """Plans of the matrices compressed at ``rank`` (``min(in, out) >= rank``, as Flora)."""
    return [p if p is not None and p.rank == rank else None for p in plans]


def _basis(
    plan: LeafPlan, key: jax.Array, period: jax.Array, proj: str | FloraProjection
) -> Projector:
    """The projection of period ``period`` of every matrix of a leaf, as a Projector."""
    *batch, n_in, n_out = plan.shape
    dim = n_in if plan.side == "in" else n_out
    if proj == "random":
        period_key = jax.random.fold_in(key, period)
        draw = lambda m: flora_projection(
            plan.path, (dim, plan.rank), matrix_key(period_key, plan, m)
        )
        basis = jax.vmap(draw)(jnp.arange(math.prod(batch))).reshape(*batch, dim, plan.rank)
    else:
        basis = jnp.asarray(proj(plan.path, (*batch, dim, plan.rank), period), jnp.float32)
        if basis.shape != (*batch, dim, plan.rank):
            raise ValueError(
                f"flora: projection returned shape {basis.shape} for leaf '{plan.path}'; "
                f"expected {(*batch, dim, plan.rank)} (batch axes, compressed dimension, rank)."
            )
    return Projector(basis, None) if plan.side == "in" else Projector(None, basis)


def _rms(x: jax.Array, plan: LeafPlan | None) -> jax.Array:
    """Root mean square per matrix (targeted leaves, canonical layout) or per leaf."""
    x = x.astype(jnp.float32)
    if plan is None:
        return jnp.sqrt(jnp.mean(jnp.square(x)))
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=(-2, -1), keepdims=True))


def scale_by_flora(
    rank: int,
    *,
    b1: float | None = 0.9,
    kappa: int = 1000,
    decay_rate: float = -0.8,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    scale_parameter: bool = True,
    weight_decay: float = 0.0,
    targets: Targets = None,
    dims: Any = None,
    projection_fn: str | FloraProjection = "random",
    momentum_dtype: Any = jnp.float32,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Adafactor whose momentum is stored compressed by a regenerated random projection (Flora).

    Per matrix, with :math:`\hat G` the Adafactor-normalised gradient
    (:math:`\hat\beta_{2t} = 1 - t^{c}`, factored second moment), a Gaussian
    :math:`A_k \in \mathbb R^{d \times r}` with :math:`\mathcal N(0, 1/r)` entries on the smaller
    axis (``down(X) = A^\top X``, ``up(C) = A C``) and :math:`k` the projection's period:

    .. math::
        U_t &= (1-\beta_1)\hat G_t + \beta_1\,\mathrm{up}_{k}(m_{t-1}) \\
        m_{t-1} &\leftarrow \mathrm{down}_{k+1}(\mathrm{up}_{k}(m_{t-1})),\ k \leftarrow k+1
        \quad \text{if } t \equiv 0 \bmod \kappa \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,\mathrm{down}_{k}(\hat G_t) \\
        \Delta_t &= s_t\bigl(U_t / \max(1, \mathrm{RMS}(U_t)/d) + \lambda W\bigr),\quad
        s_t = \max(\epsilon_2, \mathrm{RMS}(W))

    (the positive direction; multiply by :math:`-\eta`). The momentum of an ``m x n`` matrix
    costs :math:`r \max(m, n)` instead of :math:`mn`, and :math:`A_k` is regenerated from the
    key, never stored. This is ``flora-opt``'s torch ``Flora`` step, including its transport
    of the momentum into the new projection every :math:`\kappa` steps (its optax port instead
    re-projects with the old key, which scrambles the momentum). Leaves that are not targeted,
    or whose smaller side is below ``rank``, keep a full-size momentum, as the reference does.

    Works layer-wise (per-matrix state and keys).

    Args:
      rank: ``r`` (``τ`` in the paper; a Python int).
      b1: momentum rate; ``None`` for none (then this is Adafactor with ``scale_parameter``).
      kappa: ``κ``, steps between new projections.
      decay_rate, eps, clip_threshold: Adafactor constants (``eps[1]`` floors the parameter
        scale).
      scale_parameter: multiply by :math:`\max(\epsilon_2, \mathrm{RMS}(W))` (needs params).
      weight_decay: ``λ``, added as :math:`s_t \lambda W` (so the decay is ``lr_t·λ``).
      targets, dims: which matrices compress their momentum (:mod:`lowrank_jax.targets`).
      projection_fn: ``"random"`` or a callable ``(path, shape, period) -> A`` returning the
        ``(..., dim, r)`` projection of a leaf for a (traced) period; injects given matrices.
      momentum_dtype: dtype of the momentum (reference: float32).
      seed: seed of the projections.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`ScaleByFloraState`.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> tx = lr.transforms.scale_by_flora(4)
      >>> tx.init({"w": jnp.ones((32, 16))}).momentum["w"].shape  # (in, out): out compressed
      (32, 4)

    References:
      Hao, Cao, Mou, "Flora: Low-Rank Adapters Are Secretly Gradient Compressors", ICML 2024,
      Algorithm 2. https://arxiv.org/abs/2402.03293
    """
    rank = _check_int("rank", rank, "scale_by_flora", " Use static_args=('rank',).")
    kappa = _check_int("kappa", kappa, "scale_by_flora")
    if b1 is not None and not 0 <= b1 < 1:
        raise ValueError(f"scale_by_flora: b1 must be in [0, 1) or None, got {b1!r}.")
    if not callable(projection_fn) and projection_fn != "random":
        raise ValueError(
            f"scale_by_flora: projection_fn must be 'random' or a callable (path, shape, period) "
            f"-> A, got {projection_fn!r}."
        )
    planner = _planner("scale_by_flora", rank, targets, dims)
    adafactor = scale_by_adafactor_hf(
        1.0, eps=eps, clip_threshold=float("inf"), decay_rate=decay_rate
    )

    def init_fn(params: Any) -> ScaleByFloraState:
        treedef, leaves, plans = planner.plan(params)
        momentum = None
        if b1 is not None:
            momentum = treedef.unflatten([
                jnp.zeros(p.lowrank_shape if p else x.shape, momentum_dtype)
                for p, x in zip(_compressed(plans, rank), leaves)
            ])
        return ScaleByFloraState(
            jnp.zeros([], jnp.int32), new_key(seed), momentum, adafactor.init(params)
        )

    def update_fn(
        updates: Any, state: ScaleByFloraState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, ScaleByFloraState]:
        del extra_args
        if params is None and (scale_parameter or weight_decay):
            raise ValueError(
                "scale_by_flora needs the parameters (scale_parameter / weight_decay): call "
                "update(updates, state, params)."
            )
        treedef, leaves, plans = planner.plan(updates)
        plans = _compressed(plans, rank)
        normed, second = adafactor.update(updates, state.second)
        key = wrap_key(state.key)
        old_period = state.count // kappa
        new_period = (state.count + 1) // kappa
        moments = [None] * len(leaves) if b1 is None else treedef.flatten_up_to(state.momentum)
        param_leaves = None if params is None else treedef.flatten_up_to(params)
        out, new_moments = [], []
        for i, (p, g, m) in enumerate(zip(plans, treedef.flatten_up_to(normed), moments)):
            g = g.astype(jnp.float32)
            if p is not None:
                g = p.dims.to_canonical(g)
            if b1 is None:
                u = g
            elif p is None:  # full-size momentum
                u = (1 - b1) * g + b1 * m.astype(jnp.float32)
                m = u.astype(momentum_dtype)
            else:
                current = _basis(p, key, new_period, projection_fn)
                old = jax.lax.cond(
                    new_period != old_period,
                    lambda p=p: _basis(p, key, old_period, projection_fn),
                    lambda current=current: current,
                )
                m32 = m.astype(jnp.float32)
                decompressed = projection.project_back(m32, old)
                u = (1 - b1) * g + b1 * decompressed
                # every κ steps: carry the momentum into the next projection (torch's transport)
                m32 = jnp.where(
                    new_period != old_period, projection.project(decompressed, current), m32
                )
                m = (b1 * m32 + (1 - b1) * projection.project(g, current)).astype(momentum_dtype)
            u = u / jnp.maximum(_rms(u, p) / clip_threshold, 1.0)
            if scale_parameter or weight_decay:
                w = param_leaves[i].astype(jnp.float32)
                w = p.dims.to_canonical(w) if p is not None else w
                s = jnp.maximum(eps[1], _rms(w, p)) if scale_parameter else 1.0
                u = s * (u + weight_decay * w) if weight_decay else s * u
            if p is not None:
                u = p.dims.from_canonical(u)
            out.append(u.astype(leaves[i].dtype))
            new_moments.append(m)
        momentum = None if b1 is None else treedef.unflatten(new_moments)
        return treedef.unflatten(out), ScaleByFloraState(
            safe_increment(state.count), state.key, momentum, second
        )

    return auto_sharded(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def flora_accumulation(
    inner: optax.GradientTransformation,
    *,
    every_k: int,
    rank: int,
    mean: bool = True,
    targets: Targets = None,
    dims: Any = None,
    projection_fn: str | FloraProjection = "random",
    accumulator_dtype: Any = jnp.float32,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient accumulation over ``every_k`` micro-batches in a compressed buffer (Flora).

    Within a window (one optimizer step) every targeted matrix accumulates its gradient
    compressed by one random projection :math:`A` (``(dim, r)``, :math:`\mathcal N(0, 1/r)`,
    the smaller axis compressed, a new :math:`A` every window):

    .. math::
        C \leftarrow C + A^\top G_i \quad (i = 1..k), \qquad
        \tilde G = \tfrac{1}{k} A C \ (\text{``mean``}),\quad
        \mathbb E[\tilde G] = \tfrac1k \textstyle\sum_i G_i

    and ``inner`` is applied to :math:`\tilde G` at the ``k``-th micro-batch (zeros are returned
    before, like ``optax.MultiSteps``). The buffer of an ``m x n`` matrix is
    :math:`r \max(m, n)`. Untargeted leaves accumulate at full size. ``flora-opt``'s
    ``FloraAccelerator`` sums instead of averaging (``mean=False``; Adafactor is
    scale-invariant up to its ``eps``).

    Not for the layer-wise step (which applies each micro-batch's gradient at once).

    Args:
      inner: the optimizer (e.g. :func:`lowrank_jax.flora_adafactor`).
      every_k: micro-batches per update (a Python int).
      rank: ``r`` of the compression.
      mean: divide the decompressed sum by ``every_k``.
      targets, dims: which leaves are compressed.
      projection_fn: ``"random"`` or ``(path, shape, window) -> A`` (see :func:`scale_by_flora`).
      accumulator_dtype: dtype of the buffers.
      seed: seed of the projections.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`FloraAccumulationState`.

    Example:
      >>> import jax.numpy as jnp, optax, lowrank_jax as lr
      >>> tx = lr.transforms.flora_accumulation(optax.sgd(0.1), every_k=4, rank=2)
      >>> tx.init({"w": jnp.ones((32, 16))}).accumulator["w"].shape
      (32, 2)

    References:
      Hao, Cao, Mou, "Flora", ICML 2024, Algorithm 1; ``flora-opt`` ``FloraAccelerator``.
    """
    every_k = _check_int("every_k", every_k, "flora_accumulation")
    rank = _check_int("rank", rank, "flora_accumulation")
    inner = optax.with_extra_args_support(inner)
    planner = _planner("flora_accumulation", rank, targets, dims)

    def zeros(tree: Any) -> Any:
        treedef, leaves, plans = planner.plan(tree)
        return treedef.unflatten([
            jnp.zeros(p.lowrank_shape if p else x.shape, accumulator_dtype)
            for p, x in zip(_compressed(plans, rank), leaves)
        ])

    def init_fn(params: Any) -> FloraAccumulationState:
        return FloraAccumulationState(
            jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), new_key(seed), zeros(params),
            inner.init(params),
        )

    def update_fn(
        updates: Any, state: FloraAccumulationState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, FloraAccumulationState]:
        treedef, leaves, plans = planner.plan(updates)
        plans = _compressed(plans, rank)
        key = wrap_key(state.key)
        bases = [_basis(p, key, state.count, projection_fn) if p else None for p in plans]
        acc = [
            a + (projection.project(p.dims.to_canonical(g).astype(jnp.float32), b) if p else g)
            .astype(accumulator_dtype)
            for p, g, a, b in zip(plans, leaves, treedef.flatten_up_to(state.accumulator), bases)
        ]

        def apply() -> tuple:
            total = [
                p.dims.from_canonical(projection.project_back(a.astype(jnp.float32), b))
                if p
                else a
                for p, a, b in zip(plans, acc, bases)
            ]
            grads = treedef.unflatten([
                (t / every_k if mean else t).astype(x.dtype) for t, x in zip(total, leaves)
            ])
            new_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
            return (new_updates, inner_state, zeros(updates), jnp.zeros([], jnp.int32),
                    safe_increment(state.count))

        def skip() -> tuple:
            return (jax.tree.map(jnp.zeros_like, updates), state.inner_state,
                    treedef.unflatten(acc), state.mini_step + 1, state.count)

        new_updates, inner_state, accumulator, mini_step, count = jax.lax.cond(
            state.mini_step >= every_k - 1, apply, skip
        )
        return new_updates, FloraAccumulationState(
            mini_step, count, state.key, accumulator, inner_state
        )

    return auto_sharded(optax.GradientTransformationExtraArgs(init_fn, update_fn))

