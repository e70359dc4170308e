"""The 8-bit code format inside kernels: the code map, the encoder, the table lookup.

Shared by the quantize/dequantize kernels and the fused 8-bit Adam kernel. Everything here is
elementwise or per 128-lane chunk with Python-number constants only (a Pallas kernel cannot
capture array constants), and uses only operations that both Triton and Mosaic TPU lower.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from lowrank_jax.kernels._dispatch import LANES

QUANTIZATIONS = ("dynamic", "linear")
_DECADES = 7  # the dynamic map's decades [1e-7, 1]: quantized.py's layout


@functools.cache
def code_table(signed: bool, quantization: str) -> np.ndarray:
    """The 256 sorted float32 values the codes index (``quantized.code_map``)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
    from lowrank_jax.transforms.quantized import code_map  # lazy: quantized.py may import us

    return np.asarray(code_map(signed, quantization), np.float32)


def round_half_even(x: jax.Array) -> jax.Array:
    """``jnp.round`` from floor and compares (Triton has no round): exact for ``|x| < 2^23``."""
    r = jnp.floor(x)
    frac = x - r
    odd = jnp.floor(r * 0.5) * 2 != r
    return jnp.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1, r)


def encode(y: jax.Array, *, signed: bool, quantization: str) -> jax.Array:
    r"""Float32 code (an integer value) of the nearest map entry to each ``y`` in ``[-1, 1]``.

    Linear: :math:`\mathrm{round}(127 y) + 127` (signed) or :math:`\mathrm{round}(255 y)`.
    Dynamic: the decade :math:`d` of :math:`|y|` by comparisons with :math:`10^{d-7}`, the bin
    :math:`k = \lfloor (|y|/10^{d-6} - 0.1)\,n_d / 0.9 \rfloor` of the :math:`n_d` levels in
    that decade, one step down when the top level of the decade below is nearer, 0 below half
    the smallest level, 255 past the midpoint of the top level and 1, mirrored for ``y < 0``.
    Elementwise, with Python-number constants only, so it runs inside a kernel.

    Args:
      y: values normalised by their block's absmax (float32).
      signed: the signed map (first moment) or the unsigned one (second moment).
      quantization: ``"dynamic"`` or ``"linear"``.

    Returns:
      Float32 codes in ``[0, 255]`` (cast to ``uint8`` by the caller).

    References:
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022 (dynamic tree
      quantization); ``lowrank_jax.transforms.quantized``.
    """
    if quantization == "linear":
        if signed:
            return jnp.minimum(jnp.maximum(round_half_even(y * 127), -127), 127) + 127
        return jnp.minimum(jnp.maximum(round_half_even(y * 255), 0), 255)
    table = code_table(signed, quantization)
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


def to_uint8(code: jax.Array) -> jax.Array:
    return code.astype(jnp.int32).astype(jnp.uint8)


def check_block_size(block_size: Any, where: str) -> None:
    """Raises ``ValueError`` unless ``block_size`` is a positive Python int."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{where}: block_size must be a positive Python int, got {block_size!r}.")


def kernel_block_problem(block_size: int) -> str | None:
    """Why the kernels cannot use ``block_size`` (one row per block), or ``None``."""
    if block_size % LANES or block_size & (block_size - 1):
        return f"block_size must be a power of 2 and a multiple of {LANES}, got {block_size}"
    return None


def table_operand(signed: bool, quantization: str, target: str) -> jax.Array:
    """The code map as a kernel input: ``(256,)`` for Triton, ``(2, 128)`` for a TPU."""
    table = jnp.asarray(code_table(signed, quantization))
    return table if target == "triton" else table.reshape(2, LANES)


def table_spec(target: str) -> pl.BlockSpec:
    """The whole table in every grid step."""
    if target == "triton":
        return pl.BlockSpec((256,), lambda i: (0,))
    return pl.BlockSpec((2, LANES), lambda i: (0, 0))


def lookup(table_ref: Any, codes: jax.Array, target: str) -> jax.Array:
    """``map[codes]`` inside a kernel (``codes``: int32, ``(rows, 128)``)."""
    if target == "triton":
        return table_ref[codes]
    low = codes & (LANES - 1)
    halves = [
        jnp.take_along_axis(jnp.broadcast_to(table_ref[h : h + 1, :], codes.shape), low, axis=1)
        for h in range(2)
    ]
    return jnp.where(codes >= LANES, halves[1], halves[0])


def lane_chunks(width: int) -> list[slice]:
    """The 128-lane column slices of a block ``width`` wide."""
    return [slice(c, c + LANES) for c in range(0, width, LANES)]


def check_codes(q: Any, block_size: int, where: str) -> None:
    """Raises ``ValueError`` unless ``q`` is ``(uint8 codes, one scale per block)``."""
    codes, scales = q
    if codes.dtype != jnp.uint8:
        raise ValueError(f"{where}: codes must be uint8, got {codes.dtype}.")
    blocks = -(-codes.size // block_size)
    if scales.shape != (blocks,):
        raise ValueError(
            f"{where}: {codes.size} codes in blocks of {block_size} need "
            f"scales of shape ({blocks},), got {scales.shape}."
        )


def assert_codes_close(got: Any, want: Any) -> None:
    """Scales within float32 round-off, codes within one level.

    On a device the compilers may round a division or contract a multiply-add differently
    from XLA, which moves a value that sits on a boundary between two codes to the other one.
    """
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-6, atol=0)
    step = np.abs(np.asarray(got[0], np.int32) - np.asarray(want[0], np.int32))
    if step.max(initial=0) > 1:
        raise AssertionError(f"codes differ by up to {step.max()} levels")
