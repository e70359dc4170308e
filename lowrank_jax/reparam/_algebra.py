"""Shared plumbing of adapter algebra (merging, federated aggregation): LoRA factors per site.

Every combiner works on the factors of plain LoRA adapters in the canonical Flax layout,
``ΔK = s·A B`` with ``A: (..., in, r)``, ``B: (..., r, out)``, and returns a new plain LoRA
:class:`~lowrank_jax.reparam.Adapters` (its scale folded into the factors or kept, as each
method says). Leading axes of a site (scan-stacked layers) are batch axes: one matrix each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.reparam.core import Adapters, Site
from lowrank_jax.reparam.dora import DoRA
from lowrank_jax.reparam.lora import _RESIDUAL, LoRA, _init_name
from lowrank_jax.reparam.method import f32

__all__ = ["Factors", "adapter_list", "by_path", "lora_adapters", "lora_factors", "normalized"]


class Factors(NamedTuple):
    """One adapter's LoRA factors at one site: ``ΔK = scale·A@B`` (float32)."""

    index: int
    site: Site
    a: jax.Array
    b: jax.Array
    scale: float


def adapter_list(adapters: Any, weights: Any, what: str) -> tuple[list[Adapters], list[float]]:
    """``(adapters, weights)`` from a sequence or a ``name -> Adapters`` mapping.

    ``weights`` may be ``None`` (all 1), a sequence, or a mapping by name.
    """
    names = list(adapters) if isinstance(adapters, Mapping) else None
    items = list(adapters.values()) if names is not None else list(adapters)
    if not items or not all(isinstance(a, Adapters) for a in items):
        raise ValueError(
            f"{what}: adapters must be a non-empty sequence of Adapters or a mapping "
            f"name -> Adapters, got {type(adapters).__name__}."
        )
    if weights is None:
        weights = [1.0] * len(items)
    elif isinstance(weights, Mapping):
        if names is None or set(weights) != set(names):
            raise ValueError(f"{what}: weights given by name need adapters by the same names.")
        weights = [weights[n] for n in names]
    weights = [float(w) for w in weights]
    if len(weights) != len(items):
        raise ValueError(f"{what}: got {len(weights)} weights for {len(items)} adapters.")
    return items, weights


def normalized(weights: Sequence[float], what: str) -> list[float]:
    """``p_k = n_k / Σ n`` (client dataset sizes or any non-negative weights)."""
    w = np.asarray(weights, np.float64)
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(
            f"{what}: client weights must be finite, non-negative and not all zero (dataset "
            f"sizes, say); got {list(weights)}."
        )
    return [float(x) for x in w / w.sum()]


def lora_factors(site: Site, frozen: dict, trainable: dict, what: str) -> tuple:
    """``(A, B, scale)`` of a plain LoRA site (float32); a clear error for anything else."""
    m = site.method
    if not isinstance(m, LoRA) or isinstance(m, DoRA):
        raise ValueError(
            f"{what}: leaf '{site.path}' is adapted by {type(m).__name__}; this combines plain "
            f"LoRA adapters (reparam.lora, ffa_lora). DoRA's magnitude does not combine linearly."
        )
    if _init_name(m.init_weights) in _RESIDUAL:
        raise ValueError(
            f"{what}: leaf '{site.path}' uses init={m.init_weights!r}, whose base weights were "
            f"changed; convert with reparam.to_base_lora(adapters, initial_adapters) first."
        )
    a, b = m._ab(frozen, trainable)
    return f32(a), f32(b), float(m.scale)


def by_path(items: list[Adapters], what: str, *, factors: bool = True) -> dict[str, list]:
    """``{path: [Factors | (index, site)]}`` over every site of every adapter, sites checked.

    Sites at one path must agree on the base shape and dims (the adapters share a base).
    """
    table: dict[str, list] = {}
    first: dict[str, Site] = {}
    for index, adapters in enumerate(items):
        for site in adapters.sites:
            seen = first.setdefault(site.path, site)
            if (seen.shape, seen.dims) != (site.shape, site.dims):
                raise ValueError(
                    f"{what}: leaf '{site.path}' has base shape {site.shape} with dims "
                    f"{tuple(site.dims)} in adapter {index} but {seen.shape} with dims "
                    f"{tuple(seen.dims)} in another; the adapters are for different models."
                )
            if factors:
                frozen, trainable = adapters.frozen[site.path], adapters.trainable[site.path]
                entry = Factors(index, site, *lora_factors(site, frozen, trainable, what))
            else:
                entry = (index, site)
            table.setdefault(site.path, []).append(entry)
    return table


def lora_adapters(out: dict[str, tuple]) -> Adapters:
    """Plain LoRA :class:`Adapters` from ``{path: (template_site, A, B, alpha)}``.

    The rank is ``A.shape[-1]``; ``alpha`` sets the scale ``alpha / rank`` (``None``: scale 1).
    The template site supplies path, dims, shape and the dropout rate.
    """
    trainable, sites = {}, []
    for path in sorted(out):
        site, a, b, alpha = out[path]
        rank = int(a.shape[-1])
        dropout = getattr(site.method, "dropout", 0.0)
        method = LoRA(rank=rank, alpha=float(rank if alpha is None else alpha), dropout=dropout)
        trainable[path] = {"A": jnp.asarray(a), "B": jnp.asarray(b)}
        sites.append(site._replace(method=method))
    return Adapters(trainable, {s.path: {} for s in sites}, tuple(sites))


def per_matrix(fn: Any, *arrays: jax.Array) -> Any:
    """Applies ``fn`` to each matrix (last two axes) of ``arrays``, one at a time, restacked.

    Decompositions run one matrix at a time (batched LAPACK calls deadlock on multi-device
    CPU processes, see DESIGN.md).
    """
    batch = arrays[0].shape[:-2]
    if not batch:
        return fn(*arrays)
    outs = [fn(*(x[idx] for x in arrays)) for idx in np.ndindex(*batch)]
    if isinstance(outs[0], tuple):
        return tuple(
            jnp.stack([o[i] for o in outs]).reshape(*batch, *outs[0][i].shape)
            for i in range(len(outs[0]))
        )
    return jnp.stack(outs).reshape(*batch, *outs[0].shape)
