"""Exact optimizer-state byte accounting, without allocating anything.

:func:`state_bytes` measures what a transformation's ``init`` would allocate, by
``jax.eval_shape``; the ``*_bytes`` functions compute what each method's paper says it needs
from the parameter shapes alone. Tests assert the two agree exactly, which is how we prove
there are no hidden full-size buffers.

Example:
  >>> import jax, jax.numpy as jnp, lowrank_jax as lr
  >>> params = {"w": jax.ShapeDtypeStruct((1024, 512), jnp.float32)}
  >>> lr.memory.state_bytes(lr.galore_adamw(1e-3, rank=64), params, scalars=False)
  655360
  >>> lr.memory.galore_bytes(params, rank=64)  # P (512x64) + M, V (1024x64)
  655360
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from lowrank_jax import projection
from lowrank_jax.targets import Targets, resolve, resolve_dims

__all__ = [
    "adamw_bytes",
    "galore_bytes",
    "human",
    "param_bytes",
    "state_bytes",
    "tree_bytes",
]


def _nbytes(leaf: Any) -> int:
    return int(math.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize


def _is_bookkeeping(leaf: Any) -> bool:
    """Step counters (0-d) and raw PRNG key data (uint32[2])."""
    shape = np.shape(leaf)
    return len(shape) == 0 or (np.dtype(leaf.dtype) == np.uint32 and shape == (2,))


def tree_bytes(tree: Any, *, scalars: bool = True) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) leaf of ``tree``."""
    return sum(
        _nbytes(leaf)
        for leaf in jax.tree.leaves(tree)
        if scalars or not _is_bookkeeping(leaf)
    )


def state_bytes(tx: Any, params: Any, *, scalars: bool = True) -> int:
    """Bytes of ``tx.init(params)``, computed with ``jax.eval_shape`` (nothing is allocated).

    Args:
      tx: an optax transformation.
      params: arrays or ``jax.ShapeDtypeStruct`` leaves.
      scalars: include step counters and PRNG keys (a few bytes per transform).
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    return tree_bytes(jax.eval_shape(tx.init, abstract), scalars=scalars)


def param_bytes(params: Any, dtype: Any = None) -> int:
    """Bytes of the parameters themselves (optionally as if stored in ``dtype``)."""
    if dtype is None:
        return tree_bytes(params)
    size = np.dtype(dtype).itemsize
    return sum(int(math.prod(np.shape(x))) * size for x in jax.tree.leaves(params))


def adamw_bytes(params: Any, *, dtype: Any = None, moments: int = 2) -> int:
    """``moments`` full-size moments per leaf (Adam: 2), in ``dtype`` or the param dtype."""
    return moments * sum(
        int(math.prod(np.shape(x))) * np.dtype(dtype or x.dtype).itemsize
        for x in jax.tree.leaves(params)
    )


def galore_bytes(
    params: Any,
    *,
    rank: int,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    moments: int = 2,
    dtype: Any = None,
    projector_dtype: Any = None,
) -> int:
    """GaLore's state by the paper's count (Table 1): ``P`` plus ``moments`` low-rank moments.

    A targeted ``(..., in, out)`` matrix with ``r = min(rank, in, out)`` compressing side of
    size ``d`` and other side ``k`` stores ``d·r`` projector entries and ``moments·r·k`` moment
    entries (``full``: both bases and ``r·r`` moments); untargeted leaves store ``moments``
    full-size moments. ``dtype`` / ``projector_dtype`` default to each parameter's dtype.
    """
    mask = jax.tree.leaves(resolve(targets, params, method="galore_bytes"))
    dims_list = jax.tree.structure(params).flatten_up_to(resolve_dims(dims, params))
    total = 0
    for leaf, selected, d in zip(jax.tree.leaves(params), mask, dims_list, strict=True):
        shape = tuple(np.shape(leaf))
        m_size = np.dtype(dtype or leaf.dtype).itemsize
        p_size = np.dtype(projector_dtype or leaf.dtype).itemsize
        if not selected or d is None:
            total += moments * int(math.prod(shape)) * m_size
            continue
        d = d.normalize(len(shape))
        n_in, n_out = shape[d.in_axis], shape[d.out_axis]
        batch = int(math.prod(shape)) // (n_in * n_out)
        r = min(rank, n_in, n_out)
        side = projection.choose_side(proj_type, n_in, n_out)
        basis = {"in": n_in, "out": n_out, "both": n_in + n_out}[side]
        kept = {"in": n_out, "out": n_in, "both": r}[side]
        total += batch * (basis * r * p_size + moments * r * kept * m_size)
    return total


def human(n_bytes: float) -> str:
    """``1234567`` -> ``'1.23 MB'`` (decimal units, as the GaLore paper)."""
    units = ["B", "KB", "MB", "GB"]
    while abs(n_bytes) >= 1000 and len(units) > 1:
        n_bytes /= 1000
        units.pop(0)
    return f"{int(n_bytes)} B" if units[0] == "B" else f"{n_bytes:.2f} {units[0]}"
