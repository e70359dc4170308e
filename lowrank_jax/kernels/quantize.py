"""Block-wise 8-bit quantize / dequantize kernels, in the format of :mod:`lowrank_jax.quantization`.

An array of ``size`` elements is viewed as ``(n_blocks, block_size)``, one quantization block
per row (the tail padded with zeros): row ``i``'s ``absmax`` is ``scales[i]`` and each element
is stored as the ``uint8`` index of the nearest of the 256 sorted values of
:func:`lowrank_jax.quantization.code_map`. The nearest code is found by the format's own
arithmetic encoder (:func:`lowrank_jax.quantization.encode`: comparisons, a floor and a few
divisions; no table search), so codes agree bit for bit with the plain-jnp reference
(:func:`lowrank_jax.quantization.quantize_blockwise`) wherever both round the divisions alike
(always in interpret mode). Dequantizing gathers ``map[code]`` from a 256-entry table: a
pointer gather on Triton, two 128-lane ``take_along_axis`` (Mosaic's dynamic gather) on a TPU.

Inside a kernel a row is processed in 128-lane chunks loaded and stored through the refs (no
value slicing or concatenation, which Triton lacks), and its absmax is the maximum of the
chunks' maxima.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from lowrank_jax.kernels import _dispatch
from lowrank_jax.kernels._codes import (
    assert_codes_close,
    check_block_size,
    check_codes,
    code_map,
    encode,
    kernel_block_problem,
    lane_chunks,
    lookup,
    table_operand,
    table_spec,
    to_uint8,
)
from lowrank_jax.quantization import QuantizedArray
from lowrank_jax.quantization import dequantize_blockwise as dequantize_blockwise_reference
from lowrank_jax.quantization import quantize_blockwise as quantize_blockwise_reference

__all__ = [
    "dequantize_blockwise",
    "dequantize_blockwise_pallas",
    "dequantize_blockwise_reference",
    "quantize_blockwise",
    "quantize_blockwise_pallas",
    "quantize_blockwise_reference",
]

# Elements per grid step: 4096 per Triton program; 64K per TPU step (>= 32 rows: uint8 tiles).
_BUDGET = {"triton": 4096, "tpu": 1 << 16}


def _layout(
    size: int, block_size: int, target: str, block_rows: int | None = None
) -> tuple[int, int, int]:
    """``(n_blocks, padded, per_step)``: quantization blocks (rows), see ``row_layout``."""
    preferred = max(_BUDGET[target] // block_size, 32 if target == "tpu" else 1)
    return _dispatch.row_layout(size, block_size, target, preferred, 32, block_rows)


def _quantize_kernel(x_ref, codes_ref, scales_ref, *, signed, quantization):
    chunks = [x_ref[:, lanes].astype(jnp.float32) for lanes in lane_chunks(x_ref.shape[1])]
    absmax = functools.reduce(
        jnp.maximum, [jnp.max(jnp.abs(c), axis=1, keepdims=True) for c in chunks]
    )
    scales_ref[...] = absmax
    divisor = jnp.where(absmax > 0, absmax, 1.0)
    for lanes, chunk in zip(lane_chunks(x_ref.shape[1]), chunks, strict=True):
        codes_ref[:, lanes] = to_uint8(
            encode(chunk / divisor, signed=signed, quantization=quantization)
        )


def _dequantize_kernel(table_ref, codes_ref, scales_ref, out_ref, *, target):
    scale = scales_ref[...]
    for lanes in lane_chunks(codes_ref.shape[1]):
        out_ref[:, lanes] = lookup(table_ref, codes_ref[:, lanes].astype(jnp.int32), target) * (
            scale
        )


def _pallas_rows(block_size: int, target: str, where: str) -> None:
    check_block_size(block_size, where)
    problem = kernel_block_problem(block_size)
    if problem is not None:
        raise ValueError(f"{where}: {problem}.")
    if target not in _dispatch.TARGETS:
        raise ValueError(f"{where}: target must be one of {_dispatch.TARGETS}, got {target!r}.")


def quantize_blockwise_pallas(
    x: jax.Array,
    block_size: int,
    *,
    signed: bool,
    quantization: str = "dynamic",
    target: str = "triton",
    interpret: bool = False,
    block_rows: int | None = None,
) -> Any:
    """The Pallas kernel of :func:`quantize_blockwise_reference` (one row per block).

    Args:
      x, block_size, signed, quantization: as the reference (``block_size``: a power of 2 and
        a multiple of 128).
      target: ``"triton"`` or ``"tpu"``. interpret: run in interpret mode.
      block_rows: quantization blocks per grid step.

    Returns:
      ``QuantizedArray(codes, scales)``, bit for bit the reference's in interpret mode.
    """
    _pallas_rows(block_size, target, "quantize_blockwise_pallas")
    code_map(signed, quantization)  # validates quantization

    n_blocks, padded, br = _layout(x.size, block_size, target, block_rows)
    blocks = _dispatch.to_rows(x, block_size, padded)
    spec = pl.BlockSpec((br, block_size), lambda i: (i, 0))
    codes, scales = pl.pallas_call(
        functools.partial(_quantize_kernel, signed=signed, quantization=quantization),
        out_shape=(
            jax.ShapeDtypeStruct(blocks.shape, jnp.uint8),
            jax.ShapeDtypeStruct((padded, 1), jnp.float32),
        ),
        grid=(padded // br,),
        in_specs=[spec],
        out_specs=(spec, pl.BlockSpec((br, 1), lambda i: (i, 0))),
        name="quantize_blockwise",
        **_dispatch.pallas_options(target, interpret),
    )(blocks)
    return QuantizedArray(_dispatch.from_rows(codes, x.shape), scales[:n_blocks, 0])


def dequantize_blockwise_pallas(
    q: Any,
    block_size: int,
    *,
    signed: bool,
    quantization: str = "dynamic",
    target: str = "triton",
    interpret: bool = False,
    block_rows: int | None = None,
) -> jax.Array:
    """The Pallas kernel of :func:`dequantize_blockwise_reference` (one row per block).

    Args:
      q, block_size, signed, quantization: as the reference.
      target: ``"triton"`` or ``"tpu"``. interpret: run in interpret mode.
      block_rows: quantization blocks per grid step.

    Returns:
      Float32 values, bit for bit the reference's.
    """
    codes, scales = q
    _pallas_rows(block_size, target, "dequantize_blockwise_pallas")
    n_blocks, padded, br = _layout(codes.size, block_size, target, block_rows)
    blocks = _dispatch.to_rows(codes, block_size, padded)
    scales = _dispatch.to_rows(scales, 1, padded)
    spec = pl.BlockSpec((br, block_size), lambda i: (i, 0))
    values = pl.pallas_call(
        functools.partial(_dequantize_kernel, target=target),
        out_shape=jax.ShapeDtypeStruct(blocks.shape, jnp.float32),
        grid=(padded // br,),
        in_specs=[table_spec(target), spec, pl.BlockSpec((br, 1), lambda i: (i, 0))],
        out_specs=spec,
        name="dequantize_blockwise",
        **_dispatch.pallas_options(target, interpret),
    )(table_operand(signed, quantization, target), blocks, scales)
    return _dispatch.from_rows(values, codes.shape)


def quantize_blockwise(
    x: jax.Array,
    block_size: int,
    *,
    signed: bool,
    quantization: str = "dynamic",
    mode: str | None = None,
) -> Any:
    r"""Block-wise 8-bit quantization (Pallas where it is expected to pay, else jnp).

    .. math::
        s_b = \max_{i \in b} |x_i|,\qquad c_i = \arg\min_c |\mathrm{map}_c - x_i / s_b|

    Args:
      x: any shape and float dtype (upcast to float32).
      block_size: elements per block; the kernel needs a power of 2 that is a multiple of 128.
      signed: signed map (first moment) or unsigned (second moment).
      quantization: ``"dynamic"`` or ``"linear"``.
      mode: ``"auto"``, ``"pallas"``, ``"interpret"`` or ``"reference"`` (default: the
        :func:`~lowrank_jax.kernels.kernel_mode` in force).

    Returns:
      ``QuantizedArray(codes, scales)``, as :func:`lowrank_jax.quantization.quantize_blockwise`.

    Raises:
      ValueError: a bad ``block_size`` or ``quantization``, a non-float ``x``, or a forced
        Pallas mode that cannot run.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax.kernels as K
      >>> q = K.quantize_blockwise(jnp.array([0.5, -1.0]), 256, signed=True)
      >>> q.codes.dtype, q.scales
      (dtype('uint8'), Array([1.], dtype=float32))

    References:
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
    """
    check_block_size(block_size, "quantize_blockwise")
    code_map(signed, quantization)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantize_blockwise: x must be a float array, got {x.dtype}.")
    plan = _dispatch.choose(
        "quantize_blockwise",
        mode,
        supported=kernel_block_problem(block_size) or ("x is empty" if x.size == 0 else None),
        free_layout=lambda target: (
            len(set(_layout(x.size, block_size, target)[:2])) == 1 and x.size % block_size == 0
        ),
        size=x.size,
        probe=lambda target: _probe_quantize(target, block_size, signed, quantization),
    )
    if plan is None:
        return quantize_blockwise_reference(x, block_size, signed=signed, quantization=quantization)
    target, interpret = plan
    return quantize_blockwise_pallas(
        x,
        block_size,
        signed=signed,
        quantization=quantization,
        target=target,
        interpret=interpret,
    )


def dequantize_blockwise(
    q: Any,
    block_size: int,
    *,
    signed: bool,
    quantization: str = "dynamic",
    mode: str | None = None,
) -> jax.Array:
    r"""``map[code] · absmax(block)`` as float32 (Pallas where expected to pay, else jnp).

    Args:
      q: a ``(codes, scales)`` pair (``QuantizedArray``): ``uint8`` codes in the array's shape
        and ``float32[ceil(size / block_size)]`` scales.
      block_size, signed, quantization, mode: as :func:`quantize_blockwise`.

    Returns:
      Float32 values in the codes' shape, as :func:`lowrank_jax.quantization.dequantize_blockwise`.

    Raises:
      ValueError: codes that are not ``uint8``, scales of the wrong length, a bad
        ``block_size`` or ``quantization``, or a forced Pallas mode that cannot run.
    """
    check_block_size(block_size, "dequantize_blockwise")
    code_map(signed, quantization)
    check_codes(q, block_size, "dequantize_blockwise")
    size = q[0].size
    plan = _dispatch.choose(
        "dequantize_blockwise",
        mode,
        supported=kernel_block_problem(block_size) or ("codes are empty" if size == 0 else None),
        free_layout=lambda target: (
            len(set(_layout(size, block_size, target)[:2])) == 1 and size % block_size == 0
        ),
        size=size,
        probe=lambda target: _probe_quantize(target, block_size, signed, quantization),
    )
    if plan is None:
        return dequantize_blockwise_reference(
            q, block_size, signed=signed, quantization=quantization
        )
    target, interpret = plan
    return dequantize_blockwise_pallas(
        q,
        block_size,
        signed=signed,
        quantization=quantization,
        target=target,
        interpret=interpret,
    )


def _probe_quantize(target: str, block_size: int, signed: bool, quantization: str) -> bool:
    def check() -> None:
        x = jnp.asarray(np.random.default_rng(0).standard_normal((64, block_size)), jnp.float32)
        x = x if signed else x * x
        args = dict(signed=signed, quantization=quantization)
        want = quantize_blockwise_reference(x, block_size, **args)
        got = jax.jit(
            functools.partial(quantize_blockwise_pallas, target=target, **args),
            static_argnums=1,
        )(x, block_size)
        assert_codes_close(got, want)
        values = jax.jit(
            functools.partial(dequantize_blockwise_pallas, target=target, **args),
            static_argnums=1,
        )(want, block_size)
        np.testing.assert_array_equal(
            np.asarray(values), np.asarray(dequantize_blockwise_reference(want, block_size, **args))
        )

    key = f"quantize_blockwise[{target}, {block_size}, {signed}, {quantization}]"
    return _dispatch.probe_once(key, check)
