"""Fused 8-bit Adam step: dequantize both moments, update, requantize -- in one kernel.

``scale_by_adam_8bit`` per quantized leaf reads the codes and scales, writes float32 moments,
reduces them to block maxima and encodes them again: XLA materialises the float32 moments
between those fusions, 8 bytes per element and moment written and read back. Here a grid step
holds whole quantization blocks, so the float32 moments never leave the chip: the traffic is
the gradient, the update and the 8-bit state (about 2 + 4 + 4 bytes per element in float32).
"""

from __future__ import annotations

import dataclasses
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
from lowrank_jax.kernels.quantize import (
    dequantize_blockwise_reference,
    quantize_blockwise_reference,
)
from lowrank_jax.quantization import QuantizedArray

__all__ = ["adam_8bit_update", "adam_8bit_update_pallas", "adam_8bit_update_reference"]

_SIGNED = dict(signed=True)
_UNSIGNED = dict(signed=False)
# Elements per grid step: the step keeps both float32 moments of every chunk live.
_BUDGET = {"triton": 2048, "tpu": 1 << 16}


def _layout(
    size: int, block_size: int, target: str, block_rows: int | None = None
) -> tuple[int, int, int]:
    """``(n_blocks, padded, per_step)``: quantization blocks (rows), see ``row_layout``."""
    preferred = max(_BUDGET[target] // block_size, 32 if target == "tpu" else 1)
    return _dispatch.row_layout(size, block_size, target, preferred, 32, block_rows)


def _adam(g, m, v, correction1, correction2, b1, b2, eps):
    g = g.astype(jnp.float32)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * jnp.square(g)
    return (m / correction1) / (jnp.sqrt(v / correction2) + eps), m, v


def _check(g: jax.Array, m: Any, v: Any, block_size: Any, c1: Any, c2: Any) -> tuple:
    check_block_size(block_size, "adam_8bit_update")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise ValueError(f"adam_8bit_update: g must be a float array, got {g.dtype}.")
    for name, q in (("m", m), ("v", v)):
        if q[0].shape != g.shape:
            raise ValueError(
                f"adam_8bit_update: {name}.codes has shape {q[0].shape}, g has {g.shape}."
            )
        check_codes(q, block_size, f"adam_8bit_update: {name}")
    out = []
    for name, c in (("correction1", c1), ("correction2", c2)):
        c = jnp.asarray(c, jnp.float32)
        if c.size != 1:
            raise ValueError(f"adam_8bit_update: {name} must be a scalar, got shape {c.shape}.")
        out.append(c.reshape(()))
    return tuple(out)


def adam_8bit_update_reference(
    g: jax.Array,
    m: Any,
    v: Any,
    *,
    b1: Any,
    b2: Any,
    eps: Any,
    correction1: Any,
    correction2: Any,
    block_size: int,
    quantization: str = "dynamic",
) -> tuple[jax.Array, Any, Any]:
    r"""One 8-bit Adam step on one leaf in plain jnp (``scale_by_adam_8bit``'s arithmetic).

    .. math::
        m' = \beta_1 \tilde m + (1-\beta_1) g,\quad v' = \beta_2 \tilde v + (1-\beta_2) g^2,
        \quad u = \frac{m' / c_1}{\sqrt{v' / c_2} + \epsilon}

    with :math:`\tilde m, \tilde v` the dequantized moments; :math:`m', v'` are requantized
    (signed and unsigned maps).

    Args:
      g: the gradient (any float dtype; computed in float32).
      m, v: ``(codes, scales)`` pairs (``QuantizedArray``) in ``g``'s shape.
      b1, b2, eps: Adam constants (``eps`` after bias correction, as bitsandbytes).
      correction1, correction2: float32 scalars :math:`c_1 = 1-\beta_1^t`, :math:`c_2 =
        1-\beta_2^t`.
      block_size, quantization: the moments' format.

    Returns:
      ``(update, m_new, v_new)``: the update in ``g``'s dtype and the requantized moments.

    References:
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
    """
    c1, c2 = _check(g, m, v, block_size, correction1, correction2)
    fmt = dict(quantization=quantization)
    m32 = dequantize_blockwise_reference(m, block_size, **_SIGNED, **fmt)
    v32 = dequantize_blockwise_reference(v, block_size, **_UNSIGNED, **fmt)
    u, m32, v32 = _adam(g, m32, v32, c1, c2, b1, b2, eps)
    return (
        u.astype(g.dtype),
        quantize_blockwise_reference(m32, block_size, **_SIGNED, **fmt),
        quantize_blockwise_reference(v32, block_size, **_UNSIGNED, **fmt),
    )


def _kernel(
    c1_ref,
    c2_ref,
    m_table,
    v_table,
    g_ref,
    m_codes,
    m_scales,
    v_codes,
    v_scales,
    u_ref,
    m_codes_out,
    m_scales_out,
    v_codes_out,
    v_scales_out,
    *,
    b1,
    b2,
    eps,
    quantization,
    target,
):
    chunks = lane_chunks(g_ref.shape[1])
    c1, c2 = c1_ref[...], c2_ref[...]
    m_scale, v_scale = m_scales[...], v_scales[...]
    ms, vs = [], []
    for lanes in chunks:
        m = lookup(m_table, m_codes[:, lanes].astype(jnp.int32), target) * m_scale
        v = lookup(v_table, v_codes[:, lanes].astype(jnp.int32), target) * v_scale
        u, m, v = _adam(g_ref[:, lanes], m, v, c1, c2, b1, b2, eps)
        u_ref[:, lanes] = u.astype(u_ref.dtype)
        ms.append(m)
        vs.append(v)
    for values, codes_ref, scales_ref, signed in (
        (ms, m_codes_out, m_scales_out, True),
        (vs, v_codes_out, v_scales_out, False),
    ):
        absmax = functools.reduce(
            jnp.maximum, [jnp.max(jnp.abs(x), axis=1, keepdims=True) for x in values]
        )
        scales_ref[...] = absmax
        divisor = jnp.where(absmax > 0, absmax, 1.0)
        for lanes, x in zip(chunks, values, strict=True):
            codes_ref[:, lanes] = to_uint8(
                encode(x / divisor, signed=signed, quantization=quantization)
            )


def adam_8bit_update_pallas(
    g: jax.Array,
    m: Any,
    v: Any,
    *,
    b1: float,
    b2: float,
    eps: float,
    correction1: Any,
    correction2: Any,
    block_size: int,
    quantization: str = "dynamic",
    target: str = "triton",
    interpret: bool = False,
    block_rows: int | None = None,
) -> tuple[jax.Array, Any, Any]:
    """The Pallas kernel of :func:`adam_8bit_update_reference`: one pass, state in place.

    The leaf is viewed as ``(n_blocks, block_size)`` (one quantization block per row; the tail
    padded with zero codes, which dequantize to 0 and leave the block maxima alone), the codes
    and scales are aliased to their outputs. On a TPU a matrix whose rows hold several whole
    blocks is tiled in its own layout instead (no relayout copies; :func:`_in_place`).

    Args:
      g, m, v, correction1, correction2, block_size, quantization: as the reference
        (``block_size``: a power of 2 and a multiple of 128).
      b1, b2, eps: Python numbers (compiled into the kernel).
      target: ``"triton"`` or ``"tpu"``. interpret: run in interpret mode.
      block_rows: quantization blocks per grid step.

    Returns:
      ``(update, m_new, v_new)``; in interpret mode the moments equal the reference's bit for
      bit and the update within float32 round-off.
    """
    c1, c2 = _check(g, m, v, block_size, correction1, correction2)
    problem = kernel_block_problem(block_size)
    if problem is not None:
        raise ValueError(f"adam_8bit_update_pallas: {problem}.")
    if not _dispatch.is_static_number(b1, b2, eps):
        raise ValueError("adam_8bit_update_pallas: b1, b2 and eps must be Python numbers.")

    kernel = functools.partial(
        _kernel, b1=b1, b2=b2, eps=eps, quantization=quantization, target=target
    )
    tile = _matrix_tile(g.shape, block_size, target, block_rows)
    if tile is not None:
        return _in_place(kernel, g, m, v, c1, c2, tile, block_size, quantization, interpret)
    signed_zero = int(np.searchsorted(code_map(True, quantization), 0.0))
    n_blocks, padded, br = _layout(g.size, block_size, target, block_rows)
    g2 = _dispatch.to_rows(g, block_size, padded)
    m2 = _dispatch.to_rows(m[0], block_size, padded, fill=signed_zero)
    v2 = _dispatch.to_rows(v[0], block_size, padded, fill=0)  # the unsigned map's 0.0
    rows = pl.BlockSpec((br, block_size), lambda i: (i, 0))
    scales = pl.BlockSpec((br, 1), lambda i: (i, 0))
    scalar = pl.BlockSpec((1, 1), lambda i: (0, 0))
    codes_shape = jax.ShapeDtypeStruct(g2.shape, jnp.uint8)
    scales_shape = jax.ShapeDtypeStruct((padded, 1), jnp.float32)
    u, m_codes, m_scales, v_codes, v_scales = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(g2.shape, g.dtype),
            codes_shape,
            scales_shape,
            codes_shape,
            scales_shape,
        ),
        grid=(padded // br,),
        in_specs=[
            scalar,
            scalar,
            table_spec(target),
            table_spec(target),
            rows,
            rows,
            scales,
            rows,
            scales,
        ],
        out_specs=(rows, rows, scales, rows, scales),
        input_output_aliases={5: 1, 6: 2, 7: 3, 8: 4},
        name="adam_8bit_update",
        **_dispatch.pallas_options(target, interpret),
    )(
        c1.reshape(1, 1),
        c2.reshape(1, 1),
        table_operand(True, quantization, target),
        table_operand(False, quantization, target),
        g2,
        m2,
        _dispatch.to_rows(m[1], 1, padded),
        v2,
        _dispatch.to_rows(v[1], 1, padded),
    )
    shape = g.shape
    return (
        _dispatch.from_rows(u, shape),
        QuantizedArray(_dispatch.from_rows(m_codes, shape), m_scales[:n_blocks, 0]),
        QuantizedArray(_dispatch.from_rows(v_codes, shape), v_scales[:n_blocks, 0]),
    )


# Larger matrices keep the row view: measured, not understood. The tiles lower the v5e peak of
# every 60M and 1B step with 8-bit state (the embedding and head, 32000 x 512 and 32000 x 2048:
# e.g. 8-bit AdamW 513 -> 390 MB at 60M, 8-bit GaLore 11.45 -> 10.11 GB at 1B), but at 7B
# (32000 x 4096) the layer-wise 8-bit GaLore step with remat needs more with them: 22.03
# against 20.98 GB on a v5p, 19.73 against 19.36 GiB asked on a v5e.
_MAX_TILED = 1 << 26


def _matrix_tile(
    shape: tuple[int, ...], block_size: int, target: str, block_rows: int | None
) -> int | None:
    """Rows per grid step of the in-place TPU layout (:func:`_in_place`), or ``None`` when the
    leaf takes the row layout: a TPU target, a matrix ``(R, C)`` whose rows hold several whole
    quantization blocks (``C`` a multiple of ``block_size``, ``C > block_size``), and a number
    of rows per step that divides ``R`` and is a multiple of 32 (uint8 codes tile ``(32, 128)``)
    or is ``R``; at most :data:`_MAX_TILED` elements. ``block_rows`` (tests) forces it."""
    if target != "tpu" or len(shape) != 2 or shape[1] % block_size or shape[1] == block_size:
        return None
    if shape[0] * shape[1] > _MAX_TILED:
        return None
    rows = shape[0]
    if block_rows:
        return block_rows if rows % block_rows == 0 else None
    most = max(_BUDGET["tpu"] // block_size, 32)
    if rows <= most:
        return rows
    for step in range(most - most % 32, 0, -32):
        if rows % step == 0:
            return step
    return None


def _in_place(
    kernel: Any,
    g: jax.Array,
    m: Any,
    v: Any,
    c1: jax.Array,
    c2: jax.Array,
    tile: int,
    block_size: int,
    quantization: str,
    interpret: bool,
) -> tuple[jax.Array, Any, Any]:
    """The kernel on a matrix ``(R, C)`` in its own layout: grid step ``(i, j)`` takes rows
    ``i·tile ...`` and columns ``j·block_size ...``, which are ``tile`` whole quantization
    blocks (row-major blocks are row segments), so the gradient, the update and the codes are
    not reshaped to ``(blocks, block_size)``. On a TPU that reshape is a relayout copy of each
    (the ``(8, 128)``-tiled layout of a ``32000 x 512`` embedding is not that of ``64000 x
    256``): 3 copies of the embedding and the head at ``llama_60m``. The scales, one float per
    block, go in as ``(C / block_size, R, 1)``."""
    rows, cols = g.shape
    per_row = cols // block_size
    to_grid = lambda scales: scales.reshape(rows, per_row).T[:, :, None]
    from_grid = lambda scales: scales[:, :, 0].T.reshape(-1)
    matrix = pl.BlockSpec((tile, block_size), lambda i, j: (i, j))
    scales = pl.BlockSpec((None, tile, 1), lambda i, j: (j, i, 0))
    scalar = pl.BlockSpec((1, 1), lambda i, j: (0, 0))
    table = pl.BlockSpec((2, 128), lambda i, j: (0, 0))
    codes_shape = jax.ShapeDtypeStruct(g.shape, jnp.uint8)
    scales_shape = jax.ShapeDtypeStruct((per_row, rows, 1), jnp.float32)
    options = _dispatch.pallas_options("tpu", interpret)
    options["compiler_params"] = dataclasses.replace(
        options["compiler_params"], dimension_semantics=("parallel", "parallel")
    )
    u, m_codes, m_scales, v_codes, v_scales = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(g.shape, g.dtype), codes_shape, scales_shape,
                   codes_shape, scales_shape),  # fmt: skip
        grid=(rows // tile, per_row),
        in_specs=[scalar, scalar, table, table, matrix, matrix, scales, matrix, scales],
        out_specs=(matrix, matrix, scales, matrix, scales),
        input_output_aliases={5: 1, 6: 2, 7: 3, 8: 4},
        name="adam_8bit_update",
        **options,
    )(
        c1.reshape(1, 1),
        c2.reshape(1, 1),
        table_operand(True, quantization, "tpu"),
        table_operand(False, quantization, "tpu"),
        g,
        m[0],
        to_grid(m[1]),
        v[0],
        to_grid(v[1]),
    )
    return u, QuantizedArray(m_codes, from_grid(m_scales)), QuantizedArray(
        v_codes, from_grid(v_scales)
    )


def adam_8bit_update(
    g: jax.Array,
    m: Any,
    v: Any,
    *,
    b1: Any,
    b2: Any,
    eps: Any,
    correction1: Any,
    correction2: Any,
    block_size: int,
    quantization: str = "dynamic",
    mode: str | None = None,
) -> tuple[jax.Array, Any, Any]:
    r"""One 8-bit Adam step on a quantized leaf, fused in one Pallas kernel where it pays.

    .. math::
        m' = \beta_1 \tilde m + (1-\beta_1) g,\quad v' = \beta_2 \tilde v + (1-\beta_2) g^2,
        \quad u = \frac{m' / (1-\beta_1^t)}{\sqrt{v' / (1-\beta_2^t)} + \epsilon}

    :math:`\tilde m, \tilde v` dequantized from, and :math:`m', v'` requantized into, the
    block-wise 8-bit format of :func:`lowrank_jax.scale_by_adam_8bit`.

    Args:
      g: the gradient leaf.
      m, v: its moments, ``(codes, scales)`` pairs (``QuantizedArray``).
      b1, b2, eps: Adam constants (Python numbers for the kernel).
      correction1, correction2: float32 scalars ``1 - b1**t`` and ``1 - b2**t``.
      block_size, quantization: the moments' format.
      mode: ``"auto"``, ``"pallas"``, ``"interpret"`` or ``"reference"`` (default: the
        :func:`~lowrank_jax.kernels.kernel_mode` in force).

    Returns:
      ``(update, m_new, v_new)``: the update in ``g``'s dtype, the new ``QuantizedArray``s.

    Raises:
      ValueError: shapes that do not match, codes that are not ``uint8``, scales of the wrong
        length, non-scalar corrections, or a forced Pallas mode that cannot run.

    References:
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022; bitsandbytes
      ``AdamW8bit``.
    """
    _check(g, m, v, block_size, correction1, correction2)
    code_map(True, quantization)
    static = _dispatch.is_static_number(b1, b2, eps)
    problem = kernel_block_problem(block_size)
    if problem is None and not static:
        problem = "b1, b2 and eps must be Python numbers"
    if problem is None and g.size == 0:
        problem = "g is empty"
    plan = _dispatch.choose(
        "adam_8bit_update",
        mode,
        supported=problem,
        free_layout=lambda target: (
            len(set(_layout(g.size, block_size, target)[:2])) == 1 and g.size % block_size == 0
        ),
        size=g.size,
        probe=lambda target: _probe(target, g.dtype, b1, b2, eps, block_size, quantization),
    )
    args = dict(
        b1=b1,
        b2=b2,
        eps=eps,
        correction1=correction1,
        correction2=correction2,
        block_size=block_size,
        quantization=quantization,
    )
    if plan is None:
        return adam_8bit_update_reference(g, m, v, **args)
    target, interpret = plan
    return adam_8bit_update_pallas(g, m, v, target=target, interpret=interpret, **args)


def _probe(target: str, *key: Any) -> bool:
    g_dtype, b1, b2, eps, block_size, quantization = key

    def check() -> None:
        rng = np.random.default_rng(0)
        shape = (64, block_size)
        fmt = dict(quantization=quantization)
        g = jnp.asarray(rng.standard_normal(shape), g_dtype)
        m = quantize_blockwise_reference(
            jnp.asarray(rng.standard_normal(shape), jnp.float32), block_size, **_SIGNED, **fmt
        )
        v = quantize_blockwise_reference(
            jnp.asarray(rng.uniform(0, 1, shape), jnp.float32), block_size, **_UNSIGNED, **fmt
        )
        args = dict(
            b1=b1,
            b2=b2,
            eps=eps,
            correction1=jnp.float32(0.5),
            correction2=jnp.float32(0.25),
            block_size=block_size,
            quantization=quantization,
        )
        want = adam_8bit_update_reference(g, m, v, **args)
        got = jax.jit(functools.partial(adam_8bit_update_pallas, target=target, **args))(g, m, v)
        tol = 8 * float(jnp.finfo(g_dtype).eps)
        np.testing.assert_allclose(
            np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), rtol=tol, atol=tol
        )
        assert_codes_close(got[1], want[1])
        assert_codes_close(got[2], want[2])

    return _dispatch.probe_once(f"adam_8bit_update[{target}, {key}]", check)
