"""The machinery every projected-gradient method shares (GaLore, Fira, 8-bit GaLore, ...).

A :class:`ProjectedCore` resolves which leaves are projected and how (a static
:class:`LeafPlan` per leaf, derived from paths and shapes only, so ``init`` and ``update``
agree), keeps one projector per matrix (batch axes included), refreshes the projectors every
``update_proj_gap`` steps inside one ``lax.cond``, and runs an inner optax transformation twice:
once over the projected (low-rank) gradients of the targeted leaves, once over the other leaves
at full shape. A method file (``galore.py``, ``fira.py``) turns the low-rank update into the
full-size one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import projection
from lowrank_jax.projection import Projector
from lowrank_jax.targets import MatrixDims, Targets, path_str, resolve, resolve_dims
from lowrank_jax.transforms import _adaptive, _guard
from lowrank_jax.transforms._common import (
    MaskedNode,
    check_float_leaf,
    is_masked,
    new_key,
    safe_increment,
    wrap_key,
)

ON_REFRESH = ("keep", "reset", "reproject")

# Inner-state fields that hold elementwise second moments: rotated with squared weights.
_SECOND_MOMENT_FIELDS = frozenset({"nu", "v", "exp_avg_sq", "nu_hat", "second"})


class LeafPlan(NamedTuple):
    """How one targeted leaf is projected (static: from its path and shape)."""

    path: str
    dims: MatrixDims  # normalized, non-negative axes
    side: str  # "in", "out" or "both"
    rank: int  # effective rank (clipped to min(in, out))
    shape: tuple[int, ...]  # canonical (..., in, out) shape

    @property
    def lowrank_shape(self) -> tuple[int, ...]:
        return projection.lowrank_shape(self.shape, self.side, self.rank)


# Set by the layer-wise train step while it updates one layer of scan-stacked leaves: the
# stacked leaves it passes are the slice [offset : offset + 1] of the full [L, ...] leaves.
_LAYER_OFFSET: contextvars.ContextVar = contextvars.ContextVar("layer_offset", default=0)


@contextlib.contextmanager
def layer_offset(offset: int | jax.Array) -> Iterator[None]:
    """Within the block, stacked leaves are the slice at layer ``offset`` of the full leaves.

    Random bases draw one key per matrix, numbered within its leaf; with the offset, a layer
    updated alone (:func:`lowrank_jax.train.make_train_step` with ``layerwise=True``) draws the
    same keys as when the whole stack is updated at once.
    """
    token = _LAYER_OFFSET.set(offset)
    try:
        yield
    finally:
        _LAYER_OFFSET.reset(token)


def matrix_key(key: jax.Array, plan: LeafPlan, index: int | jax.Array) -> jax.Array:
    """The key of matrix ``index`` (over the flattened batch axes) of the leaf ``plan``.

    Derived from the leaf's path (not its position in the tree) and the matrix's number in the
    full stacked leaf, so a sub-tree or a layer slice draws the keys the whole tree would.
    """
    leaf = jax.random.fold_in(key, zlib.crc32(plan.path.encode()) & 0x7FFFFFFF)
    per_layer = math.prod(plan.shape[1:-2]) if len(plan.shape) > 2 else 0
    return jax.random.fold_in(leaf, _LAYER_OFFSET.get() * per_layer + index)


class LeafStep(NamedTuple):
    """One targeted leaf during an update, in the canonical ``(..., in, out)`` layout.

    What a method's per-leaf function receives (see :meth:`ProjectedCore.update`).
    """

    plan: LeafPlan
    grad: jax.Array  # the canonical gradient
    projector: Projector  # after any refresh
    lowrank_grad: jax.Array  # project(grad, projector)
    lowrank_update: jax.Array  # the inner transformation's output on lowrank_grad


# (leaf, aux) -> (canonical full-size update, new aux); aux is the leaf's entry of the state
# field named by ``aux=`` (``None`` without it).
LeafFn = Callable[[LeafStep, Any], tuple[jax.Array, Any]]


def _check_int(name: str, value: Any, method: str, hint: str = "") -> int:
    """``value`` as a positive Python int; a clear error for tracers and non-integers."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{method}: {name} must be a Python int, got a traced value.{hint}")
    if isinstance(value, bool) or not float(value).is_integer():
        raise TypeError(f"{method}: {name} must be a whole number, got {value!r}.")
    if int(value) <= 0:
        raise ValueError(f"{method}: {name} must be positive, got {value}.")
    return int(value)


class ProjectedCore:
    """Projectors, targeting and the inner transformation of a projected-gradient method.

    Args:
      inner: the optax transformation run in the low-rank space (and on untargeted leaves).
      method: the public name, used in error messages.
      rank: projection rank; clipped to ``min(in, out)`` per matrix with a warning.
      update_proj_gap: refresh the projectors at steps ``0, T, 2T, ...`` (a traced value is
        allowed, e.g. under ``optax.inject_hyperparams``).
      proj_type: ``"std" | "reverse_std" | "left" | "right" | "full"`` (galore-torch's sides).
      basis: ``"svd" | "randomized" | "random"``.
      targets: which leaves are projected (:func:`lowrank_jax.targets.resolve`).
      dims: :class:`MatrixDims` of each leaf (:func:`lowrank_jax.targets.resolve_dims`).
      on_refresh: ``"keep"`` the inner state (reference), ``"reset"`` it, or ``"reproject"``
        its moments into the new basis.
      projector_dtype: dtype of the stored bases; ``None`` keeps each gradient's dtype.
      seed: seed of the key used by the randomized and random bases.
      adaptive_refresh: per-matrix lazy refresh (:mod:`~lowrank_jax.transforms._adaptive`);
        needs ``on_refresh="keep"``.
      basis_fn: ``(plan, key_of) -> Projector``: regenerate every projector each step, where
        ``key_of(m)`` is the key of the leaf's matrix ``m`` for the current period
        that changes every ``update_proj_gap`` steps, instead of storing it (APOLLO); needs
        ``on_refresh`` ``"keep"`` or ``"reset"``.
    """

    def __init__(
        self,
        inner: optax.GradientTransformation,
        *,
        method: str,
        rank: int,
        update_proj_gap: int | jax.Array,
        proj_type: str,
        basis: str,
        targets: Targets,
        dims: Any,
        on_refresh: str,
        projector_dtype: Any,
        seed: int,
        adaptive_refresh: _adaptive.AdaptiveRefresh | None = None,
        basis_fn: Callable[[LeafPlan, Callable], Projector] | None = None,
        elementwise_update: bool = False,
    ):
        hint = " Under optax.inject_hyperparams pass static_args=('rank',)."
        self.rank = _check_int("rank", rank, method, hint)
        if isinstance(update_proj_gap, (int, float)) and not isinstance(update_proj_gap, bool):
            _check_int("update_proj_gap", update_proj_gap, method)
        if proj_type not in projection.PROJ_TYPES:
            raise ValueError(
                f"{method}: proj_type must be one of {projection.PROJ_TYPES}, got {proj_type!r}."
            )
        if basis not in projection.BASIS_KINDS:
            raise ValueError(
                f"{method}: basis must be one of {projection.BASIS_KINDS}, got {basis!r}."
            )
        if on_refresh not in ON_REFRESH:
            raise ValueError(
                f"{method}: on_refresh must be one of {ON_REFRESH}, got {on_refresh!r}."
            )
        self.inner = optax.with_extra_args_support(inner)
        self.method = method
        self.update_proj_gap = update_proj_gap
        self.proj_type = proj_type
        self.basis = basis
        self.targets = targets
        self.dims = dims
        self.on_refresh = on_refresh
        self.projector_dtype = projector_dtype
        self.seed = seed
        if adaptive_refresh is not None:
            _adaptive.check(adaptive_refresh, method)
            if on_refresh != "keep" or basis_fn is not None:
                raise ValueError(
                    f"{method}: adaptive_refresh refreshes each matrix on its own schedule, so "
                    "it needs on_refresh='keep' (the inner state is shared by all matrices)."
                )
        if basis_fn is not None and on_refresh == "reproject":
            raise ValueError(f"{method}: on_refresh='reproject' needs stored projectors.")
        self.adaptive_refresh = adaptive_refresh
        self.basis_fn = basis_fn
        self.elementwise_update = elementwise_update

    # ------------------------------------------------------------------ planning
    def plan(self, tree: Any, warn: bool = False) -> tuple[Any, list, list]:
        """Returns ``(treedef, leaves, plans)``; a plan is a :class:`LeafPlan` or ``None``."""
        mask = resolve(self.targets, tree, method=self.method)
        dims_tree = resolve_dims(self.dims, tree)
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        masks = treedef.flatten_up_to(mask)
        dims_list = treedef.flatten_up_to(dims_tree)
        plans = []
        for (keypath, leaf), selected, leaf_dims in zip(flat, masks, dims_list, strict=True):
            path = path_str(keypath)
            if not selected or leaf_dims is None:
                plans.append(None)
                continue
            check_float_leaf(path, leaf, self.method)
            if leaf.ndim < 2:
                raise ValueError(
                    f"{self.method}: leaf '{path}' has shape {tuple(leaf.shape)}; only leaves "
                    "with two or more dimensions can be projected. Leave it out of `targets` "
                    "(it then gets the inner optimizer at full shape)."
                )
            leaf_dims = leaf_dims.normalize(leaf.ndim, path)
            shape = leaf_dims.canonical_shape(tuple(leaf.shape))
            n_in, n_out = shape[-2:]
            rank = min(self.rank, n_in, n_out)
            if warn and rank < self.rank:
                warnings.warn(
                    f"{self.method}: rank {self.rank} exceeds min(in, out) = {min(n_in, n_out)} "
                    f"of leaf '{path}' {tuple(leaf.shape)}; using rank {rank} there (as "
                    "galore-torch does). Lower `rank` or leave the leaf out of `targets`.",
                    stacklevel=4,
                )
            side = projection.choose_side(self.proj_type, n_in, n_out)
            plans.append(LeafPlan(path, leaf_dims, side, rank, shape))
        return treedef, [leaf for _, leaf in flat], plans

    # ------------------------------------------------------------------ init
    def _dtype(self, leaf: Any) -> Any:
        return leaf.dtype if self.projector_dtype is None else self.projector_dtype

    def init(self, params: Any) -> dict[str, Any]:
        """The shared state fields for ``params``, by name.

        ``count``, ``key``, ``projectors`` (``None`` with ``basis_fn``: nothing is stored),
        ``lowrank_state``, ``fullrank_state``, and ``refresh_state`` with adaptive refresh.
        """
        treedef, leaves, plans = self.plan(params, warn=True)
        projectors = None if self.basis_fn else treedef.unflatten([
            projection.identity_projector(p.shape, p.side, p.rank, self._dtype(leaf))
            if p
            else MaskedNode()
            for p, leaf in zip(plans, leaves, strict=True)
        ])
        fields = dict(
            count=jnp.zeros([], jnp.int32),
            key=new_key(self.seed),
            projectors=projectors,
            lowrank_state=self.inner.init(self._lowrank_template(treedef, leaves, plans)),
            fullrank_state=self.inner.init(
                treedef.unflatten([MaskedNode() if p else x for p, x in zip(plans, leaves)])
            ),
        )
        if self.adaptive_refresh is not None:
            fields["refresh_state"] = treedef.unflatten([
                _adaptive.init_state(p.shape[:-2], self.update_proj_gap, self.adaptive_refresh)
                if p
                else MaskedNode()
                for p in plans
            ])
        return fields

    def init_leaves(self, params: Any, make: Callable[[LeafPlan], Any]) -> Any:
        """A tree with ``make(plan)`` at each targeted leaf and ``MaskedNode`` elsewhere
        (a method's own per-matrix state, e.g. Fira's limiter norms)."""
        treedef, _, plans = self.plan(params)
        return treedef.unflatten([make(p) if p else MaskedNode() for p in plans])

    def _lowrank_template(self, treedef: Any, leaves: list, plans: list) -> Any:
        return treedef.unflatten(
            [
                jnp.zeros(p.lowrank_shape, leaf.dtype) if p else MaskedNode()
                for p, leaf in zip(plans, leaves, strict=True)
            ]
        )

    # ------------------------------------------------------------------ update
    def update(
        self,
        updates: Any,
        state: Any,
        params: Any,
        leaf_fn: LeafFn,
        *,
        aux: str | None = None,
        **extra_args: Any,
    ) -> tuple[Any, Any]:
        """One step: refresh when due, project, run ``inner``, and map each leaf back.

        Args:
          updates: the gradients.
          state: a NamedTuple with the fields of :meth:`init` (and ``aux``, if given).
          params: the parameters (passed to ``inner`` for the untargeted leaves) or ``None``.
          leaf_fn: ``(LeafStep, aux) -> (update, new_aux)`` for each targeted leaf; the update
            is in the canonical layout and is cast back to the gradient's dtype and layout.
          aux: the name of a per-leaf state field (``MaskedNode`` at untargeted leaves, or
            ``None``) that ``leaf_fn`` reads and rewrites.
          **extra_args: passed to ``inner``.

        Returns:
          ``(updates, state._replace(...))`` with the shared fields (and ``aux``) advanced.
        """
        treedef, leaves, plans = self.plan(updates)
        old = self.flatten_state(treedef, plans, state.projectors)
        grads = [p.dims.to_canonical(g) if p else g for p, g in zip(plans, leaves)]
        count, lowrank_state = state.count, state.lowrank_state
        refresh = count % self.update_proj_gap == 0
        guard = _guard.current()  # the train step's non-finite guard, applied here (_guard)
        full_tree = treedef.unflatten([MaskedNode() if p else g for p, g in zip(plans, leaves)])
        full_params = (
            None
            if params is None
            else treedef.unflatten(
                [MaskedNode() if p else x for p, x in zip(plans, treedef.flatten_up_to(params))]
            )
        )
        full_step = lambda: self.inner.update(
            full_tree, state.fullrank_state, full_params, **extra_args
        )
        # Under the guard each inner update is guarded on its own (the low-rank one in a cond;
        # the full-shape one as the platform keeps it in place, _guard.elementwise), and the
        # projected-back updates are computed outside any cond, so they reuse the gradients'
        # buffers. The full-shape update comes first (see _guard.elementwise's ``then``).
        if guard is None:
            full_updates, fullrank_state = full_step()
        else:
            targeted = [i for i, p in enumerate(plans) if p]
            full_updates, fullrank_state, held = _guard.elementwise(
                guard, full_step, state.fullrank_state, then=[grads[i] for i in targeted]
            )
            for i, g in zip(targeted, held, strict=True):
                grads[i] = g
        if guard is not None:
            refresh = refresh & guard.finite
        refresh_key = jax.random.fold_in(wrap_key(state.key), count)
        changes: dict[str, Any] = {}
        if self.basis_fn is not None:
            # Regenerated, not stored: the key of the current period's refresh step.
            period = count - count % self.update_proj_gap
            period_key = jax.random.fold_in(wrap_key(state.key), period)
            projectors = [
                self.basis_fn(p, functools.partial(matrix_key, period_key, p))
                if p
                else MaskedNode()
                for p in plans
            ]
        elif self.adaptive_refresh is not None:
            projectors, refresh_states, refresh = self._adaptive_step(
                plans, grads, old, count, refresh_key,
                treedef.flatten_up_to(state.refresh_state),
            )
            changes["refresh_state"] = treedef.unflatten(refresh_states)
            if guard is not None:
                projectors = guard.keep(projectors, old)
                changes["refresh_state"] = guard.keep(
                    changes["refresh_state"], state.refresh_state
                )
        elif self.on_refresh == "keep":
            # Only the projectors go through the cond: the moments are not copied.
            projectors = jax.lax.cond(
                refresh, lambda: self._refreshed(plans, grads, old, refresh_key), lambda: old
            )
        if self.on_refresh == "reset":
            fresh = lambda: self.inner.init(self._lowrank_template(treedef, leaves, plans))
            if self.basis_fn is not None:
                lowrank_state = jax.lax.cond(refresh, fresh, lambda: lowrank_state)
            else:
                projectors, lowrank_state = jax.lax.cond(
                    refresh,
                    lambda: (self._refreshed(plans, grads, old, refresh_key), fresh()),
                    lambda: (old, lowrank_state),
                )
        elif self.on_refresh == "reproject":

            def reprojected() -> tuple[list, Any]:
                new = self._refreshed(plans, grads, old, refresh_key)
                return new, self._reproject(lowrank_state, treedef, leaves, plans, old, new)

            projectors, lowrank_state = jax.lax.cond(
                refresh, reprojected, lambda: (old, lowrank_state)
            )
        lowrank_grads = [
            projection.project(g, q) if p else MaskedNode()
            for p, g, q in zip(plans, grads, projectors)
        ]
        low_step = lambda: self.inner.update(
            treedef.unflatten(lowrank_grads), lowrank_state, None, **extra_args
        )
        low_updates, lowrank_state = (
            low_step() if guard is None else _guard.cond(guard, low_step, lowrank_state)
        )
        aux_in = [None] * len(plans) if aux is None else treedef.flatten_up_to(getattr(state, aux))
        out, aux_out = [], []
        low_list = treedef.flatten_up_to(low_updates)
        full_list = treedef.flatten_up_to(full_updates)
        for i, p in enumerate(plans):
            if p is None:
                out.append(full_list[i])
                aux_out.append(aux_in[i])
                continue
            leaf = LeafStep(p, grads[i], projectors[i], lowrank_grads[i], low_list[i])
            u, a = leaf_fn(leaf, aux_in[i])
            out.append(p.dims.from_canonical(u).astype(leaves[i].dtype))
            aux_out.append(a)
        changes.update(
            count=safe_increment(count),
            projectors=None if self.basis_fn else treedef.unflatten(projectors),
            lowrank_state=lowrank_state,
            fullrank_state=fullrank_state,
        )
        if aux is not None:
            changes[aux] = treedef.unflatten(aux_out)
        if guard is not None:
            guard.whole_cond_on_tpu |= self.elementwise_update
            changes["count"] = jnp.where(guard.finite, changes["count"], count)
            if aux is not None:
                changes[aux] = guard.keep(changes[aux], getattr(state, aux))
            guard.own(changes)
        return treedef.unflatten(out), state._replace(**changes)

    # ------------------------------------------------------------------ internals
    def _adaptive_step(
        self, plans: list, grads: list, old: list, count: jax.Array, key: Any, states: list
    ) -> tuple[list, list, jax.Array]:
        new, new_states, due = [], [], jnp.zeros([], bool)
        for p, g, q, s in zip(plans, grads, old, states):
            if p is None:
                new.append(q)
                new_states.append(s)
                continue
            compute = lambda g_m, q_m, k, p=p: self._new_projector(p, g_m, q_m, k)
            q, s, leaf_due = _adaptive.refresh_leaf(
                p.shape[:-2], g, q, s, count, functools.partial(matrix_key, key, p), compute,
                self.adaptive_refresh,
            )
            new.append(q)
            new_states.append(s)
            due = due | leaf_due
        return new, new_states, due

    def flatten_state(self, treedef: Any, plans: list, projectors: Any) -> list | None:
        """``projectors`` (or any state tree with ``MaskedNode`` at untargeted leaves) as a
        list, checked against the plans; ``None`` stays ``None``."""
        if projectors is None:
            return None
        try:
            old = treedef.flatten_up_to(projectors)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{self.method}: the updates do not have the structure of the parameters the "
                f"state was initialised with ({err}). Call init and update on the same tree."
            ) from err
        for p, q in zip(plans, old):
            if (p is None) != is_masked(q):
                raise ValueError(
                    f"{self.method}: leaf '{p.path if p else '?'}' is targeted differently in "
                    "update than in init; targets and dims may depend on paths and shapes only."
                )
        return old

    def _new_projector(self, plan: LeafPlan, g: jax.Array, old: Projector, key: Any) -> Projector:
        """The new projector of one ``(in, out)`` matrix; a non-finite gradient (or a failed
        decomposition) keeps ``old``."""
        new = projection.compute_projector(
            g, plan.side, plan.rank, self.basis, key, self._dtype(g)
        )
        ok = jnp.all(jnp.isfinite(g))

        def guard(new_b: jax.Array | None, old_b: jax.Array | None) -> jax.Array | None:
            if new_b is None:
                return None
            return jnp.where(ok & jnp.all(jnp.isfinite(new_b)), new_b, old_b)

        return Projector(
            guard(new.in_basis, old.in_basis), guard(new.out_basis, old.out_basis)
        )

    def _refreshed(self, plans: list, grads: list, old: list, key: jax.Array) -> list:
        """New projectors of every targeted leaf, decomposing one matrix at a time.

        Matrices of the same shape (the layers of a stacked ``[L, in, out]`` leaf, and the
        same-shaped leaves of unstacked layers) go through one ``lax.map``: each iteration
        picks its matrix (a ``lax.switch`` over the leaves, a dynamic index over the batch
        axes), upcasts it and decomposes it. So a refresh's workspace is that of the largest
        single matrix, not of the model, and the compiled program holds one decomposition per
        distinct matrix shape, whatever the number of layers.
        """
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(plans):
            if p is not None:
                signature = (p.shape[-2:], p.side, p.rank, grads[i].dtype, self._dtype(grads[i]))
                groups.setdefault(signature, []).append(i)
        new = list(old)
        for members in groups.values():
            for i, projector in zip(members, self._refresh_group(members, plans, grads, old, key)):
                new[i] = projector
        return new

    def _refresh_group(
        self, members: list[int], plans: list, grads: list, old: list, key: jax.Array
    ) -> list[Projector]:
        plan = plans[members[0]]
        sizes = [math.prod(plans[i].shape[:-2]) for i in members]
        flat = lambda x, n: None if x is None else x.reshape(n, *x.shape[-2:])
        g_flat = [flat(grads[i], n) for i, n in zip(members, sizes)]
        old_flat = [jax.tree.map(lambda b, n=n: flat(b, n), old[i]) for i, n in zip(members, sizes)]
        if len(members) == 1 and sizes[0] == 1:  # one matrix: no loop
            new = self._new_projector(plan, g_flat[0][0], jax.tree.map(lambda b: b[0], old_flat[0]),
                                      matrix_key(key, plan, 0))
            return [jax.tree.map(lambda b: b.reshape(*plan.shape[:-2], *b.shape), new)]
        starts = np.cumsum([0, *sizes[:-1]])

        def one(index: jax.Array) -> Projector:
            member = jnp.searchsorted(jnp.asarray(starts[1:]), index, side="right")
            local = index - jnp.asarray(starts)[member]

            def pick(b: int) -> tuple[jax.Array, Projector, jax.Array]:
                take = lambda x: jax.lax.dynamic_index_in_dim(x, local, keepdims=False)
                return take(g_flat[b]), jax.tree.map(take, old_flat[b]), matrix_key(
                    key, plans[members[b]], local
                )

            g, q, k = jax.lax.switch(member, [lambda b=b: pick(b) for b in range(len(members))])
            return self._new_projector(plan, g, q, k)

        stacked = jax.lax.map(one, jnp.arange(sum(sizes)))
        out = []
        for i, start, n in zip(members, starts, sizes):
            batch = plans[i].shape[:-2]
            unstack = lambda b, start=start, n=n, batch=batch: b[start : start + n].reshape(
                *batch, *b.shape[1:]
            )
            out.append(jax.tree.map(unstack, stacked))
        return out

    def _reproject(
        self, state: Any, treedef: Any, leaves: list, plans: list, old: list, new: list
    ) -> Any:
        """Rotates the inner moments from the old bases into the new ones.

        First moments: ``M ← R_in M R_outᵀ`` with ``R = B_newᵀ B_old``. Second moments (fields
        named like ``nu``): the same with ``R ∘ R``, which keeps them non-negative and is exact
        for independent coordinates.
        """
        template = self._lowrank_template(treedef, leaves, plans)
        structure = jax.tree.structure(template)
        shapes = [x.shape for x in jax.tree.leaves(template)]

        def rotate(x: jax.Array, q_old: Projector, q_new: Projector, square: bool) -> jax.Array:
            y = x.astype(jnp.float32)
            for side, b_old, b_new in (
                ("in", q_old.in_basis, q_new.in_basis),
                ("out", q_old.out_basis, q_new.out_basis),
            ):
                if b_old is None:
                    continue
                r = jnp.swapaxes(b_new, -1, -2).astype(jnp.float32) @ b_old.astype(jnp.float32)
                r = r * r if square else r
                y = r @ y if side == "in" else y @ jnp.swapaxes(r, -1, -2)
            return y.astype(x.dtype)

        def visit(node: Any, name: str) -> Any:
            if (
                jax.tree.structure(node) == structure
                and [x.shape for x in jax.tree.leaves(node)] == shapes
            ):
                items = treedef.flatten_up_to(node)
                square = name in _SECOND_MOMENT_FIELDS
                return treedef.unflatten(
                    [
                        rotate(x, qo, qn, square) if p else x
                        for p, x, qo, qn in zip(plans, items, old, new)
                    ]
                )
            if isinstance(node, tuple) and hasattr(node, "_fields"):
                return type(node)(*(visit(getattr(node, f), f) for f in node._fields))
            if isinstance(node, (tuple, list)):
                return type(node)(visit(c, name) for c in node)
            if isinstance(node, dict):
                return {k: visit(v, k) for k, v in node.items()}
            return node

        return visit(state, "")
