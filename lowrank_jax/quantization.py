"""The block-wise 8-bit format of optimizer states: code maps, the encoder, (de)quantization.

An array of ``size`` elements is viewed as ``(ceil(size / block_size), block_size)``, one
quantization block per row (row-major over the array, the tail padded with zeros). Each element
is stored as the ``uint8`` index of the nearest of 256 sorted values in ``[-1, 1]`` (``[0, 1]``
unsigned) and each block keeps its ``float32`` absmax: ``x ≈ map[code] · absmax(block)``.

Why the *dynamic* map by default: Adam's second moment spans many orders of magnitude inside
a block (it is a square), and a linear map sends every value below ``absmax/510`` to zero,
where ``M/(√V + ε)`` then explodes. The dynamic map (Dettmers et al.'s dynamic tree
quantization: seven decades ``[10⁻⁷, 1]`` with more codes in the upper decades) keeps a
relative error of a few percent down to ``10⁻⁶·absmax``. ``quantization="linear"`` (absmax
int8/uint8 levels) is there for comparison.

This module is the format's single definition, below its users: the Pallas kernels
(:mod:`lowrank_jax.kernels`) take :func:`quantize_blockwise` / :func:`dequantize_blockwise` as
their plain-jnp reference, and :func:`lowrank_jax.scale_by_adam_8bit` stores its moments as
:class:`QuantizedArray`. :func:`encode` uses only elementwise operations with Python-number
constants, so the same encoder runs inside a kernel.

Reference: Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
https://arxiv.org/abs/2110.02861
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "QUANTIZATIONS",
    "QuantizedArray",
    "check_block_size",
    "code_map",
    "dequantize_blockwise",
    "encode",
    "quantize_blockwise",
    "round_half_even",
    "zero_code",
]

QUANTIZATIONS = ("dynamic", "linear")
_DECADES = 7  # the dynamic map's decades [1e-7, 1]


class QuantizedArray(NamedTuple):
    """A block-wise quantized array.

    Attributes:
      codes: ``uint8`` indices into the code map, in the array's shape.
      scales: ``float32[ceil(size / block_size)]``, the absmax of each block.
    """

    codes: jax.Array
    scales: jax.Array


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")


def check_block_size(block_size: object, where: str) -> None:
    """Raises ``ValueError`` unless ``block_size`` is a positive Python int."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{where}: block_size must be a positive Python int, got {block_size!r}.")


@functools.cache
def code_map(signed: bool, quantization: str = "dynamic") -> np.ndarray:
    """The sorted 256 float32 values in ``[-1, 1]`` (``[0, 1]`` unsigned) that the codes index.

    Dynamic: decade ``d = 0..6`` covers ``[10^{d-7}, 10^{d-6}]`` with ``2^{d+1}`` (unsigned) or
    ``2^d`` per sign (signed) values, the midpoints of an even split of ``[0.1, 1]`` scaled by
    ``10^{d-6}``; plus 0 and 1. Linear: ``k/255`` (unsigned) or ``k/127``, ``k = -127..127``.

    Example:
      >>> from lowrank_jax.quantization import code_map
      >>> table = code_map(signed=True)
      >>> table.shape, float(table[127]), float(table[-1])
      ((256,), 0.0, 1.0)
    """
    _check_quantization(quantization)
    if quantization == "linear":
        if not signed:
            return (np.arange(256) / 255.0).astype(np.float32)
        # 255 symmetric levels; the 256th code repeats 1.0 (never the nearest of anything else)
        return np.append(np.arange(-127, 128) / 127.0, 1.0).astype(np.float32)
    values = [0.0, 1.0]
    for decade in range(_DECADES):
        count = 2**decade if signed else 2 ** (decade + 1)
        edges = np.linspace(0.1, 1.0, count + 1)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (decade - _DECADES + 1)
        values += list(mids) + (list(-mids) if signed else [])
    table = np.sort(np.asarray(values, np.float64)).astype(np.float32)
    if table.size != 256:
        raise AssertionError(f"the dynamic map has {table.size} values, not 256")
    return table


def zero_code(signed: bool, quantization: str = "dynamic") -> int:
    """The code of ``0.0`` (127 for the signed maps, 0 for the unsigned ones)."""
    return int(np.searchsorted(code_map(signed, quantization), 0.0))


def round_half_even(x: jax.Array) -> jax.Array:
    """``jnp.round`` from floor and compares (Triton has no round): exact for ``|x| < 2^23``."""
    r = jnp.floor(x)
    frac = x - r
    odd = jnp.floor(r * 0.5) * 2 != r
    return jnp.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1, r)


def encode(y: jax.Array, *, signed: bool, quantization: str = "dynamic") -> jax.Array:
    r"""Float32 code (an integer value) of the nearest map entry to each ``y`` in ``[-1, 1]``.

    Linear: :math:`\mathrm{round}(127 y) + 127` (signed) or :math:`\mathrm{round}(255 y)`.
    Dynamic: the decade :math:`d` of :math:`|y|` by comparisons with :math:`10^{d-7}`, the bin
    :math:`k = \lfloor (|y|/10^{d-6} - 0.1)\,n_d / 0.9 \rfloor` of the :math:`n_d` levels in
    that decade, one step down when the top level of the decade below is nearer, 0 below half
    the smallest level, 255 past the midpoint of the top level and 1, mirrored for ``y < 0``.
    Elementwise, with Python-number constants only (no table search, no log/pow), so it runs
    inside a Pallas kernel too.

    Args:
      y: values normalised by their block's absmax (float32).
      signed: the signed map (first moment) or the unsigned one (second moment).
      quantization: ``"dynamic"`` or ``"linear"``.

    Returns:
      Float32 codes in ``[0, 255]`` (cast with ``.astype(jnp.int32).astype(jnp.uint8)``).
    """
    if quantization == "linear":
        if signed:
            return jnp.minimum(jnp.maximum(round_half_even(y * 127), -127), 127) + 127
        return jnp.minimum(jnp.maximum(round_half_even(y * 255), 0), 255)
    table = code_map(signed, quantization)
    zero = 127 if signed else 0
    smallest_half = float(table[zero + 1] / 2)
    top_mid = float((table[254] + 1.0) / 2)
    base = 1 if signed else 2  # levels per sign in the lowest decade
    a = jnp.abs(y)
    scale = jnp.full(a.shape, 10.0 ** (1 - _DECADES), jnp.float32)
    count = jnp.full(a.shape, float(base), jnp.float32)
    for d in range(1, _DECADES):  # the thresholds increase: the last one passed wins
        above = a >= 10.0 ** (d - _DECADES)
        scale = jnp.where(above, 10.0 ** (d + 1 - _DECADES), scale)
        count = jnp.where(above, float(base << d), count)
    k = jnp.floor((a / scale - 0.1) * count / 0.9)
    k = jnp.minimum(jnp.maximum(k, 0), count - 1)
    below = count - 1 if signed else count - 2
    code = zero + 1 + below + k
    level = scale * (0.1 + (k + 0.5) * 0.9 / count)
    top_of_lower = scale / 10 * (1 - 0.9 / count)
    nearer = (
        (k == 0) & (a >= 10.0 ** (1 - _DECADES)) & (jnp.abs(a - top_of_lower) < jnp.abs(a - level))
    )
    code = jnp.where(nearer, code - 1, code)
    code = jnp.where(a < smallest_half, zero, code)
    code = jnp.where(a > top_mid, 255, code)
    if signed:
        code = jnp.maximum(jnp.where(y < 0, 2 * zero - code, code), 0)
    return code


def _rows(x: jax.Array, block_size: int) -> jax.Array:
    """``x`` flattened row-major into ``(ceil(size / block_size), block_size)``, zero-padded."""
    flat = x.reshape(-1)
    pad = -flat.size % block_size
    if pad:
        flat = jnp.concatenate([flat, jnp.zeros((pad,), flat.dtype)])
    return flat.reshape(-1, block_size)


def _unrows(rows: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    size = int(np.prod(shape, dtype=np.int64))
    flat = rows.reshape(-1)
    return (flat[:size] if flat.size != size else flat).reshape(shape)


def quantize_blockwise(
    x: jax.Array, block_size: int, *, signed: bool, quantization: str = "dynamic"
) -> QuantizedArray:
    r"""Block-wise 8-bit quantization in plain jnp (the kernels' reference).

    .. math::
        s_b = \max_{i \in b} |x_i|,\qquad c_i = \mathrm{encode}(x_i / s_b)

    (:math:`s_b = 0` divides by 1).

    Args:
      x: any shape; upcast to float32.
      block_size: elements per block (consecutive, row-major).
      signed: signed map (first moment) or unsigned (second moment).
      quantization: ``"dynamic"`` or ``"linear"``.

    Returns:
      ``QuantizedArray(codes uint8[x.shape], scales float32[ceil(size / block_size)])``.

    Example:
      >>> import jax.numpy as jnp
      >>> from lowrank_jax.quantization import quantize_blockwise, dequantize_blockwise
      >>> q = quantize_blockwise(jnp.array([0.5, -1.0]), 256, signed=True)
      >>> q.codes.dtype, q.scales
      (dtype('uint8'), Array([1.], dtype=float32))
      >>> dequantize_blockwise(q, 256, signed=True)  # the nearest of the 256 levels
      Array([ 0.50078124, -0.99296874], dtype=float32)
    """
    check_block_size(block_size, "quantize_blockwise")
    _check_quantization(quantization)
    blocks = _rows(x.astype(jnp.float32), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)
    codes = encode(normed, signed=signed, quantization=quantization)
    return QuantizedArray(_unrows(codes.astype(jnp.int32).astype(jnp.uint8), x.shape), absmax[:, 0])


def dequantize_blockwise(
    q: QuantizedArray, block_size: int, *, signed: bool, quantization: str = "dynamic"
) -> jax.Array:
    """``map[code] · absmax(block)`` in plain jnp, as float32 in the codes' shape.

    Args:
      q: a ``(codes, scales)`` pair.
      block_size, signed, quantization: as :func:`quantize_blockwise`.
    """
    codes, scales = q
    check_block_size(block_size, "dequantize_blockwise")
    table = jnp.asarray(code_map(signed, quantization))
    rows = _rows(codes, block_size)
    return _unrows(table[rows.astype(jnp.int32)] * scales.reshape(-1, 1), codes.shape)
