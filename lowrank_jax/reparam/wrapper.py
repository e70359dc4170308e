"""The wrapper shared by every method: targeting, per-path overrides, init, calibration, save.

A :class:`Reparam` pairs a :class:`~lowrank_jax.reparam.Method` with ``targets`` (resolved by
:mod:`lowrank_jax.targets`, the resolver every method uses), ``dims`` and per-path overrides
(``rank_pattern``/``alpha_pattern``). ``lora(...)``, ``dora(...)``, ... return one.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.reparam import io
from lowrank_jax.reparam.calibration import Calibration
from lowrank_jax.reparam.core import (
    Adapters,
    Site,
    apply,
    merge,
    trainable_mask,
    unmerge,
)
from lowrank_jax.reparam.method import Method
from lowrank_jax.targets import MatrixDims, Targets, path_str, resolve, resolve_dims

__all__ = ["Reparam", "overrides_from_patterns"]


def _where(path: str) -> str:
    return f"leaf '{path}'"


def _site_key(key: jax.Array, path: str) -> jax.Array:
    # Keyed by path, not position, so adding a target never changes another site's init.
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _is_weight(path: str, leaf: Any) -> bool:
    """A float matrix that is not a bias (``nnx.Einsum`` biases can be 2-D)."""
    if np.ndim(leaf) < 2 or path.rsplit("/", 1)[-1] == "bias":
        return False
    return jnp.issubdtype(np.dtype(leaf.dtype), jnp.floating)


def _patterns(targets: Targets) -> list[str] | None:
    if isinstance(targets, str):
        return [targets]
    if isinstance(targets, Sequence) and targets and all(isinstance(t, str) for t in targets):
        return list(targets)
    return None


def _check_patterns(patterns: Sequence[str], leaves: dict, what: str) -> None:
    """Every regex must select some float matrix (PEFT only warns on a miss; peft#1959)."""
    matrices = [p for p, leaf in leaves.items() if _is_weight(p, leaf)]
    for pattern in patterns:
        if not any(re.search(pattern, p) for p in matrices):
            raise ValueError(
                f"{what}: pattern {pattern!r} matches no floating-point weight matrix (ndim >= 2, "
                f"not a bias). Fix or remove it; paths are '/'-joined keys, e.g. {matrices[:8]}."
            )


@dataclasses.dataclass(frozen=True)
class Reparam:
    """A method plus what it targets: the object that ``lora(...)``, ``dora(...)``, ... return.

    Attributes:
      method: the :class:`Method` applied to every targeted leaf.
      targets: ``None`` (every float ≥2-D leaf that is not an embedding, head, norm or bias),
        a regex or a list of regexes (searched in the leaf path; they select float matrices
        that are not biases, and each must select one), a callable ``(path, leaf)`` or a bool
        pytree -- see :mod:`lowrank_jax.targets`. Callables and bool trees are taken
        literally: a selected leaf that is not a float matrix is an error.
      dims: :class:`~lowrank_jax.MatrixDims` (default ``(-2, -1)``: Flax ``(in, out)``), a
        callable or a pytree of them; other axes are batch axes.
      overrides: ``((regex, {field: value}), ...)``; the first regex found in a leaf's path
        overrides the method's fields there (``rank_pattern``/``alpha_pattern``).
      dtype: dtype of the adapter arrays (float32 by default, whatever the base dtype).
    """

    method: Method
    targets: Targets = None
    dims: Any = None
    overrides: tuple = ()
    dtype: Any = jnp.float32

    @property
    def name(self) -> str:
        return type(self.method).__name__

    def method_for(self, path: str) -> Method:
        fields: dict[str, Any] = {}
        for pattern, values in self.overrides:  # per field, the first matching pattern wins
            if re.search(pattern, path):
                fields = {**dict(values), **fields}
        return dataclasses.replace(self.method, **fields) if fields else self.method

    def sites(self, params: Any) -> list[Site]:
        """The sites ``targets`` selects in ``params``, checked (no arrays are touched)."""
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        paths = [path_str(kp) for kp, _ in flat]
        leaves = dict(zip(paths, (leaf for _, leaf in flat)))
        _check_patterns([p for p, _ in self.overrides], leaves, f"{self.name} rank/alpha pattern")
        targets, patterns = self.targets, _patterns(self.targets)
        if patterns is not None:
            # A regex names layers, as PEFT's target_modules: it selects the weight matrices
            # whose path it matches (``q_proj`` takes q_proj/kernel, not q_proj/bias).
            _check_patterns(patterns, leaves, f"{self.name} targets")
            compiled = [re.compile(p) for p in patterns]
            targets = lambda path, leaf: _is_weight(path, leaf) and any(
                c.search(path) for c in compiled
            )
        mask = resolve(targets, params, method=self.name)
        dims = resolve_dims(self.dims, params)
        flat_mask = jax.tree.leaves(mask)
        is_dims = lambda x: isinstance(x, MatrixDims) or x is None
        flat_dims = jax.tree.leaves(dims, is_leaf=is_dims)
        out = []
        for (_, leaf), path, selected, dim in zip(flat, paths, flat_mask, flat_dims):
            if not selected:
                continue
            dtype = np.dtype(leaf.dtype)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(
                    f"{self.name}: {_where(path)} has dtype {dtype}; only floating-point weights "
                    f"can be reparameterized. Exclude it with `targets=`."
                )
            if np.ndim(leaf) < 2:
                raise ValueError(
                    f"{self.name}: {_where(path)} has shape {np.shape(leaf)}; a reparameterization "
                    f"needs a matrix (ndim >= 2). Exclude it with `targets=`."
                )
            dim = (dim or MatrixDims()).normalize(np.ndim(leaf), path)
            site = Site(path, self.method_for(path), dim, tuple(np.shape(leaf)), dtype.name)
            site.method.check(path, site.canonical_shape)
            out.append(site)
        return out

    def init(self, key: jax.Array, params: Any, *, calibration: Any = None) -> tuple:
        """Creates the adapters; returns ``(params, adapters)``.

        ``params`` comes back unchanged except for methods that start from a residual base
        (PiSSA, OLoRA, LoRA-GA), where the targeted leaves become ``W - ΔW_0`` so that the
        adapted model equals the base model at init.

        Args:
          key: PRNG key (each site uses ``fold_in(key, crc32(path))``).
          params: the base parameters (any pytree).
          calibration: a :class:`~lowrank_jax.reparam.Calibration` for data-driven inits.

        Returns:
          ``(params, adapters)``: the (possibly residual) base and the :class:`Adapters`.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from lowrank_jax import reparam
          >>> params = {"w": jnp.sin(jnp.arange(48.0)).reshape(8, 6)}
          >>> base, adapters = reparam.pissa(rank=2).init(jax.random.key(1), params)
          >>> bool(jnp.allclose(reparam.apply(base, adapters)["w"], params["w"], atol=1e-5))
          True
        """
        sites = self.sites(params)
        leaves = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        kind = self.method.calibration
        stats = {}
        if kind is not None:
            if calibration is None:
                raise ValueError(
                    f"{self.name} with these settings is data-driven: pass calibration=... (a "
                    f"reparam.Calibration fed with {kind}; see Reparam.calibration)."
                )
            stats = {s.path: calibration.stat(s.path, kind, s) for s in sites}
            plan = self.method.plan(stats, {s.path: s.canonical_shape for s in sites})
            sites = [
                s._replace(method=dataclasses.replace(s.method, **plan[s.path]))
                if s.path in plan
                else s
                for s in sites
            ]
            sites = [s for s in sites if getattr(s.method, "rank", 1) > 0]
        trainable, frozen, bases = {}, {}, {}
        for site in sites:
            w = site.canonical(leaves[site.path])
            f, t = site.method.init(
                _site_key(key, site.path), w, path=site.path, stats=stats.get(site.path)
            )
            frozen[site.path], trainable[site.path] = self._cast(f), self._cast(t)
            res = site.method.residual(w, frozen[site.path], trainable[site.path])
            if res is not w:
                bases[site.path] = site.layout(res).astype(w.dtype)
        if bases:
            params = jax.tree_util.tree_map_with_path(
                lambda kp, x: bases.get(path_str(kp), x), params
            )
        return params, Adapters(trainable, frozen, tuple(sites))

    def _cast(self, arrays: dict) -> dict:
        return {
            k: v.astype(self.dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
            for k, v in arrays.items()
        }

    def calibration(self, params: Any) -> Calibration:
        """An empty :class:`~lowrank_jax.reparam.Calibration` for this reparam's sites."""
        return Calibration(self.sites(params))

    apply = staticmethod(apply)
    merge = staticmethod(merge)
    unmerge = staticmethod(unmerge)
    trainable_mask = staticmethod(trainable_mask)

    save = staticmethod(io.save)
    load = staticmethod(io.load)


def overrides_from_patterns(**patterns: Mapping[str, Any] | None) -> tuple:
    """``rank_pattern={regex: 4}, alpha_pattern={...}`` -> ``Reparam.overrides``."""
    merged: dict[str, dict] = {}
    for field, table in patterns.items():
        for regex, value in (table or {}).items():
            merged.setdefault(regex, {})[field] = value
    return tuple((regex, tuple(sorted(fields.items()))) for regex, fields in merged.items())
