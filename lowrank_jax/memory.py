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
from typing import Any, NamedTuple

import jax
import numpy as np

from lowrank_jax import projection
from lowrank_jax.targets import Targets, path_str, resolve, resolve_dims

__all__ = [
    "CompiledMemory",
    "adam8bit_bytes",
    "adamw_bytes",
    "apollo_bytes",
    "badam_bytes",
    "compiled_memory",
    "fira_bytes",
    "flora_accumulation_bytes",
    "flora_bytes",
    "galore8bit_bytes",
    "galore_bytes",
    "ggpo_bytes",
    "gradnorm_lorp_bytes",
    "human",
    "int8_weight_bytes",
    "lisa_bytes",
    "lorafa_bytes",
    "param_bytes",
    "qgalore_bytes",
    "sst_bytes",
    "sst_param_bytes",
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


def _lowrank_sizes(rank: int, proj_type: str, n_in: int, n_out: int) -> tuple[int, int, int]:
    """``(r, basis, kept)`` of one projected ``(n_in, n_out)`` matrix: the clipped rank, the
    length of the projector's basis vectors and the moments' uncompressed dimension."""
    r = min(rank, n_in, n_out)
    side = projection.choose_side(proj_type, n_in, n_out)
    basis = {"in": n_in, "out": n_out, "both": n_in + n_out}[side]
    kept = {"in": n_out, "out": n_in, "both": r}[side]
    return r, basis, kept


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
        r, basis, kept = _lowrank_sizes(rank, proj_type, n_in, n_out)
        total += batch * (basis * r * p_size + moments * r * kept * m_size)
    return total


def _matrices(params: Any, targets: Targets, dims: Any, method: str):
    """Yields ``(leaf, plan)`` per leaf; ``plan`` is ``None`` or ``(batch, d_in, d_out)``."""
    mask = jax.tree.leaves(resolve(targets, params, method=method))
    dims_list = jax.tree.structure(params).flatten_up_to(resolve_dims(dims, params))
    for leaf, selected, d in zip(jax.tree.leaves(params), mask, dims_list, strict=True):
        shape = tuple(np.shape(leaf))
        if not selected or d is None:
            yield leaf, None
            continue
        d = d.normalize(len(shape))
        n_in, n_out = shape[d.in_axis], shape[d.out_axis]
        yield leaf, (int(math.prod(shape)) // (n_in * n_out), n_in, n_out)


def _size(leaf: Any) -> int:
    return int(math.prod(np.shape(leaf)))


def fira_bytes(
    params: Any,
    *,
    rank: int,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    dtype: Any = None,
    projector_dtype: Any = None,
) -> int:
    """Fira's state (paper Table 2): GaLore's ``P`` and two low-rank moments, plus one float32
    limiter norm per targeted matrix (``2nr + mr + 1`` elements per ``m x n``, ``m <= n``)."""
    n_matrices = sum(
        plan[0] for _, plan in _matrices(params, targets, dims, "fira_bytes") if plan
    )
    return galore_bytes(
        params, rank=rank, proj_type=proj_type, targets=targets, dims=dims, dtype=dtype,
        projector_dtype=projector_dtype,
    ) + 4 * n_matrices


def apollo_bytes(
    params: Any,
    *,
    rank: int,
    proj: str = "random",
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    dtype: Any = None,
    projector_dtype: Any = None,
) -> int:
    """APOLLO's state: two rank-``r`` moments and one float32 limiter norm per targeted matrix,
    plus the stored ``P`` only with ``proj="svd"`` (a random ``P`` is regenerated from the key):
    ``2·r·max(m, n) + 1`` elements per matrix (paper), ``+ r·min(m, n)`` with SVD; untargeted
    leaves store two full moments. ``projector_dtype`` defaults to the parameter dtype."""
    total = 0
    for leaf, plan in _matrices(params, targets, dims, "apollo_bytes"):
        m_size = np.dtype(dtype or leaf.dtype).itemsize
        if plan is None:
            total += 2 * _size(leaf) * m_size
            continue
        batch, n_in, n_out = plan
        r = min(rank, n_in, n_out)
        side = projection.choose_side(proj_type, n_in, n_out)
        basis, kept = (n_in, n_out) if side == "in" else (n_out, n_in)
        p_size = np.dtype(projector_dtype or leaf.dtype).itemsize
        stored = basis * r * p_size if proj == "svd" else 0
        total += batch * (2 * r * kept * m_size + stored + 4)
    return total


def _quantized_bytes(size: int, block_size: int, min_8bit_size: int) -> int:
    if size < min_8bit_size:
        return 4 * size
    return size + 4 * math.ceil(size / block_size)


def adam8bit_bytes(params: Any, *, block_size: int = 256, min_8bit_size: int = 4096) -> int:
    """8-bit Adam's two moments: per element one byte, per ``block_size`` block one float32
    scale; leaves under ``min_8bit_size`` elements keep float32 moments."""
    return sum(
        2 * _quantized_bytes(_size(x), block_size, min_8bit_size) for x in jax.tree.leaves(params)
    )


def galore8bit_bytes(
    params: Any,
    *,
    rank: int,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    projector_dtype: Any = None,
    block_size: int = 256,
    min_8bit_size: int = 4096,
) -> int:
    """8-bit GaLore: ``P`` plus two 8-bit low-rank moments per targeted matrix (each
    ``r x max(m, n)`` moment quantized as one block-wise tensor); 8-bit moments elsewhere."""
    total = 0
    for leaf, plan in _matrices(params, targets, dims, "galore8bit_bytes"):
        if plan is None:
            total += 2 * _quantized_bytes(_size(leaf), block_size, min_8bit_size)
            continue
        batch, n_in, n_out = plan
        r, basis, kept = _lowrank_sizes(rank, proj_type, n_in, n_out)
        p_size = np.dtype(projector_dtype or leaf.dtype).itemsize
        moment = _quantized_bytes(batch * r * kept, block_size, min_8bit_size)
        total += batch * basis * r * p_size + 2 * moment
    return total


def lisa_bytes(
    params: Any,
    *,
    n_active: int,
    layer_bytes: Any = None,
    always_bytes: Any = None,
    layer_pattern: str | None = None,
    stacked_pattern: str | None = "default",
    always_active: Targets = None,
) -> int:
    """LISA's state: the inner state of ``n_active`` layers plus that of the always-active leaves
    (and ``n_active`` int32 indices). Nothing for the other ``L - n_active`` layers.

    Args:
      params: parameters (arrays or ``ShapeDtypeStruct``).
      n_active: active layers.
      layer_bytes: ``tree -> bytes`` of the inner state over the active-layer slots (default
        :func:`adamw_bytes`; e.g. ``lambda t: galore_bytes(t, rank=256)`` for OwLore).
      always_bytes: the same for the always-active leaves (default: ``layer_bytes``).
      layer_pattern, stacked_pattern, always_active: as :func:`lowrank_jax.lisa` (defaults
        the same).
    """
    from lowrank_jax.transforms._lisa import LAYER_PATTERN, STACKED_PATTERN, lisa_trees, partition

    layer_bytes = layer_bytes or adamw_bytes
    always_bytes = always_bytes or layer_bytes
    part = partition(
        params,
        layer_pattern=layer_pattern or LAYER_PATTERN,
        stacked_pattern=STACKED_PATTERN if stacked_pattern == "default" else stacked_pattern,
        always_active=always_active,
        method="lisa_bytes",
    )
    slots, always = lisa_trees(part, params, n_active)
    return layer_bytes(slots) + always_bytes(always) + 4 * n_active


def human(n_bytes: float) -> str:
    """``1234567`` -> ``'1.23 MB'`` (decimal units, as the GaLore paper)."""
    units = ["B", "KB", "MB", "GB"]
    while abs(n_bytes) >= 1000 and len(units) > 1:
        n_bytes /= 1000
        units.pop(0)
    return f"{int(n_bytes)} B" if units[0] == "B" else f"{n_bytes:.2f} {units[0]}"


class CompiledMemory(NamedTuple):
    """XLA's memory analysis of one compiled program, in bytes per device.

    Attributes:
      argument_bytes: the inputs (parameters, optimizer state, batch).
      output_bytes: the outputs.
      alias_bytes: outputs written into donated inputs (counted once, in the arguments).
      temp_bytes: everything else the program allocates: gradients, activations, workspaces.
      code_bytes: the generated code.
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not aliased to them + temporaries: the device memory in use."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @classmethod
    def of(cls, compiled: Any) -> CompiledMemory:
        """The analysis of an already compiled program (``jax.jit(f).lower(...).compile()``)."""
        stats = compiled.memory_analysis()
        return cls(
            int(stats.argument_size_in_bytes),
            int(stats.output_size_in_bytes),
            int(stats.alias_size_in_bytes),
            int(stats.temp_size_in_bytes),
            int(stats.generated_code_size_in_bytes),
        )


def compiled_memory(fn: Any, *args: Any, **kwargs: Any) -> CompiledMemory:
    """Compiles ``fn`` for ``args`` and returns XLA's memory analysis (nothing is allocated).

    ``args`` may be ``jax.ShapeDtypeStruct`` leaves (with a ``sharding`` for a mesh, possibly
    on devices of another platform: a TPU topology compiles on a CPU host). ``fn`` is jitted
    unless it already is (a jitted step keeps its shardings and donation).

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lr
      >>> x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
      >>> stats = lr.memory.compiled_memory(lambda a: a @ a, x)
      >>> stats.argument_bytes, stats.output_bytes
      (262144, 262144)
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return CompiledMemory.of(jitted.lower(*args, **kwargs).compile())


def _flora_buffer(leaf: Any, plan: Any, rank: int, proj_type: str = "std") -> int:
    """Elements of Flora's compressed buffer of a leaf (full size when not compressed)."""
    if plan is None:
        return _size(leaf)
    batch, n_in, n_out = plan
    if min(n_in, n_out) < rank:
        return _size(leaf)
    side = projection.choose_side(proj_type, n_in, n_out)
    return batch * rank * (n_out if side == "in" else n_in)


def flora_bytes(
    params: Any,
    *,
    rank: int,
    momentum: bool = True,
    targets: Targets = None,
    dims: Any = None,
    momentum_dtype: Any = np.float32,
) -> int:
    """Flora's state: Adafactor's float32 row and column statistics (``m + n`` per matrix,
    full size for vectors) plus the momentum, compressed to ``r·max(m, n)`` for targeted
    matrices with ``min(m, n) >= r`` and full size elsewhere (none without ``momentum``)."""
    m_size = np.dtype(momentum_dtype).itemsize
    total = 0
    for leaf, plan in _matrices(params, targets, dims, "flora_bytes"):
        shape = tuple(np.shape(leaf))
        if len(shape) >= 2:
            total += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
        else:
            total += 4 * _size(leaf)
        if momentum:
            total += m_size * _flora_buffer(leaf, plan, rank)
    return total


def flora_accumulation_bytes(
    params: Any, *, rank: int, targets: Targets = None, dims: Any = None, dtype: Any = np.float32
) -> int:
    """Flora's compressed gradient-accumulation buffers (without the wrapped optimizer's
    state): ``r·max(m, n)`` per targeted matrix with ``min(m, n) >= r``, full size elsewhere."""
    size = np.dtype(dtype).itemsize
    return sum(
        size * _flora_buffer(leaf, plan, rank)
        for leaf, plan in _matrices(params, targets, dims, "flora_accumulation_bytes")
    )


def badam_bytes(
    params: Any,
    *,
    train_non_layer: bool = True,
    layer_bytes: Any = None,
    always_bytes: Any = None,
    layer_pattern: str | None = None,
    stacked_pattern: str | None = "default",
    always_active: Targets = None,
) -> int:
    """BAdam's state: the inner state of **one** layer block (plus one int32 block index) and
    that of the always-active non-layer leaves (none with ``train_non_layer=False``); arguments
    as :func:`lisa_bytes`."""
    layer_bytes = layer_bytes or adamw_bytes
    if not train_non_layer:
        always_bytes = lambda tree: 0  # noqa: E731
    return lisa_bytes(
        params,
        n_active=1,
        layer_bytes=layer_bytes,
        always_bytes=always_bytes,
        layer_pattern=layer_pattern,
        stacked_pattern=stacked_pattern,
        always_active=always_active,
    )


def lorafa_bytes(params: Any, *, dtype: Any = None) -> int:
    """LoRA-FA's state over an adapter tree: two moments per leaf except the frozen ``A``
    factors (none: they get no gradient and no state)."""
    from lowrank_jax.transforms._lora_factors import factor_of

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(
        2 * _size(x) * np.dtype(dtype or x.dtype).itemsize
        for kp, x in flat
        if factor_of(path_str(kp)) != "a"
    )


def qgalore_bytes(
    params: Any,
    *,
    rank: int,
    proj_bits: int = 4,
    proj_group_size: int = 256,
    pack_projector: bool = False,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    projector_dtype: Any = None,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    queue_size: int = 5,
) -> int:
    """Q-GaLore's optimizer state: per targeted matrix the INT4 projector (one byte per code,
    half with ``pack_projector``, plus a scale and a zero point per group in the projector's
    dtype), 8-bit low-rank moments (as :func:`galore8bit_bytes`) and the lazy refresh's
    similarity queue (``queue_size`` floats, plus 3 int32 counters for stacked matrices;
    an unstacked matrix's counters are 0-d bookkeeping); 8-bit moments elsewhere."""
    del proj_bits  # codes take a byte (or half of one packed) whatever the bit width
    total = 0
    for leaf, plan in _matrices(params, targets, dims, "qgalore_bytes"):
        if plan is None:
            total += 2 * _quantized_bytes(_size(leaf), block_size, min_8bit_size)
            continue
        batch, n_in, n_out = plan
        r, basis, kept = _lowrank_sizes(rank, proj_type, n_in, n_out)
        s_size = np.dtype(projector_dtype or leaf.dtype).itemsize
        codes = basis * r // 2 if pack_projector else basis * r
        groups = basis * r // proj_group_size
        moment = _quantized_bytes(batch * r * kept, block_size, min_8bit_size)
        # the refresh counters of an unstacked matrix are 0-d: bookkeeping, like step counts
        counters = 3 if np.ndim(leaf) > 2 else 0
        total += batch * (codes + 2 * groups * s_size + 4 * (counters + queue_size)) + 2 * moment
    return total


def int8_weight_bytes(
    params: Any, *, targets: Targets = None, dims: Any = None, group_size: int = 256
) -> int:
    """Parameter bytes with Q-GaLore's INT8 weights: one byte per targeted weight element plus
    a bfloat16 scale and zero point per ``group_size`` elements; other leaves as they are."""
    total = 0
    for leaf, plan in _matrices(params, targets, dims, "int8_weight_bytes"):
        size = _size(leaf)
        total += _nbytes(leaf) if plan is None else size + 4 * (size // group_size)
    return total


def sst_bytes(params: Any, *, rank: int, targets: Targets = None) -> int:
    """SST's optimizer state for the dense ``params`` it was built from: per targeted
    ``m x n`` matrix (``k = min(m, n)``) float32 moments of ``σ`` and of the ``r`` sampled
    columns of ``U`` and ``V`` -- ``2(r(m + n) + k)`` -- and ``r`` int32 indices; two float32
    moments per element elsewhere."""
    total = 0
    for leaf, plan in _matrices(params, targets, None, "sst_bytes"):
        if plan is None:
            total += 2 * 4 * _size(leaf)
            continue
        batch, n_in, n_out = plan
        total += batch * (4 * 2 * (rank * (n_in + n_out) + min(n_in, n_out)) + 4 * rank)
    return total


def sst_param_bytes(params: Any, *, targets: Targets = None) -> int:
    """The parameters in SST's spectral form: ``k(m + n + 1)`` per targeted ``m x n`` matrix
    instead of ``mn`` (in the parameter dtype)."""
    total = 0
    for leaf, plan in _matrices(params, targets, None, "sst_param_bytes"):
        if plan is None:
            total += _nbytes(leaf)
            continue
        batch, n_in, n_out = plan
        k = min(n_in, n_out)
        total += batch * k * (n_in + n_out + 1) * np.dtype(leaf.dtype).itemsize
    return total


def gradnorm_lorp_bytes(
    params: Any, *, rank: int, proj_type: str = "std", targets: Targets = None, dims: Any = None
) -> int:
    """GradNormLoRP's state: GaLore's (:func:`galore_bytes`, float32 moments of ``∇v``) plus
    per targeted ``m x n`` matrix a float32 copy of ``v`` (``mn``), ``g`` and its two Adam
    moments (``3m``, one per output unit)."""
    total = galore_bytes(
        params, rank=rank, proj_type=proj_type, targets=targets, dims=dims
    )
    for _, plan in _matrices(params, targets, dims, "gradnorm_lorp_bytes"):
        if plan is not None:
            batch, n_in, n_out = plan
            total += 4 * batch * (n_in * n_out + 3 * n_out)
    return total


def ggpo_bytes(adapters: Any, *, inner_bytes: Any = None) -> int:
    """LoRA-GGPO's state over an adapter tree: the inner optimizer's (default
    :func:`adamw_bytes`) plus two float32 norms per output unit of each adapter (``2·out``)."""
    from lowrank_jax.transforms._lora_factors import factor_of

    inner_bytes = inner_bytes or adamw_bytes
    flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
    extra = sum(
        2 * 4 * int(math.prod(np.shape(x)[:-2])) * np.shape(x)[-1]
        for kp, x in flat
        if factor_of(path_str(kp)) == "b"
    )
    return inner_bytes(adapters) + extra
