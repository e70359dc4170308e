"""8-bit block-wise quantize/dequantize kernels: bit for bit the format's jnp reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax.kernels as K
from lowrank_jax import quantization as Q
from lowrank_jax.quantization import code_map

BLOCK = 256


def boundary_input(signed, quantization):
    """Every map value, every midpoint and its float32 neighbours, plus random values.

    Each block starts with 1.0, so its absmax is 1 and the kernel sees these exact values; then
    a block scaled by 3.7, an all-zero block and a 77-element tail (padding).
    """
    table = code_map(signed, quantization)
    mids = ((table[:-1].astype(np.float64) + table[1:]) / 2).astype(np.float32)
    low = -1.0 if signed else 0.0
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            table,
            mids,
            np.nextafter(mids, np.float32(2)),
            np.nextafter(mids, np.float32(-2)),
            rng.uniform(low, 1.0, 300).astype(np.float32),
            1e-8 * rng.uniform(low, 1.0, 20),
        ]
    ).astype(np.float32)
    values = values[(values >= low) & (values <= 1.0)]
    values = np.pad(values, (0, -values.size % (BLOCK - 1)))
    blocks = np.concatenate(
        [np.ones((values.size // (BLOCK - 1), 1)), values.reshape(-1, BLOCK - 1)], axis=1
    )
    scaled = 3.7 * rng.uniform(low, 1.0, BLOCK)
    tail = rng.uniform(low, 1.0, 77)
    x = np.concatenate([blocks.reshape(-1), scaled, np.zeros(BLOCK), tail]).astype(np.float32)
    return jnp.asarray(x)


def jitted(fn, **kwargs):
    return jax.jit(functools.partial(fn, **kwargs), static_argnums=1)


@pytest.mark.parametrize("quantization", ["dynamic", "linear"])
@pytest.mark.parametrize("signed", [True, False])
def test_kernels_equal_the_reference_bit_for_bit(signed, quantization):
    fmt = dict(signed=signed, quantization=quantization)
    x = boundary_input(signed, quantization)
    want = jitted(Q.quantize_blockwise, **fmt)(x, BLOCK)
    got = jitted(K.quantize_blockwise_pallas, interpret=True, block_rows=4, **fmt)(x, BLOCK)
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
    np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))
    assert got.codes.dtype == jnp.uint8 and got.codes.shape == x.shape
    # every code occurs, so the dequantize comparison covers the whole table
    assert np.unique(np.asarray(want.codes)).size >= 255
    back = jitted(K.dequantize_blockwise_pallas, interpret=True, block_rows=4, **fmt)(want, BLOCK)
    np.testing.assert_array_equal(
        np.asarray(back), np.asarray(jitted(Q.dequantize_blockwise, **fmt)(want, BLOCK))
    )


def test_tpu_variant_and_bfloat16_input():
    """The TPU gather (two 128-lane take_along_axis) on the TPU interpreter; bf16 upcast."""
    fmt = dict(signed=True, quantization="dynamic")
    x = boundary_input(True, "dynamic")[: 4 * BLOCK].astype(jnp.bfloat16).reshape(8, 128)
    want = jitted(Q.quantize_blockwise, **fmt)(x, BLOCK)
    got = jitted(K.quantize_blockwise_pallas, target="tpu", interpret=True, **fmt)(x, BLOCK)
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
    np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))
    back = jitted(K.dequantize_blockwise_pallas, target="tpu", interpret=True, **fmt)(want, BLOCK)
    np.testing.assert_array_equal(
        np.asarray(back), np.asarray(jitted(Q.dequantize_blockwise, **fmt)(want, BLOCK))
    )


def test_larger_block_size_uses_several_lane_chunks():
    fmt = dict(signed=False, quantization="dynamic")
    x = jnp.square(jax.random.normal(jax.random.key(0), (3, 700)))
    want = jitted(Q.quantize_blockwise, **fmt)(x, 512)
    got = jitted(K.quantize_blockwise, mode="interpret", **fmt)(x, 512)
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
    np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: K.quantize_blockwise(jnp.ones(300), 64, signed=True, mode="interpret"),
            "power of 2 and a multiple of 128",
        ),
        (
            lambda: K.quantize_blockwise(jnp.ones(300), 384, signed=True, mode="interpret"),
            "power of 2",
        ),
        (lambda: K.quantize_blockwise(jnp.ones(3), 0, signed=True), "positive Python int"),
        (
            lambda: K.quantize_blockwise(jnp.ones(3), 256, signed=True, quantization="log"),
            "quantization must be one of",
        ),
        (lambda: K.quantize_blockwise(jnp.ones(3, jnp.int32), 256, signed=True), "float array"),
        (
            lambda: K.quantize_blockwise(jnp.ones(3), 256, signed=True, mode="fast"),
            "kernel mode must be one of",
        ),
        (
            lambda: K.quantize_blockwise(jnp.ones(3), 256, signed=True, mode="pallas"),
            "needs a CUDA GPU",
        ),
        (
            lambda: K.dequantize_blockwise(
                (jnp.ones(300, jnp.int32), jnp.ones(2)), 256, signed=True
            ),
            "uint8",
        ),
        (
            lambda: K.dequantize_blockwise(
                (jnp.ones(300, jnp.uint8), jnp.ones(3)), 256, signed=True
            ),
            r"scales of shape \(2,\)",
        ),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unsupported_block_size_falls_back_to_the_reference_in_auto_mode():
    x = jnp.linspace(-1, 1, 300)
    q = jitted(K.quantize_blockwise, signed=True)(x, 64)
    want = jitted(Q.quantize_blockwise, signed=True)(x, 64)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(want.codes))
