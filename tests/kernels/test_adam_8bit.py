"""The fused 8-bit Adam kernel against its reference and ``scale_by_adam_8bit``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax.kernels as K
from lowrank_jax.quantization import QuantizedArray
from lowrank_jax.transforms import scale_by_adam_8bit

CONSTS = dict(b1=0.9, b2=0.999, eps=1e-8)
BLOCK = 256


def assert_moments_close(got, want):
    """Scales within float32 round-off; codes within one level, and almost all equal.

    The kernel's ``b·m + (1-b)·g`` may round differently from XLA's fused version of the
    reference (multiply-add contraction), which can move a value on a code boundary.
    """
    for a, b in zip(got, want, strict=True):
        assert isinstance(a, QuantizedArray)
        assert a.codes.dtype == jnp.uint8 and a.codes.shape == b.codes.shape
        np.testing.assert_allclose(np.asarray(a.scales), np.asarray(b.scales), rtol=1e-6)
        diff = np.abs(np.asarray(a.codes, np.int32) - np.asarray(b.codes, np.int32))
        assert diff.max() <= 1 and diff.mean() < 0.01


def run_transform(shape, quantization, steps, seed=0):
    """Per step: (g, m, v, corrections) in, and the transform's (update, m, v) out."""
    tx = scale_by_adam_8bit(block_size=BLOCK, min_8bit_size=1, quantization=quantization, **CONSTS)
    state = tx.init({"w": jnp.zeros(shape)})
    update = jax.jit(tx.update)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        t = (state.count + 1).astype(jnp.float32)
        inputs = (g, state.mu["w"], state.nu["w"], 1 - CONSTS["b1"] ** t, 1 - CONSTS["b2"] ** t)
        u, state = update({"w": g}, state)
        yield inputs, (u["w"], state.mu["w"], state.nu["w"])


def step_fn(fn, quantization, **kwargs):
    def step(g, m, v, c1, c2):
        return fn(
            g,
            m,
            v,
            correction1=c1,
            correction2=c2,
            block_size=BLOCK,
            quantization=quantization,
            **CONSTS,
            **kwargs,
        )

    return jax.jit(step)


@pytest.mark.parametrize("quantization", ["dynamic", "linear"])
def test_reference_equals_scale_by_adam_8bit(quantization):
    reference = step_fn(K.adam_8bit_update_reference, quantization)
    for inputs, (u, m, v) in run_transform((3, 300), quantization, steps=3):
        got = reference(*inputs)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(u), rtol=1e-6, atol=1e-7)
        for a, b in ((got[1], m), (got[2], v)):
            np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
            np.testing.assert_array_equal(np.asarray(a.scales), np.asarray(b.scales))


def test_pallas_matches_reference_over_steps_with_padding():
    """900 elements (4 blocks, the last one padded), two blocks per grid step."""
    reference = step_fn(K.adam_8bit_update_reference, "dynamic")
    kernel = step_fn(K.adam_8bit_update_pallas, "dynamic", interpret=True, block_rows=2)
    for inputs, _ in run_transform((3, 300), "dynamic", steps=3):
        got, want = kernel(*inputs), reference(*inputs)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-7)
        assert_moments_close(got[1:], want[1:])


def test_tpu_variant_and_bfloat16_gradient():
    reference = step_fn(K.adam_8bit_update_reference, "dynamic")
    kernel = step_fn(K.adam_8bit_update_pallas, "dynamic", target="tpu", interpret=True)
    (g, *rest), _ = next(run_transform((4, 128), "dynamic", steps=1))
    inputs = (g.astype(jnp.bfloat16), *rest)
    got, want = kernel(*inputs), reference(*inputs)
    assert got[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), rtol=1e-2
    )
    assert_moments_close(got[1:], want[1:])


@pytest.mark.parametrize(
    "shape, block_rows", [((64, 512), 32), ((40, 768), None), ((96, 1024), None)]
)
def test_tpu_kernel_tiles_a_matrix_in_its_own_layout(shape, block_rows):
    """A matrix whose rows hold whole blocks is tiled ``(rows, block_size)`` in place (a 2-D
    grid, scales as ``(blocks per row, rows, 1)``): no reshape of the gradient, the update or
    the codes (``adam_8bit._in_place``); the same results as the reference over steps."""
    from lowrank_jax.kernels import adam_8bit

    assert adam_8bit._matrix_tile(shape, BLOCK, "tpu", block_rows) == (block_rows or shape[0])
    reference = step_fn(K.adam_8bit_update_reference, "dynamic")
    kernel = step_fn(K.adam_8bit_update_pallas, "dynamic", target="tpu", interpret=True,
                     block_rows=block_rows)  # fmt: skip
    jaxpr = str(jax.make_jaxpr(kernel)(*next(run_transform(shape, "dynamic", steps=1))[0]))
    assert f"[{shape[0] * shape[1] // BLOCK},{BLOCK}]" not in jaxpr  # no (blocks, 256) view
    for inputs, _ in run_transform(shape, "dynamic", steps=3, seed=1):
        got, want = kernel(*inputs), reference(*inputs)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-7)
        assert_moments_close(got[1:], want[1:])


def test_matrix_tiles_fall_back_to_rows():
    from lowrank_jax.kernels import adam_8bit

    assert adam_8bit._matrix_tile((64, 256), BLOCK, "tpu", None) is None  # one block per row
    assert adam_8bit._matrix_tile((64, 512), BLOCK, "triton", None) is None
    assert adam_8bit._matrix_tile((4, 64, 512), BLOCK, "tpu", None) is None
    assert adam_8bit._matrix_tile((300, 512), BLOCK, "tpu", None) is None  # no tile divides 300
    assert adam_8bit._matrix_tile((32000, 512), BLOCK, "tpu", None) == 256
    assert adam_8bit._matrix_tile((32000, 2048), BLOCK, "tpu", None) == 256
    assert adam_8bit._matrix_tile((32000, 4096), BLOCK, "tpu", None) is None  # 7B: rows


def test_dispatcher_on_cpu_uses_the_reference():
    (inputs, _) = next(run_transform((2, 256), "dynamic", steps=1))
    jaxpr = jax.make_jaxpr(step_fn(K.adam_8bit_update, "dynamic"))(*inputs)
    assert "pallas_call" not in str(jaxpr)
    jaxpr = jax.make_jaxpr(step_fn(K.adam_8bit_update, "dynamic", mode="interpret"))(*inputs)
    assert "pallas_call" in str(jaxpr)


def test_bad_inputs_raise():
    g = jnp.zeros((2, 256))
    q = QuantizedArray(jnp.zeros((2, 256), jnp.uint8), jnp.zeros(2))
    call = functools.partial(K.adam_8bit_update, correction1=0.1, correction2=0.1, **CONSTS)
    with pytest.raises(ValueError, match="m.codes has shape"):
        call(g, QuantizedArray(jnp.zeros((512,), jnp.uint8), jnp.zeros(2)), q, block_size=BLOCK)
    with pytest.raises(ValueError, match="scales of shape"):
        call(g, q, QuantizedArray(q.codes, jnp.zeros(3)), block_size=BLOCK)
    with pytest.raises(ValueError, match="correction1 must be a scalar"):
        K.adam_8bit_update(
            g, q, q, correction1=jnp.ones(2), correction2=0.1, block_size=BLOCK, **CONSTS
        )
    small = QuantizedArray(jnp.zeros((3, 64), jnp.uint8), jnp.zeros(3))
    with pytest.raises(ValueError, match="power of 2"):
        call(jnp.zeros((3, 64)), small, small, block_size=64, mode="interpret")
