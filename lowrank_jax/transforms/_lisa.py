"""LISA: train a few sampled layers at a time, with optimizer state for those layers only."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.sharding import auto_sharded
from lowrank_jax.targets import Targets, path_str, resolve
from lowrank_jax.transforms._common import MaskedNode, new_key, safe_increment, wrap_key
from lowrank_jax.transforms._lowrank import _check_int

__all__ = [
    "LAYER_PATTERN",
    "STACKED_PATTERN",
    "LayerPartition",
    "LisaState",
    "gather_slots",
    "lisa",
    "partition",
    "scatter_slots",
]

LAYER_PATTERN = r"layers/(\d+)/"
STACKED_PATTERN = r"(^|/)layers/"


class LisaState(NamedTuple):
    """State of :func:`lisa`.

    Attributes:
      count: updates applied so far (``int32``); layers are resampled when
        ``count % interval == 0``.
      key: ``uint32[2]`` key data; the sample at step ``t`` uses ``fold_in(key, t)``.
      active: ``int32[n_active]``, the sorted indices of the layers being trained.
      layer_state: the inner state over ``n_active`` layer *slots* (slot ``j`` holds layer
        ``active[j]``): per-layer leaves appear as layers ``0..n_active-1``
        (``layers/0/...``), stacked ``[L, ...]`` leaves as ``[n_active, ...]``. Re-initialised
        at every resampling.
      always_state: the state of the always-active inner over the non-layer leaves
        (``MaskedNode`` at frozen and layer leaves); never reset.
    """

    count: jax.Array
    key: jax.Array
    active: jax.Array
    layer_state: Any
    always_state: Any


class LayerPartition(NamedTuple):
    """How :func:`lisa` sees a parameter tree (static: paths and shapes only).

    Attributes:
      treedef: the tree's structure.
      paths: ``/``-joined path of every leaf.
      kinds: per leaf ``"layer"`` (one layer's leaf), ``"stacked"`` (layer axis first),
        ``"always"`` (always trained) or ``"frozen"`` (never trained).
      layer_of: per leaf its layer index (``"layer"`` leaves) or ``None``.
      slot_paths: per ``"layer"``/``"stacked"`` leaf, a function ``slot -> path`` in the slot
        tree (``None`` elsewhere).
      n_layers: ``L``.
      layer_leaves: per layer, the leaf indices of that layer in a common order.
      stacked_leaves: indices of the stacked leaves.
    """

    treedef: Any
    paths: list
    kinds: list
    layer_of: list
    slot_paths: list
    n_layers: int
    layer_leaves: list
    stacked_leaves: list


def partition(
    tree: Any,
    *,
    layer_pattern: str = LAYER_PATTERN,
    stacked_pattern: str | None = STACKED_PATTERN,
    always_active: Targets = None,
    method: str = "lisa",
) -> LayerPartition:
    """Splits ``tree`` into sampled layers, always-active and frozen leaves; checks shapes.

    A leaf whose path matches ``layer_pattern`` belongs to the layer given by its first group;
    otherwise, one matching ``stacked_pattern`` holds every layer along axis 0; otherwise it
    is always active if ``always_active`` selects it (``None``: every such leaf) and frozen if
    not.

    Raises:
      ValueError: no layer leaf; layer indices not ``0..L-1``; layers that differ in paths,
        shapes or dtypes; a stacked leaf whose axis 0 is not ``L``.
    """
    pattern = re.compile(layer_pattern)
    if pattern.groups < 1:
        raise ValueError(f"{method}: layer_pattern must have a group capturing the layer index.")
    stacked = re.compile(stacked_pattern) if stacked_pattern else None
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_str(kp) for kp, _ in flat]
    leaves = [leaf for _, leaf in flat]
    always = (
        [True] * len(leaves)
        if always_active is None
        else treedef.flatten_up_to(resolve(always_active, tree, method=method))
    )
    kinds, layer_of, slot_paths, by_layer = [], [], [], {}
    for i, path in enumerate(paths):
        match = pattern.search(path)
        if match:
            head, tail = path[: match.start(1)], path[match.end(1) :]
            layer = int(match.group(1))
            kinds.append("layer")
            layer_of.append(layer)
            slot_paths.append(lambda j, head=head, tail=tail: f"{head}{j}{tail}")
            by_layer.setdefault(layer, {})[head + "*" + tail] = i
        elif stacked is not None and stacked.search(path):
            kinds.append("stacked")
            layer_of.append(None)
            slot_paths.append(lambda j, path=path: path)
        else:
            kinds.append("always" if always[i] else "frozen")
            layer_of.append(None)
            slot_paths.append(None)
    stacked_leaves = [i for i, k in enumerate(kinds) if k == "stacked"]
    if not by_layer and not stacked_leaves:
        listing = "\n".join(f"  {p}  {tuple(np.shape(x))}" for p, x in zip(paths, leaves))
        raise ValueError(
            f"{method}: no leaf matches layer_pattern {layer_pattern!r} or stacked_pattern "
            f"{stacked_pattern!r}; pass the patterns of your model's layers. Paths:\n{listing}"
        )
    layer_leaves = []
    if by_layer:
        if sorted(by_layer) != list(range(len(by_layer))):
            raise ValueError(
                f"{method}: layer indices must be 0..L-1, found {sorted(by_layer)} with "
                f"layer_pattern {layer_pattern!r}."
            )
        reference = by_layer[0]
        for layer in range(len(by_layer)):
            members = by_layer[layer]
            if members.keys() != reference.keys():
                odd = sorted(members.keys() ^ reference.keys())[0].replace("*", str(layer))
                raise ValueError(
                    f"{method}: layer {layer} does not have the leaves of layer 0 (near "
                    f"'{odd}'); every sampled layer must have the same structure."
                )
            for key, i in members.items():
                j = reference[key]
                if np.shape(leaves[i]) != np.shape(leaves[j]) or leaves[i].dtype != leaves[j].dtype:
                    raise ValueError(
                        f"{method}: leaf '{paths[i]}' {np.shape(leaves[i])} {leaves[i].dtype} "
                        f"differs from '{paths[j]}' {np.shape(leaves[j])} {leaves[j].dtype}; "
                        "every sampled layer must have the same shapes and dtypes."
                    )
            layer_leaves.append([members[key] for key in sorted(reference)])
    n_layers = len(by_layer) if by_layer else int(np.shape(leaves[stacked_leaves[0]])[0])
    for i in stacked_leaves:
        shape = np.shape(leaves[i])
        if len(shape) < 1 or shape[0] != n_layers:
            raise ValueError(
                f"{method}: stacked leaf '{paths[i]}' has shape {tuple(shape)}, but its axis 0 "
                f"must be the {n_layers} layers. Exclude it with stacked_pattern."
            )
    return LayerPartition(
        treedef, paths, kinds, layer_of, slot_paths, n_layers, layer_leaves, stacked_leaves
    )


def _nest(flat: dict[str, Any]) -> dict:
    """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}``."""
    root: dict = {}
    for path, value in flat.items():
        *parents, last = path.split("/")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return root


def _get(tree: dict, path: str) -> Any:
    for part in path.split("/"):
        tree = tree[part]
    return tree


def slot_leaves(part: LayerPartition, leaves: list, n_active: int) -> dict[str, Any]:
    """``{slot path: leaf}`` shaped like ``n_active`` layers (layer-0 leaves as templates)."""
    flat = {}
    for j in range(n_active):
        for i in part.layer_leaves[0] if part.layer_leaves else []:
            flat[part.slot_paths[i](j)] = leaves[i]
    for i in part.stacked_leaves:
        x = leaves[i]
        flat[part.slot_paths[i](0)] = jax.ShapeDtypeStruct((n_active, *x.shape[1:]), x.dtype)
    return flat


def lisa_trees(part: LayerPartition, tree: Any, n_active: int) -> tuple[dict, Any]:
    """``(slot_tree, always_tree)`` of ``ShapeDtypeStruct``: what the two inner states cover."""
    leaves = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in part.treedef.flatten_up_to(tree)]
    always = part.treedef.unflatten(
        [x if k == "always" else MaskedNode() for x, k in zip(leaves, part.kinds)]
    )
    return _nest(slot_leaves(part, leaves, n_active)), always


def lisa(
    inner: optax.GradientTransformation,
    *,
    n_active: int = 2,
    interval: int | jax.Array = 20,
    layer_pattern: str = LAYER_PATTERN,
    stacked_pattern: str | None = STACKED_PATTERN,
    always_active: Targets = None,
    always_active_inner: optax.GradientTransformation | None = None,
    probs: Sequence[float] | np.ndarray | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``inner`` on ``n_active`` sampled layers, resampled every ``interval`` steps (LISA).

    Every ``interval`` steps (at :math:`t = 0, K, 2K, \dots`) a set :math:`A` of ``n_active``
    distinct layers is drawn (uniformly, or with probabilities ``probs``, OwLore); then

    .. math::
        \Delta W_\ell = \mathrm{inner}(G_\ell) \ \ (\ell \in A),\qquad
        \Delta W_\ell = 0 \ \ (\ell \notin A),

    and the always-active leaves (embedding, final norm, head: everything outside the layers
    by default) are updated every step. The inner state covers only the ``n_active`` active
    layers (gathered into slots) plus the always-active leaves, so it is
    :math:`O(n_\text{active})`, not :math:`O(L)`. It is re-initialised whenever layers are
    resampled: moments and step count restart, as in the paper's runs, which restarted AdamW
    every interval (LMFlow's trainer instead keeps stale moments of every layer ever sampled;
    a layer drawn twice in a row also restarts here).

    Layers are found by path: ``layer_pattern`` captures the index of per-layer leaves
    (``layers/3/attn/q_proj/kernel``); leaves matching ``stacked_pattern`` are scan-stacked
    ``[L, ...]`` and are gathered/scattered along axis 0. ``inner`` sees per-layer leaves as
    layers ``0..n_active-1`` (so target patterns should not name layer indices), stacked ones
    as ``[n_active, ...]``, and receives the matching ``params``. Put weight decay inside
    ``inner`` (``optax.add_decayed_weights``) so frozen layers are not decayed, and the
    learning rate outside (its schedule must not restart), as :func:`lowrank_jax.lisa_adamw`.

    Args:
      inner: the optimizer of the active layers (and of the always-active leaves).
      n_active: layers trained at a time (the paper's γ; LMFlow default 2).
      interval: steps between resamplings (``K``; LMFlow default 20).
      layer_pattern: regex whose first group is the layer index in a per-layer leaf's path.
      stacked_pattern: regex of stacked ``[L, ...]`` leaves; ``None`` for none.
      always_active: which non-layer leaves train every step (a target spec, see
        :mod:`lowrank_jax.targets`); ``None`` (default) = all of them. The others are frozen.
      always_active_inner: optimizer of the always-active leaves (default ``inner``). Use it
        when ``inner`` targets layer leaves by a pattern that the other leaves do not match,
        e.g. ``galore(..., targets="attn|mlp")``.
      probs: ``L`` non-negative sampling weights (normalised; at least ``n_active`` positive);
        ``None`` samples uniformly.
      seed: seed of the sampling key.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`LisaState`.

    Example:
      >>> import jax.numpy as jnp, optax, lowrank_jax as lr
      >>> params = {"embed": jnp.zeros((10, 4)),
      ...           "layers": {str(i): {"w": jnp.zeros((4, 4))} for i in range(6)}}
      >>> state = lr.lisa(optax.scale_by_adam(), n_active=2).init(params)
      >>> sorted(state.layer_state.mu["layers"])  # two slots, not six layers
      ['0', '1']

    References:
      Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
      Model Fine-Tuning", NeurIPS 2024, Algorithm 1. https://arxiv.org/abs/2403.17919
    """
    n_active = _check_int("n_active", n_active, "lisa", " Use static_args=('n_active',).")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool):
        _check_int("interval", interval, "lisa")
    inner = optax.with_extra_args_support(inner)
    always_inner = (
        inner if always_active_inner is None else optax.with_extra_args_support(always_active_inner)
    )
    patterns = dict(
        layer_pattern=layer_pattern, stacked_pattern=stacked_pattern, always_active=always_active
    )

    def plan(tree: Any) -> tuple[LayerPartition, list, jax.Array | None]:
        part = partition(tree, **patterns)
        if n_active > part.n_layers:
            raise ValueError(
                f"lisa: n_active={n_active} exceeds the number of layers ({part.n_layers})."
            )
        p = None
        if probs is not None:
            p = np.asarray(probs, np.float64)
            if p.shape != (part.n_layers,) or not np.all(np.isfinite(p)) or np.any(p < 0):
                raise ValueError(
                    f"lisa: probs must be {part.n_layers} finite non-negative weights (one per "
                    f"layer), got shape {p.shape}."
                )
            if np.count_nonzero(p) < n_active:
                raise ValueError(
                    f"lisa: probs has {np.count_nonzero(p)} positive weights; n_active="
                    f"{n_active} layers are drawn without replacement."
                )
            p = jnp.asarray(p / p.sum(), jnp.float32)
        return part, part.treedef.flatten_up_to(tree), p

    def always_tree(part: LayerPartition, leaves: list) -> Any:
        return part.treedef.unflatten(
            [x if k == "always" else MaskedNode() for x, k in zip(leaves, part.kinds)]
        )

    def slot_template(part: LayerPartition, leaves: list) -> dict:
        flat = slot_leaves(part, leaves, n_active)
        return _nest({k: jnp.zeros(v.shape, v.dtype) for k, v in flat.items()})

    def init_fn(params: Any) -> LisaState:
        part, leaves, _ = plan(params)
        layer_state = inner.init(slot_template(part, leaves))
        try:
            always_state = always_inner.init(always_tree(part, leaves))
        except ValueError as err:
            if always_active_inner is not None:
                raise
            raise ValueError(
                f"lisa: the inner transformation rejected the always-active leaves ({err}). If "
                "it targets layer leaves by a pattern, pass always_active_inner= (for example "
                "scale_by_adam_hf()) for the embedding, norm and head."
            ) from err
        return LisaState(
            count=jnp.zeros([], jnp.int32),
            key=new_key(seed),
            active=jnp.arange(n_active, dtype=jnp.int32),
            layer_state=layer_state,
            always_state=always_state,
        )

    def update_fn(
        updates: Any, state: LisaState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, LisaState]:
        part, leaves, p = plan(updates)
        param_leaves = None if params is None else part.treedef.flatten_up_to(params)

        def resample() -> tuple[jax.Array, Any]:
            key = jax.random.fold_in(wrap_key(state.key), state.count)
            drawn = jax.random.choice(key, part.n_layers, (n_active,), replace=False, p=p)
            return jnp.sort(drawn).astype(jnp.int32), inner.init(slot_template(part, leaves))

        active, layer_state = jax.lax.cond(
            state.count % interval == 0, resample, lambda: (state.active, state.layer_state)
        )
        slot_updates, layer_state = inner.update(
            gather_slots(part, leaves, active, n_active),
            layer_state,
            None if param_leaves is None else gather_slots(part, param_leaves, active, n_active),
            **extra_args,
        )
        always_updates, always_state = always_inner.update(
            always_tree(part, leaves),
            state.always_state,
            None if param_leaves is None else always_tree(part, param_leaves),
            **extra_args,
        )
        out = scatter_slots(part, slot_updates, active, leaves, n_active)
        always_list = part.treedef.flatten_up_to(always_updates)
        for i, kind in enumerate(part.kinds):
            if kind == "always":
                out[i] = always_list[i]
            elif kind == "frozen":
                out[i] = jnp.zeros_like(leaves[i])
        return part.treedef.unflatten(out), LisaState(
            count=safe_increment(state.count),
            key=state.key,
            active=active,
            layer_state=layer_state,
            always_state=always_state,
        )

    return auto_sharded(optax.GradientTransformationExtraArgs(init_fn, update_fn))


# Shared with BAdam (_badam.py): moving layer leaves into and out of the active slots.


def gather_slots(part: LayerPartition, leaves: list, active: jax.Array, n_active: int) -> dict:
    """The leaves of the layers ``active`` (``int32[n_active]``) as a slot tree (LISA, BAdam)."""
    flat = {}
    for j in range(n_active):
        if part.layer_leaves:
            branches = [
                lambda members=members: [leaves[i] for i in members]
                for members in part.layer_leaves
            ]
            values = jax.lax.switch(active[j], branches)
            for i, value in zip(part.layer_leaves[0], values):
                flat[part.slot_paths[i](j)] = value
    for i in part.stacked_leaves:
        flat[part.slot_paths[i](0)] = jnp.take(leaves[i], active, axis=0)
    return _nest(flat)


def scatter_slots(
    part: LayerPartition, slots: dict, active: jax.Array, leaves: list, n_active: int
) -> list:
    """Inverse of :func:`gather_slots`: per leaf the slot values at the active layers and zeros
    elsewhere (``None`` at the non-layer leaves)."""
    out = [None] * len(leaves)
    template = part.layer_leaves[0] if part.layer_leaves else []
    per_slot = [[_get(slots, part.slot_paths[i](j)) for i in template] for j in range(n_active)]
    for layer, members in enumerate(part.layer_leaves):
        hit = active == layer
        zeros = lambda members=members: [
            jnp.zeros(np.shape(leaves[i]), x.dtype) for i, x in zip(members, per_slot[0])
        ]
        pick = lambda hit=hit: jax.lax.switch(
            jnp.argmax(hit), [lambda j=j: per_slot[j] for j in range(n_active)]
        )
        values = jax.lax.cond(jnp.any(hit), pick, zeros)
        for i, value in zip(members, values):
            out[i] = value.astype(leaves[i].dtype)
    for i in part.stacked_leaves:
        value = _get(slots, part.slot_paths[i](0)).astype(leaves[i].dtype)
        out[i] = jnp.zeros_like(leaves[i]).at[active].set(value)
    return out
