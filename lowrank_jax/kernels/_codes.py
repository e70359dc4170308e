"""The 8-bit code format inside kernels: the table as a kernel operand, lookups, lane chunks.

Shared by the quantize/dequantize kernels and the fused 8-bit Adam kernel. The format itself
(code maps, the encoder) is :mod:`lowrank_jax.quantization`; what is here is how a kernel holds
it. Everything is elementwise or per 128-lane chunk with Python-number constants only (a Pallas
kernel cannot capture array constants), and uses only operations that both Triton and Mosaic
TPU lower.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from lowrank_jax.kernels._dispatch import LANES
from lowrank_jax.quantization import check_block_size, code_map, encode

__all__ = [
    "assert_codes_close",
    "check_block_size",
    "check_codes",
    "code_map",
    "encode",
    "kernel_block_problem",
    "lane_chunks",
    "lookup",
    "table_operand",
    "table_spec",
    "to_uint8",
]



def to_uint8(code: jax.Array) -> jax.Array:
    return code.astype(jnp.int32).astype(jnp.uint8)


def kernel_block_problem(block_size: int) -> str | None:
    """Why the kernels cannot use ``block_size`` (one row per block), or ``None``."""
    if block_size % LANES or block_size & (block_size - 1):
        return f"block_size must be a power of 2 and a multiple of {LANES}, got {block_size}"
    return None


def table_operand(signed: bool, quantization: str, target: str) -> jax.Array:
    """The code map as a kernel input: ``(256,)`` for Triton, ``(2, 128)`` for a TPU."""
    table = jnp.asarray(code_map(signed, quantization))
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
