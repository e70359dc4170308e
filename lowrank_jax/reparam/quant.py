r"""Block-quantized storage for frozen base weights: NF4 with double quantization, and int8.

An array is permuted (``perm``: by default none; :mod:`~lowrank_jax.reparam.qlora` stores Flax
``(in, out)`` kernels in PyTorch's ``(out, in)`` order so that blocks run along the input axis,
as bitsandbytes lays out an ``nn.Linear`` weight), flattened row-major and cut into blocks of
``block_size`` consecutive elements. Block ``b`` keeps its absmax :math:`s_b` and one code per
element:

.. math::
    \mathrm{nf4}:\ c_i = \arg\min_k |q_k - x_i / s_b|,\ \hat x_i = q_{c_i}\,\hat s_b
    \qquad
    \mathrm{int8}:\ c_i = \mathrm{round}(127\,x_i / s_b),\ \hat x_i = c_i\,\hat s_b / 127

with :math:`q_0 < \dots < q_{15}` the NormalFloat4 levels (:data:`NF4_LEVELS`). Two 4-bit codes
share a byte, the first in the high nibble. *Double quantization* stores the scales themselves
in 8 bits: :math:`\mu = \mathrm{mean}(s)`, then :math:`s - \mu` block-quantized in blocks of
``scale_block_size`` (256) with the signed 8-bit dynamic map (:func:`dynamic_map`) and one
float32 absmax :math:`S_k` per scale block, so :math:`\hat s_b = d_{c_b} S_k + \mu`. Storage per
element: ``0.5 + 1/64 + 4/(64·256)`` bytes for NF4 (≈ 0.258× bfloat16), ``1 + 4/64`` for int8.

Parity with bitsandbytes (checked live in ``tests/reparam/test_qlora_format.py`` when it is
installed, the ``compare`` extra): ``quantize(w, "nf4")`` of a PyTorch-layout weight has the
codes (same packing), ``offset``, nested codes and nested absmax of
``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
compress_statistics=True)`` (``QuantState.absmax``, ``.offset``, ``.state2.absmax``), and
``double_quant=False`` its ``absmax``. Nearest level as bitsandbytes: ``x · (1/s)`` clipped to
``[-1, 1]``, ties to the lower level. Our dynamic map is built in float64 from its definition;
bitsandbytes builds it with float32 ``linspace``, so 64 of its 256 values differ by one ulp.

References:
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023 (NF4 §3,
  Appendix E; double quantization). https://arxiv.org/abs/2305.14314
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022 (dynamic map).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FORMATS",
    "NF4_LEVELS",
    "QuantizedTensor",
    "dequantize",
    "dynamic_map",
    "max_nf4_error",
    "normal_float_levels",
    "quantize",
    "storage_bytes",
]

FORMATS = ("nf4", "int8")

#: The 16 NormalFloat4 levels as published (QLoRA, Appendix E) and used by bitsandbytes.
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip


def normal_float_levels(bits: int = 4, offset: float = 0.9677083) -> np.ndarray:
    r"""The NormalFloat levels built from their definition (QLoRA §3, Appendix E).

    .. math::
        q^+ = \Phi^{-1}(\mathrm{linspace}(\delta, \tfrac12, 2^{k-1}+1))_{:-1},\quad
        q^- = -\Phi^{-1}(\mathrm{linspace}(\delta, \tfrac12, 2^{k-1}))_{:-1}

    then ``{q^-, 0, q^+}`` sorted and divided by its maximum: an exact zero, ``2^{k-1}``
    positive and ``2^{k-1} - 1`` negative levels, equal quantiles of ``N(0, 1)``.

    Args:
      bits: ``k`` (4 for NF4).
      offset: ``δ = ½(1 - 1/(2·15) + 1 - 1/(2·16))`` as the paper (and bitsandbytes) round it.

    Returns:
      ``2^k`` float32 levels in ``[-1, 1]``; for ``k = 4`` equal to :data:`NF4_LEVELS`
      within one float32 ulp.
    """
    normal = statistics.NormalDist()
    half = 2 ** (bits - 1)
    positive = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, half + 1)[:-1]]
    negative = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, half)[:-1]]
    levels = np.sort(np.array(positive + [0.0] + negative))
    return (levels / levels.max()).astype(np.float32)


def max_nf4_error(absmax: float) -> float:
    """The largest NF4 rounding error in a block of absmax ``absmax`` with exact scales: half the
    widest gap between adjacent levels (``(q_1 - q_0) / 2 ≈ 0.152``) times ``absmax``."""
    return float(np.max(np.diff(NF4_LEVELS)) / 2 * absmax)


@functools.cache
def dynamic_map() -> np.ndarray:
    r"""The signed 8-bit dynamic map of the double-quantized scales (256 sorted float32 values).

    Decade ``d = 0..6`` holds ``2^d`` values per sign, the midpoints of an even split of
    ``[0.1, 1]`` scaled by ``10^{d-6}``; plus 0 and 1 (-1 has no code). Bitsandbytes'
    ``create_dynamic_map(signed=True)``.
    """
    values = [0.0, 1.0]
    for decade in range(7):
        edges = np.linspace(0.1, 1.0, 2**decade + 1)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (decade - 6)
        values += list(mids) + list(-mids)
    return np.sort(np.asarray(values)).astype(np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A block-quantized array (see the module docstring); indexing with ``[...]`` dequantizes.

    Attributes:
      codes: ``uint8[size/2]`` (nf4, two codes per byte) or ``int8[size]``.
      scales: per-block absmax, ``float32[size/block_size]``, or with double quantization its
        8-bit codes ``uint8[size/block_size]``.
      scale_absmax: with double quantization, ``float32[ceil(blocks/scale_block_size)]``;
        else ``None``.
      offset: with double quantization, the float32 mean of the absmaxes; else ``None``.
      format, shape, dtype, block_size, scale_block_size, perm: static; ``shape`` and ``dtype``
        are the original array's, ``perm`` the axis order it was flattened in (``None``: as is).
    """

    codes: jax.Array
    scales: jax.Array
    scale_absmax: jax.Array | None
    offset: jax.Array | None
    format: str = dataclasses.field(metadata={"static": True})
    shape: tuple = dataclasses.field(metadata={"static": True})
    dtype: str = dataclasses.field(metadata={"static": True})
    block_size: int = dataclasses.field(metadata={"static": True})
    scale_block_size: int | None = dataclasses.field(metadata={"static": True})
    perm: tuple | None = dataclasses.field(metadata={"static": True})

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

    def __getitem__(self, index: Any) -> jax.Array:
        return dequantize(self)[index]


def check_options(
    format: str, block_size: int, scale_block_size: int | None, where: str = "quantize"
) -> None:
    """Raises ``ValueError`` (naming the fix) unless the options describe a storage format."""
    if format not in FORMATS:
        raise ValueError(
            f"{where}: {format!r} is not a storage format; use 'nf4' (4-bit NormalFloat, "
            f"QLoRA) or 'int8' (absmax int8)."
        )
    for name, value in (("block_size", block_size), ("scale_block_size", scale_block_size)):
        if value is None and name == "scale_block_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}.")
    if format == "nf4" and block_size % 2:
        raise ValueError(f"{where}: nf4 packs two codes per byte; block_size must be even, "
                         f"got {block_size} (QLoRA uses 64).")


def _blockwise_absmax(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Rows of ``block`` values (the tail padded with zeros) and each row's absmax."""
    pad = -x.size % block
    rows = jnp.pad(x.reshape(-1), (0, pad)).reshape(-1, block)
    return rows, jnp.max(jnp.abs(rows), axis=1)


def _normalise(rows: jax.Array, absmax: jax.Array) -> jax.Array:
    # bitsandbytes: x · (1/s), clipped; an all-zero block codes zeros (XLA flushes 1/1e-38).
    inverse = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    return jnp.clip(rows * inverse[:, None], -1.0, 1.0)


def _nearest(levels: np.ndarray, y: jax.Array) -> jax.Array:
    """Index of the nearest level; a value on a midpoint takes the lower one."""
    midpoints = jnp.asarray((levels[:-1] + levels[1:]) / np.float32(2))
    return jnp.searchsorted(midpoints, y, side="left")


def _quantize_scales(scales: jax.Array, block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    offset = jnp.mean(scales)
    rows, absmax = _blockwise_absmax(scales - offset, block)
    codes = _nearest(dynamic_map(), _normalise(rows, absmax)).astype(jnp.uint8)
    return codes.reshape(-1)[: scales.size], absmax, offset


def _dequantize_scales(q: QuantizedTensor) -> jax.Array:
    if q.scale_absmax is None:
        return q.scales
    values = jnp.asarray(dynamic_map())[q.scales.astype(jnp.int32)]
    per_block = jnp.repeat(q.scale_absmax, q.scale_block_size)[: values.size]
    return values * per_block + q.offset


def quantize(
    x: jax.Array,
    format: str = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool | None = None,
    scale_block_size: int = 256,
    perm: tuple[int, ...] | None = None,
) -> QuantizedTensor:
    r"""Block-quantizes ``x`` (any float array; computed in float32). Jit-able (options static).

    Args:
      x: the array; its size (per the whole array) must be a multiple of ``block_size``.
      format: ``"nf4"`` or ``"int8"``.
      block_size: elements per absmax block (QLoRA: 64).
      double_quant: store the block absmaxes in 8 bits (default: on for nf4, off for int8).
      scale_block_size: absmaxes per second-level block (QLoRA: 256).
      perm: axis order to flatten in (``(1, 0)`` flattens a Flax ``(in, out)`` kernel as the
        PyTorch ``(out, in)`` weight); ``None`` keeps ``x``'s order.

    Returns:
      A :class:`QuantizedTensor`; :func:`dequantize` inverts it within the format's error.

    Raises:
      ValueError: an unknown format, a bad block size, a size that is not a whole number of
        blocks, or a non-float ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> from lowrank_jax.reparam import quant
      >>> q = quant.quantize(jnp.linspace(-1.0, 1.0, 128), "nf4")
      >>> q.codes.shape, q.codes.dtype, q.scales.dtype
      ((64,), dtype('uint8'), dtype('uint8'))
      >>> err = jnp.abs(quant.dequantize(q) - jnp.linspace(-1.0, 1.0, 128)).max()
      >>> bool(err <= quant.max_nf4_error(1.0))  # half the widest gap between levels
      True
    """
    check_options(format, block_size, scale_block_size)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantize: x must be a float array, got dtype {x.dtype}.")
    if x.size % block_size:
        raise ValueError(
            f"quantize: an array of shape {x.shape} ({x.size} elements) is not a whole number "
            f"of blocks of {block_size}; use a block_size that divides {x.size}."
        )
    if double_quant is None:
        double_quant = format == "nf4"
    perm = None if perm is None else tuple(perm)
    return _quantize(x, format, block_size, bool(double_quant), scale_block_size, perm)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize(
    x: jax.Array, format: str, block_size: int, double_quant: bool, scale_block_size: int,
    perm: tuple | None,
) -> QuantizedTensor:
    flat = x if perm is None else jnp.transpose(x, perm)
    rows, absmax = _blockwise_absmax(flat.astype(jnp.float32), block_size)
    y = _normalise(rows, absmax).reshape(-1)
    if format == "nf4":
        nibbles = _nearest(NF4_LEVELS, y).astype(jnp.uint8)
        codes = (nibbles[0::2] << 4) | nibbles[1::2]
    else:
        codes = jnp.round(y * 127.0).astype(jnp.int8)
    scale_absmax = offset = None
    scales = absmax
    if double_quant:
        scales, scale_absmax, offset = _quantize_scales(absmax, scale_block_size)
    return QuantizedTensor(
        codes,
        scales,
        scale_absmax,
        offset,
        format,
        tuple(x.shape),
        jnp.dtype(x.dtype).name,
        block_size,
        scale_block_size if double_quant else None,
        perm,
    )


def dequantize(q: QuantizedTensor, dtype: Any = None) -> jax.Array:
    """The values of ``q`` in its original shape, computed in float32 and cast once.

    Args:
      q: a :class:`QuantizedTensor`.
      dtype: the result dtype (default: the original array's).

    Returns:
      ``level[code] · absmax`` per block (nf4), ``code · absmax / 127`` (int8).
    """
    return _dequantize(q, jnp.dtype(dtype or q.dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q: QuantizedTensor, dtype: Any) -> jax.Array:
    if q.format == "nf4":
        high, low = q.codes >> 4, q.codes & 15
        nibbles = jnp.stack([high, low], axis=-1).reshape(-1).astype(jnp.int32)
        values = jnp.asarray(NF4_LEVELS)[nibbles]
    else:
        values = q.codes.astype(jnp.float32) / 127.0
    scales = _dequantize_scales(q)
    out = (values.reshape(-1, q.block_size) * scales[:, None]).astype(dtype)
    if q.perm is None:
        return out.reshape(q.shape)
    stored = tuple(q.shape[a] for a in q.perm)
    return jnp.transpose(out.reshape(stored), np.argsort(q.perm))


def storage_bytes(
    shape: tuple[int, ...],
    format: str = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool | None = None,
    scale_block_size: int = 256,
) -> int:
    """Bytes :func:`quantize` stores for an array of ``shape`` (from the shape alone).

    Example:
      >>> from lowrank_jax.reparam import quant
      >>> quant.storage_bytes((4096, 4096), "nf4") / (4096 * 4096 * 2)  # vs bfloat16
      0.25793468952178955
    """
    check_options(format, block_size, scale_block_size, "storage_bytes")
    size = math.prod(shape)
    blocks = -(-size // block_size)
    codes = size // 2 if format == "nf4" else size
    if double_quant if double_quant is not None else format == "nf4":
        return codes + blocks + 4 * -(-blocks // scale_block_size) + 4
    return codes + 4 * blocks
