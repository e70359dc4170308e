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

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import projection
from lowrank_jax.projection import Projector
from lowrank_jax.targets import MatrixDims, Targets, path_str, resolve, resolve_dims
from lowrank_jax.transforms import _adaptive
from lowrank_jax.transforms._common import (
    MaskedNode,
    canonical_shape,
    check_float_leaf,
    from_canonical,
    is_masked,
    new_key,
    to_canonical,
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


class Step(NamedTuple):
    """What :meth:`ProjectedCore.step` computed, per leaf (lists in tree-leaf order)."""

    treedef: Any
    plans: list  # LeafPlan or None
    grads: list  # canonical gradient (targeted) or the raw gradient
    dtypes: list  # dtype of each incoming update
    projectors: list  # Projector or MaskedNode (after any refresh)
    lowrank_grads: list  # projected gradient or None
    lowrank_updates: list  # inner update in low-rank space or None
    fullrank_updates: list  # inner update of untargeted leaves or None
    refresh: jax.Array  # bool scalar: this step refreshed the projectors
    count: jax.Array  # the step counter before this step
    lowrank_state: Any
    fullrank_state: Any
    refresh_state: Any = None  # per-leaf _adaptive.RefreshState with adaptive refresh


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
      basis_fn: ``(plan, key) -> Projector``: regenerate every projector each step from a key
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
        basis_fn: Callable[[LeafPlan, jax.Array], Projector] | None = None,
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
            shape = canonical_shape(tuple(leaf.shape), leaf_dims)
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

    def init(self, params: Any) -> tuple[jax.Array, jax.Array, Any, Any, Any]:
        """``(count, key, projectors, lowrank_state, fullrank_state)`` for ``params``.

        ``projectors`` is ``None`` with ``basis_fn`` (nothing is stored).
        """
        treedef, leaves, plans = self.plan(params, warn=True)
        projectors = None if self.basis_fn else [
            projection.identity_projector(p.shape, p.side, p.rank, self._dtype(leaf))
            if p
            else MaskedNode()
            for p, leaf in zip(plans, leaves, strict=True)
        ]
        return (
            jnp.zeros([], jnp.int32),
            new_key(self.seed),
            None if projectors is None else treedef.unflatten(projectors),
            self.inner.init(self._lowrank_template(treedef, leaves, plans)),
            self.inner.init(
                treedef.unflatten([MaskedNode() if p else x for p, x in zip(plans, leaves)])
            ),
        )

    def init_refresh(self, params: Any) -> Any:
        """The per-leaf :class:`~._adaptive.RefreshState` tree, or ``None`` without it."""
        if self.adaptive_refresh is None:
            return None
        treedef, _, plans = self.plan(params)
        return treedef.unflatten(
            [
                _adaptive.init_state(p.shape[:-2], self.update_proj_gap, self.adaptive_refresh)
                if p
                else MaskedNode()
                for p in plans
            ]
        )

    def _lowrank_template(self, treedef: Any, leaves: list, plans: list) -> Any:
        return treedef.unflatten(
            [
                jnp.zeros(p.lowrank_shape, leaf.dtype) if p else MaskedNode()
                for p, leaf in zip(plans, leaves, strict=True)
            ]
        )

    # ------------------------------------------------------------------ update
    def step(
        self,
        updates: Any,
        count: jax.Array,
        key: jax.Array,
        projectors: Any,
        lowrank_state: Any,
        fullrank_state: Any,
        params: Any = None,
        *,
        refresh_state: Any = None,
        **extra_args: Any,
    ) -> Step:
        """Refreshes projectors when due, projects, and runs the inner transformation."""
        treedef, leaves, plans = self.plan(updates)
        old = self.flatten_state(treedef, plans, projectors)
        grads = [to_canonical(g, p.dims) if p else g for p, g in zip(plans, leaves)]
        refresh = count % self.update_proj_gap == 0
        refresh_key = jax.random.fold_in(wrap_key(key), count)
        # With basis_fn or adaptive_refresh the projectors are final after this block.
        done = self.basis_fn is not None or self.adaptive_refresh is not None
        if self.basis_fn is not None:
            # Regenerated, not stored: the key of the current period's refresh step.
            period_key = jax.random.fold_in(wrap_key(key), count - count % self.update_proj_gap)
            old = [
                self.basis_fn(p, jax.random.fold_in(period_key, i)) if p else MaskedNode()
                for i, p in enumerate(plans)
            ]
        elif self.adaptive_refresh is not None:
            old, refresh_state, refresh = self._adaptive_step(
                plans, grads, old, count, refresh_key, treedef.flatten_up_to(refresh_state)
            )
            refresh_state = treedef.unflatten(refresh_state)

        def new_projectors() -> list:
            return [
                self._new_projector(p, g, q, jax.random.fold_in(refresh_key, i)) if p else q
                for i, (p, g, q) in enumerate(zip(plans, grads, old))
            ]

        if done:
            new_projectors = old
            if self.on_refresh == "reset":
                template = self._lowrank_template(treedef, leaves, plans)
                lowrank_state = jax.lax.cond(
                    refresh, lambda: self.inner.init(template), lambda: lowrank_state
                )
        elif self.on_refresh == "keep":
            # Only the projectors go through the cond: the moments are not copied.
            new_projectors = jax.lax.cond(refresh, new_projectors, lambda: old)
        else:

            def refreshed() -> tuple[list, Any]:
                new = new_projectors()
                if self.on_refresh == "reset":
                    return new, self.inner.init(self._lowrank_template(treedef, leaves, plans))
                return new, self._reproject(lowrank_state, treedef, leaves, plans, old, new)

            new_projectors, lowrank_state = jax.lax.cond(
                refresh, refreshed, lambda: (old, lowrank_state)
            )
        lowrank_grads = [
            projection.project(g, q) if p else None
            for p, g, q in zip(plans, grads, new_projectors)
        ]
        low_tree = treedef.unflatten(
            [x if p else MaskedNode() for p, x in zip(plans, lowrank_grads)]
        )
        low_updates, lowrank_state = self.inner.update(low_tree, lowrank_state, None, **extra_args)
        full_tree = treedef.unflatten([MaskedNode() if p else g for p, g in zip(plans, leaves)])
        full_params = (
            None
            if params is None
            else treedef.unflatten(
                [MaskedNode() if p else x for p, x in zip(plans, treedef.flatten_up_to(params))]
            )
        )
        full_updates, fullrank_state = self.inner.update(
            full_tree, fullrank_state, full_params, **extra_args
        )
        low_list = treedef.flatten_up_to(low_updates)
        full_list = treedef.flatten_up_to(full_updates)
        return Step(
            treedef=treedef,
            plans=plans,
            grads=grads,
            dtypes=[g.dtype for g in leaves],
            projectors=new_projectors,
            lowrank_grads=lowrank_grads,
            lowrank_updates=[u if p else None for p, u in zip(plans, low_list)],
            fullrank_updates=[None if p else u for p, u in zip(plans, full_list)],
            refresh=refresh,
            count=count,
            lowrank_state=lowrank_state,
            fullrank_state=fullrank_state,
            refresh_state=refresh_state,
        )

    @staticmethod
    def finish(step: Step, transform: Callable[[LeafPlan, int], jax.Array]) -> Any:
        """The full update tree: ``transform(plan, i)`` (canonical layout) for targeted leaf i."""
        out = [
            full if p is None else from_canonical(transform(p, i), p.dims).astype(step.dtypes[i])
            for i, (p, full) in enumerate(zip(step.plans, step.fullrank_updates))
        ]
        return step.treedef.unflatten(out)

    def projectors_tree(self, step: Step) -> Any:
        """The projectors to store (``None`` with ``basis_fn``: they are regenerated)."""
        return None if self.basis_fn else step.treedef.unflatten(step.projectors)

    # ------------------------------------------------------------------ internals
    def _adaptive_step(
        self, plans: list, grads: list, old: list, count: jax.Array, key: Any, states: list
    ) -> tuple[list, list, jax.Array]:
        new, new_states, due = [], [], jnp.zeros([], bool)
        for i, (p, g, q, s) in enumerate(zip(plans, grads, old, states)):
            if p is None:
                new.append(q)
                new_states.append(s)
                continue
            compute = lambda g_m, q_m, k, p=p: self._new_projector(p, g_m, q_m, k)
            q, s, leaf_due = _adaptive.refresh_leaf(
                p.shape[:-2], g, q, s, count, jax.random.fold_in(key, i), compute,
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
        new = projection.compute_projector(
            g, plan.side, plan.rank, self.basis, key, self._dtype(g)
        )
        # A non-finite gradient (or a failed decomposition) keeps the previous basis.
        ok = jnp.all(jnp.isfinite(g), axis=(-2, -1))

        def guard(new_b: jax.Array | None, old_b: jax.Array | None) -> jax.Array | None:
            if new_b is None:
                return None
            good = ok & jnp.all(jnp.isfinite(new_b), axis=(-2, -1))
            return jnp.where(good[..., None, None], new_b, old_b)

        return Projector(
            guard(new.in_basis, old.in_basis), guard(new.out_basis, old.out_basis)
        )

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
