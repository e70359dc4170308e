"""SST: Sparse Spectral Training -- weights as ``U diag(σ) Vᵀ``, a sampled few singular vectors
trained at a time, every singular value every step, periodic re-SVD (Euclidean variant)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.targets import MatrixDims, Targets, path_str
from lowrank_jax.transforms._common import MaskedNode, new_key, safe_increment, wrap_key
from lowrank_jax.transforms._lowrank import LeafPlan, ProjectedCore, _check_int, matrix_key

__all__ = ["SSTFactors", "SSTState", "sst_adamw", "sst_init", "sst_merge", "sst_probabilities"]


class SSTFactors(NamedTuple):
    """A weight in spectral form, canonical ``(..., in, out)`` layout: ``W = u diag(s) vᵀ``.

    Attributes:
      u: ``(..., in, k)`` orthonormal columns (at init and after each re-SVD).
      s: ``(..., k)`` non-negative singular values.
      v: ``(..., out, k)``.
    """

    u: jax.Array
    s: jax.Array
    v: jax.Array


class SSTState(NamedTuple):
    """State of :func:`sst_adamw`.

    Attributes:
      count: the step (``int32``).
      key: ``uint32[2]`` key data of the sampling.
      indices: per spectral leaf the ``int32[..., r]`` sampled singular-vector indices.
      column_count, sigma_count: Adam steps since the columns / singular values were reset.
      mu, nu: per spectral leaf an :class:`SSTFactors` of moments -- ``(..., in, r)``,
        ``(..., k)``, ``(..., out, r)``: the sampled columns only; full-size moments for the
        other leaves.
    """

    count: jax.Array
    key: jax.Array
    indices: Any
    column_count: jax.Array
    sigma_count: jax.Array
    mu: Any
    nu: Any


def _planner(targets: Targets) -> ProjectedCore:
    return ProjectedCore(
        optax.identity(), method="sst", rank=1, update_proj_gap=1, proj_type="std", basis="svd",
        targets=targets, dims=None, on_refresh="keep", projector_dtype=None, seed=0,
    )


def _is_factors(x: Any) -> bool:
    return isinstance(x, SSTFactors)


def sst_init(params: Any, *, targets: Targets = None) -> Any:
    """``params`` with every targeted ``(..., in, out)`` weight replaced by its thin SVD.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> f = lr.transforms.sst_init({"w": jnp.eye(4, 3)})["w"]
      >>> f.u.shape, f.s.shape, f.v.shape
      ((4, 3), (3,), (3, 3))
    """
    treedef, leaves, plans = _planner(targets).plan(params)
    out = []
    for p, x in zip(plans, leaves):
        if p is None:
            out.append(x)
            continue
        u, s, vh = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
        v = jnp.swapaxes(vh, -1, -2)
        out.append(SSTFactors(u.astype(x.dtype), s.astype(x.dtype), v.astype(x.dtype)))
    return treedef.unflatten(out)


def sst_merge(params: Any) -> Any:
    """The dense weights ``u diag(s) vᵀ`` of an SST tree (other leaves unchanged)."""

    def merge(f: Any) -> Any:
        if not _is_factors(f):
            return f
        return ((f.u * f.s[..., None, :]) @ jnp.swapaxes(f.v, -1, -2)).astype(f.u.dtype)

    return jax.tree.map(merge, params, is_leaf=_is_factors)


def sst_probabilities(s: jax.Array) -> jax.Array:
    r"""SST's sampling distribution :math:`p_i = \tfrac12(1/k + \sigma_i / \sum_j \sigma_j)`."""
    k = s.shape[-1]
    total = jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), 1e-30)
    return 0.5 * (1.0 / k + s / total)


def _adam(g: jax.Array, m: jax.Array, v: jax.Array, t: jax.Array, b1: float, b2: float, eps: float):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    tf = t.astype(jnp.float32)
    step = (m / (1 - b1**tf)) / (jnp.sqrt(v / (1 - b2**tf)) + eps)
    return step, m, v


def _columns(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, idx[..., None, :], axis=-1)


def _with_columns(x: jax.Array, idx: jax.Array, cols: jax.Array) -> jax.Array:
    onehot = jax.nn.one_hot(idx, x.shape[-1], dtype=x.dtype)  # (..., r, k)
    return x + (cols - _columns(x, idx)) @ onehot


def sst_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int,
    iteration: int = 200,
    round_iterations: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""Sparse Spectral Training with Adam, over a tree from :func:`sst_init` (Euclidean SST).

    Each spectral weight is :math:`W = U\,\mathrm{diag}(\sigma)\,V^\top`. With the dense
    gradient :math:`G = \partial L/\partial W` (differentiate the loss with respect to
    :func:`sst_merge`'s output), every step:

    .. math::
        \nabla\sigma_i = U_{:,i}^\top G V_{:,i}\ (\text{all } i),\qquad
        \tilde\nabla U_{:,i} = G V_{:,i},\quad \tilde\nabla V_{:,i} = G^\top U_{:,i}
        \ (i \in S)

    (the "enhanced" gradients drop the :math:`\sigma_i` factor); Adam steps on :math:`\sigma`
    (then :math:`\sigma \leftarrow \max(\sigma, 0)`, with decoupled decay ``λ``) and on the
    :math:`r` sampled columns, which are renormalised to unit length with the norms moved into
    :math:`\sigma`. Every ``iteration`` steps :math:`S` is redrawn without replacement from
    :func:`sst_probabilities` (:math:`p_i = \tfrac12(1/k + \sigma_i/\sum\sigma)`) and the
    columns' moments restart; at the end of every ``round_iterations`` iterations (default
    :math:`\lceil k/r \rceil`) :math:`U\mathrm{diag}(\sigma)V^\top` is re-decomposed by SVD (so
    :math:`U, V` are orthonormal again and the layer's output is unchanged) and
    :math:`\sigma`'s moments restart. Other leaves get AdamW. The optimizer state is the
    moments of :math:`\sigma` and of the sampled columns only, :math:`2(r(m+n)+k)` per matrix.

    The step-level details (sampling without replacement, renormalisation into
    :math:`\sigma`, the resets) follow the paper's description; its code was not available.
    Not layer-wise (the layer-wise step needs dense stacked kernels).

    Args:
      learning_rate: scalar or schedule.
      rank: ``r``, singular vectors trained at a time.
      iteration: ``T₃``, steps between resamplings (paper: 200).
      round_iterations: ``T₂``, iterations between re-SVDs (paper: ``d/r``).
      b1, b2, eps: Adam constants (``eps`` after bias correction).
      weight_decay: ``λ`` on the singular values and the dense leaves.
      seed: seed of the sampling.

    Returns:
      An ``optax.GradientTransformation``; ``update(dense_grads, state, sst_params)`` returns
      updates shaped like ``sst_params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lowrank_jax as lr
      >>> params = lr.transforms.sst_init({"w": jnp.eye(8, 6)})
      >>> tx = lr.transforms.sst_adamw(1e-2, rank=2)
      >>> u, _ = tx.update({"w": jnp.ones((8, 6))}, tx.init(params), params)
      >>> optax.apply_updates(params, u)["w"].s.shape
      (6,)

    References:
      Zhao et al., "Sparse Spectral Training and Inference on Euclidean and Hyperbolic Neural
      Networks", ICML 2025. https://arxiv.org/abs/2405.15481
    """
    rank = _check_int("rank", rank, "sst_adamw", " Use static_args=('rank',).")
    iteration = _check_int("iteration", iteration, "sst_adamw")
    if round_iterations is not None:
        round_iterations = _check_int("round_iterations", round_iterations, "sst_adamw")

    def leaves_of(tree: Any) -> tuple[Any, list, list]:
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_factors)
        return treedef, [path_str(kp) for kp, _ in flat], [x for _, x in flat]

    def check(paths: list, leaves: list) -> int:
        ks = [f.s.shape[-1] for f in leaves if _is_factors(f)]
        if not ks:
            raise ValueError(
                "sst_adamw: the parameters hold no SSTFactors; convert them with "
                "lowrank_jax.transforms.sst_init(params) first."
            )
        for path, f in zip(paths, leaves):
            if _is_factors(f) and rank > f.s.shape[-1]:
                raise ValueError(
                    f"sst_adamw: rank {rank} exceeds the {f.s.shape[-1]} singular values of "
                    f"'{path}'; lower rank or leave the leaf dense."
                )
        return round_iterations or math.ceil(min(ks) / rank)

    def zeros(f: Any) -> Any:
        if not _is_factors(f):
            return jnp.zeros(f.shape, jnp.float32)
        return SSTFactors(
            jnp.zeros((*f.u.shape[:-1], rank), jnp.float32),
            jnp.zeros(f.s.shape, jnp.float32),
            jnp.zeros((*f.v.shape[:-1], rank), jnp.float32),
        )

    def init_fn(params: Any) -> SSTState:
        treedef, paths, leaves = leaves_of(params)
        check(paths, leaves)
        indices = treedef.unflatten([
            jnp.zeros((*f.s.shape[:-1], rank), jnp.int32) if _is_factors(f) else MaskedNode()
            for f in leaves
        ])
        moments = lambda: treedef.unflatten([zeros(f) for f in leaves])
        z = lambda: jnp.zeros([], jnp.int32)  # three arrays: the state is donatable
        return SSTState(z(), new_key(seed), indices, z(), z(), moments(), moments())

    def update_fn(updates: Any, state: SSTState, params: Any = None):
        if params is None:
            raise ValueError("sst_adamw needs the parameters: update(dense_grads, state, params).")
        treedef, paths, leaves = leaves_of(params)
        every = check(paths, leaves) * iteration
        grads = treedef.flatten_up_to(updates)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        new_iteration = state.count % iteration == 0
        new_round = (state.count % every == 0) & (state.count > 0)
        end_of_round = (state.count + 1) % every == 0
        column_count = jnp.where(new_iteration, 0, state.column_count) + 1
        sigma_count = jnp.where(new_round, 0, state.sigma_count) + 1
        count = safe_increment(state.count)
        key = jax.random.fold_in(wrap_key(state.key), state.count)
        out, indices, mus, nus = [], [], [], []
        for path, f, g, idx, mu, nu in zip(
            paths, leaves, grads, treedef.flatten_up_to(state.indices),
            treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu),
        ):
            if not _is_factors(f):
                step, mu, nu = _adam(g.astype(jnp.float32), mu, nu, count, b1, b2, eps)
                step = step + weight_decay * f.astype(jnp.float32)
                out.append((-lr * step).astype(f.dtype))
                indices.append(idx)
                mus.append(mu)
                nus.append(nu)
                continue
            u0, s0, v0 = u, s, v = tuple(x.astype(jnp.float32) for x in f)
            batch, k = s.shape[:-1], s.shape[-1]
            plan = LeafPlan(path, MatrixDims(), "in", rank, (*batch, u.shape[-2], v.shape[-2]))
            draw = lambda m, p, plan=plan, k=k: jax.random.choice(
                matrix_key(key, plan, m), k, (rank,), replace=False, p=p
            )
            probs = sst_probabilities(s).reshape(-1, k)
            sampled = jax.vmap(draw)(jnp.arange(probs.shape[0]), probs).reshape(*batch, rank)
            idx = jnp.where(new_iteration, sampled.astype(jnp.int32), idx)
            mu = SSTFactors(*(jnp.where(reset, jnp.zeros_like(x), x) for reset, x in
                              zip((new_iteration, new_round, new_iteration), mu)))
            nu = SSTFactors(*(jnp.where(reset, jnp.zeros_like(x), x) for reset, x in
                              zip((new_iteration, new_round, new_iteration), nu)))
            g = g.astype(jnp.float32)
            u_s, v_s = _columns(u, idx), _columns(v, idx)
            grad_s = jnp.sum(u * (g @ v), axis=-2)
            grad_u, grad_v = g @ v_s, jnp.swapaxes(g, -1, -2) @ u_s
            step_s, mu_s, nu_s = _adam(grad_s, mu.s, nu.s, sigma_count, b1, b2, eps)
            step_u, mu_u, nu_u = _adam(grad_u, mu.u, nu.u, column_count, b1, b2, eps)
            step_v, mu_v, nu_v = _adam(grad_v, mu.v, nu.v, column_count, b1, b2, eps)
            s_new = jnp.maximum(s - lr * (step_s + weight_decay * s), 0.0)
            u_s, v_s = u_s - lr * step_u, v_s - lr * step_v
            norm_u = jnp.linalg.norm(u_s, axis=-2)
            norm_v = jnp.linalg.norm(v_s, axis=-2)
            u_s, v_s = u_s / jnp.maximum(norm_u, 1e-30)[..., None, :], v_s / jnp.maximum(
                norm_v, 1e-30
            )[..., None, :]
            onehot = jax.nn.one_hot(idx, k, dtype=jnp.float32)  # (..., r, k)
            gain = 1.0 + jnp.einsum("...r,...rk->...k", norm_u * norm_v - 1.0, onehot)
            new = (_with_columns(u, idx, u_s), s_new * gain, _with_columns(v, idx, v_s))
            new = jax.lax.cond(end_of_round, lambda new=new: _resvd(*new), lambda new=new: new)
            deltas = ((n - o).astype(x.dtype) for n, o, x in zip(new, (u0, s0, v0), f))
            out.append(SSTFactors(*deltas))
            indices.append(idx)
            mus.append(SSTFactors(mu_u, mu_s, mu_v))
            nus.append(SSTFactors(nu_u, nu_s, nu_v))
        return treedef.unflatten(out), SSTState(
            count, state.key, treedef.unflatten(indices), column_count, sigma_count,
            treedef.unflatten(mus), treedef.unflatten(nus),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _resvd(u: jax.Array, s: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``U diag(σ) Vᵀ`` re-decomposed: orthonormal factors, the same matrix."""
    w = (u * s[..., None, :]) @ jnp.swapaxes(v, -1, -2)
    u2, s2, vh = jnp.linalg.svd(w, full_matrices=False)
    return u2, s2, jnp.swapaxes(vh, -1, -2)
