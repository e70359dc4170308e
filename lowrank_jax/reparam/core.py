"""Sites, adapters, and the functional apply / merge / unmerge shared by every method.

:class:`Adapters` is a pytree of ``trainable`` and ``frozen`` arrays keyed by leaf path; it
carries its sites (path, method, dims, base shape) as static data, so :func:`apply` needs nothing
else. Several adapters on one base combine PEFT's way, each relative to the base:

.. math:: W' = W + \\sum_k w_k\\,(c_k \\odot W + \\Delta_k - W)

:func:`merge` computes exactly that in float32, casts once, and keeps the scales ``c_k``, so
:func:`unmerge` inverts it exactly -- several DoRA adapters included (peft#3608).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from lowrank_jax.reparam.method import Method, f32
from lowrank_jax.targets import MatrixDims, path_str

__all__ = [
    "Adapters",
    "MergeRecord",
    "Site",
    "apply",
    "merge",
    "num_trainable",
    "trainable_mask",
    "unmerge",
]


class Site(NamedTuple):
    """One adapted leaf: its path, method (with per-path overrides), dims and base shape."""

    path: str
    method: Method
    dims: MatrixDims
    shape: tuple[int, ...]
    dtype: str

    def canonical(self, w: jax.Array) -> jax.Array:
        """``w`` with its in and out axes last: ``(..., in, out)``."""
        return self.dims.to_canonical(w)

    def layout(self, w: jax.Array) -> jax.Array:
        """Inverse of :meth:`canonical`."""
        return self.dims.from_canonical(w)

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        return self.dims.canonical_shape(self.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapters:
    """Adapter arrays keyed by leaf path; the sites (methods, dims, shapes) are static data.

    Attributes:
      trainable: ``{path: {name: array}}`` -- what the optimizer updates.
      frozen: ``{path: {name: array}}`` -- fixed factors, seeds (never trained).
      sites: one :class:`Site` per path (static).

    Differentiate with respect to ``adapters.trainable`` and rebuild with :meth:`replace`.
    """

    trainable: dict
    frozen: dict
    sites: tuple = dataclasses.field(metadata={"static": True})

    def replace(self, **changes: Any) -> Adapters:
        return dataclasses.replace(self, **changes)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(site.path for site in self.sites)


class MergeRecord(NamedTuple):
    """What :func:`unmerge` needs: the column scales ``c`` (DoRA) and the merge weights."""

    scales: tuple  # one {path: c} dict per adapter
    weights: tuple


def _where(path: str) -> str:
    return f"leaf '{path}'"


def _as_list(adapters: Any, weights: Any) -> list[tuple[Adapters, Any]]:
    if isinstance(adapters, Adapters):
        items = [adapters]
    elif isinstance(adapters, Mapping):
        items = list(adapters.values())
    else:
        items = list(adapters)
    if not items or not all(isinstance(a, Adapters) for a in items):
        raise ValueError(
            "adapters must be an Adapters, a mapping of name -> Adapters or a sequence of them."
        )
    if weights is None:
        weights = [1.0] * len(items)
    elif isinstance(weights, Mapping):
        weights = [weights[name] for name in adapters]
    weights = list(weights)
    if len(weights) != len(items):
        raise ValueError(f"got {len(weights)} weights for {len(items)} adapters.")
    return list(zip(items, weights))


def _contributions(params: Any, items: list) -> dict[str, list]:
    """``{path: [(index, weight, site, frozen, trainable)]}``, checked against ``params``."""
    found = {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    table: dict[str, list] = {}
    for index, (adapters, weight) in enumerate(items):
        for site in adapters.sites:
            if site.path not in found:
                raise ValueError(
                    f"adapter/base mismatch: the adapter has a site at {_where(site.path)} but the "
                    f"parameters have no such leaf. Apply adapters to the parameter tree they were "
                    f"initialised on (paths: {sorted(found)[:20]}...)."
                )
            leaf = found[site.path]
            if tuple(np.shape(leaf)) != site.shape:
                raise ValueError(
                    f"adapter/base mismatch at {_where(site.path)}: the parameter has shape "
                    f"{tuple(np.shape(leaf))} but the adapter was made for {site.shape}. The "
                    f"adapter belongs to a different model or layout."
                )
            entry = (index, weight, site, adapters.frozen[site.path], adapters.trainable[site.path])
            table.setdefault(site.path, []).append(entry)
    return table


def _terms(wc: jax.Array, entries: list, scales: tuple | None) -> tuple[Any, Any, dict]:
    """``(Σ_k w_k (c_k - 1), Σ_k w_k Δ_k, {k: c_k})`` for one canonical float32 weight."""
    gain, delta, used = None, None, {}

    def add(total: Any, term: Any, weight: Any) -> Any:
        term = term if isinstance(weight, (int, float)) and weight == 1 else weight * term
        return term if total is None else total + term

    for index, weight, site, frozen, trainable in entries:
        given = None if scales is None else scales[index].get(site.path)
        c, d = site.method.affine(wc, frozen, trainable, given)
        delta = add(delta, d, weight)
        if c is not None:
            used[index] = c
            gain = add(gain, c - 1.0, weight)
    return gain, delta, used


def _combine(w: jax.Array, entries: list) -> tuple[jax.Array, dict]:
    """``W + Σ_k w_k ((c_k - 1) W + Δ_k)`` in float32, cast once; and the ``c_k`` used."""
    site = entries[0][2]
    wc = f32(site.canonical(w))
    gain, delta, used = _terms(wc, entries, None)
    out = wc + delta if gain is None else wc * (1.0 + gain) + delta
    return site.layout(out).astype(w.dtype), used


def apply(params: Any, adapters: Any, *, weights: Any = None) -> Any:
    r"""Returns ``params`` with every adapted leaf replaced by its effective weight.

    .. math:: W' = W + \sum_k w_k \,(c_k \odot W + \Delta_k - W)

    computed in float32 and cast to the leaf's dtype. Works on any pytree: a plain dict, linen
    ``variables``, ``nnx.state(model)`` (then ``nnx.update(model, out)``).

    Args:
      params: the base parameters.
      adapters: an :class:`Adapters`, a mapping ``name -> Adapters`` or a sequence of them.
      weights: optional per-adapter weights (sequence, or mapping by name); default 1.

    Returns:
      A pytree with the structure of ``params``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((8, 4))}
      >>> params, adapters = reparam.lora(rank=2).init(jax.random.key(0), params)
      >>> bool(jnp.all(reparam.apply(params, adapters)["w"] == params["w"]))  # B = 0
      True
    """
    table = _contributions(params, _as_list(adapters, weights))

    def one(kp: Any, leaf: Any) -> Any:
        entries = table.get(path_str(kp))
        return leaf if entries is None else _combine(leaf, entries)[0]

    return jax.tree_util.tree_map_with_path(one, params)


def merge(params: Any, adapters: Any, *, weights: Any = None) -> tuple[Any, MergeRecord]:
    """Folds adapters into the base weights (float32 accumulation, one cast).

    Args:
      params: the base parameters.
      adapters: an :class:`Adapters`, a mapping ``name -> Adapters`` or a sequence.
      weights: optional per-adapter weights (a weighted merge).

    Returns:
      ``(merged_params, record)``; ``unmerge(merged_params, adapters, record)`` restores the
      base (within one rounding of the base dtype).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.sin(jnp.arange(32.0)).reshape(8, 4)}
      >>> _, adapters = reparam.dora(rank=2).init(jax.random.key(1), params)
      >>> merged, record = reparam.merge(params, adapters)
      >>> back = reparam.unmerge(merged, adapters, record)
      >>> bool(jnp.allclose(back["w"], params["w"], atol=1e-6))
      True
    """
    items = _as_list(adapters, weights)
    table = _contributions(params, items)
    scales: list[dict] = [{} for _ in items]

    def one(kp: Any, leaf: Any) -> Any:
        entries = table.get(path_str(kp))
        if entries is None:
            return leaf
        out, used = _combine(leaf, entries)
        for index, c in used.items():
            scales[index][entries[0][2].path] = c
        return out

    merged = jax.tree_util.tree_map_with_path(one, params)
    return merged, MergeRecord(tuple(scales), tuple(w for _, w in items))


def unmerge(params: Any, adapters: Any, record: MergeRecord) -> Any:
    r"""Exact inverse of :func:`merge`: ``W = (W' - Σ w_k Δ_k) / (1 + Σ w_k (c_k - 1))``.

    A method whose ``Δ`` depends on ``W`` (``weight_dependent``: WeGeFT, Hydra, MiSS-bat)
    inverts its own merge (:meth:`Method.invert`); such a leaf must carry one adapter.
    """
    items = _as_list(adapters, record.weights)
    table = _contributions(params, items)

    def one(kp: Any, leaf: Any) -> Any:
        entries = table.get(path_str(kp))
        if entries is None:
            return leaf
        site = entries[0][2]
        wc = f32(site.canonical(leaf))  # only its shape reaches the methods, with c recorded
        if any(entry[2].method.weight_dependent for entry in entries):
            return site.layout(_invert(wc, entries)).astype(leaf.dtype)
        gain, delta, _ = _terms(wc, entries, record.scales)
        base = wc - delta if gain is None else (wc - delta) / (1.0 + gain)
        return site.layout(base).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def _invert(merged: jax.Array, entries: list) -> jax.Array:
    """Unmerge of a weight-dependent update (``Δ`` a function of ``W``): the method inverts it."""
    if len(entries) != 1:
        names = [type(entry[2].method).__name__ for entry in entries]
        raise ValueError(
            f"unmerge at {_where(entries[0][2].path)}: {names} were merged together and one of "
            f"them depends on W (weight_dependent), so the merge is not invertible term by term. "
            f"Merge such adapters one at a time (merge, then merge the result) and unmerge in "
            f"reverse order."
        )
    _, weight, site, frozen, trainable = entries[0]
    return site.method.invert(merged, frozen, trainable, weight)


def trainable_mask(adapters: Adapters) -> Adapters:
    """An :class:`Adapters`-shaped tree of bools: ``True`` on trainable leaves (for optax)."""
    return adapters.replace(
        trainable=jax.tree.map(lambda _: True, adapters.trainable),
        frozen=jax.tree.map(lambda _: False, adapters.frozen),
    )


def num_trainable(adapters: Adapters) -> int:
    """The number of trainable scalars."""
    return int(sum(np.size(x) for x in jax.tree.leaves(adapters.trainable)))
