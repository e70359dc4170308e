"""The block-quantized storage format of QLoRA's frozen base: NF4 (double-quantized scales) and
int8. Error bounds, exact round trips, layout, bytes, jit, bad input, and parity with
bitsandbytes (live when installed: the ``compare`` extra)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import memory
from lowrank_jax.reparam import quant

from .conftest import normal

W = normal(0, (96, 320), 0.02)  # 480 blocks of 64: two second-level blocks, the last partial


def test_nf4_levels_are_the_papers_constants_and_its_construction():
    # QLoRA Appendix E lists these 16 values; building them from the N(0, 1) quantiles with
    # the paper's offset gives the same table within one float32 ulp.
    assert quant.NF4_LEVELS.shape == (16,) and quant.NF4_LEVELS.dtype == np.float32
    assert quant.NF4_LEVELS[7] == 0 and quant.NF4_LEVELS[0] == -1 and quant.NF4_LEVELS[15] == 1
    assert np.all(np.diff(quant.NF4_LEVELS) > 0)
    np.testing.assert_allclose(quant.normal_float_levels(4), quant.NF4_LEVELS, rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(quant.NF4_LEVELS[[1, 8, 14]], [-0.6961928, 0.0795803, 0.7229568],
                               atol=1e-7)
    # Equal-probability bins: the levels are quantiles of N(0, 1), not a uniform grid.
    gaps = np.diff(quant.NF4_LEVELS[7:])
    assert gaps[0] < gaps[-1] / 2


def test_dynamic_map_layout():
    m = quant.dynamic_map()
    assert m.shape == (256,) and np.all(np.diff(m) >= 0)
    assert m[-1] == 1.0 and 0.0 in m and -1.0 not in m  # -1 has no code (bitsandbytes)
    assert np.isclose(m[0], -0.99296875)


def relative_error(x, y):
    return float(jnp.linalg.norm(x - y) / jnp.linalg.norm(x))


def uniform_int4(x, block=64):
    rows = x.reshape(-1, block)
    s = jnp.abs(rows).max(1, keepdims=True)
    return (jnp.round(rows / s * 7) / 7 * s).reshape(x.shape)


def test_nf4_error_on_gaussian_weights():
    w = normal(1, (256, 512))
    q = quant.quantize(w, "nf4")
    err = relative_error(w, quant.dequantize(q))
    # ~0.092 for N(0, 1) in blocks of 64 (exact scales: 0.0921; double quantization adds <1e-4),
    # below a uniform 4-bit absmax grid's ~0.108: NF4 spends its levels where normals are.
    assert 0.085 < err < 0.095
    assert err < 0.9 * relative_error(w, uniform_int4(w))
    exact_scales = quant.dequantize(quant.quantize(w, double_quant=False))
    assert abs(err - relative_error(w, exact_scales)) < 1e-3


def block_scales(q):
    """The dequantized per-block scales ŝ (what the codes are multiplied by)."""
    return np.asarray(quant._dequantize_scales(q))


def test_nf4_per_element_bound_with_double_quantization():
    q = quant.quantize(W, "nf4")
    exact = np.abs(np.asarray(W)).reshape(-1, 64).max(1)
    scales = block_scales(q)
    # Second level: |s - ŝ| <= half the widest gap of the dynamic map times the block absmax
    # of s - mean(s) (256 scales per block).
    dev = np.abs(exact - exact.mean())
    per_scale_block = np.repeat([dev[:256].max(), dev[256:].max()], 256)[:480]
    half_gap = np.diff(quant.dynamic_map()).max() / 2
    assert np.all(np.abs(scales - exact) <= half_gap * per_scale_block * (1 + 1e-5) + 1e-9)
    # First level: |x - q_c ŝ| <= half the widest NF4 gap · s + |s - ŝ|.
    err = np.abs(np.asarray(W) - np.asarray(quant.dequantize(q))).reshape(-1, 64).max(1)
    assert np.all(err <= quant.max_nf4_error(1.0) * exact + np.abs(scales - exact) + 1e-7)
    # Without double quantization the scales are exact.
    plain = quant.quantize(W, "nf4", double_quant=False)
    np.testing.assert_array_equal(np.asarray(plain.scales), exact)
    err = np.abs(np.asarray(W) - np.asarray(quant.dequantize(plain))).reshape(-1, 64).max(1)
    assert np.all(err <= quant.max_nf4_error(1.0) * exact * (1 + 1e-6))


def test_values_on_the_levels_round_trip_exactly():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, (48, 64))
    codes[:, 0] = 15  # every block holds +absmax, so its scale is exactly s
    s = rng.uniform(0.5, 2.0, (48, 1)).astype(np.float32)
    x = jnp.asarray(quant.NF4_LEVELS[codes] * s)
    q = quant.quantize(x, "nf4", double_quant=False)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), np.asarray(x))
    # With double quantization the 4-bit codes are still exact (only the scales are rounded).
    q2 = quant.quantize(x, "nf4")
    np.testing.assert_array_equal(np.asarray(q2.codes), np.asarray(q.codes))
    # int8: multiples of s/127.
    k = rng.integers(-127, 128, (48, 64))
    k[:, 0] = 127
    y = jnp.asarray(k / np.float32(127.0) * s, jnp.float32)
    np.testing.assert_allclose(np.asarray(quant.dequantize(quant.quantize(y, "int8"))),
                               np.asarray(y), rtol=2e-7, atol=0)
    np.testing.assert_array_equal(np.asarray(quant.quantize(y, "int8").codes).reshape(48, 64), k)


def test_int8_error_is_at_most_absmax_over_254_per_block():
    w = normal(3, (64, 256))
    q = quant.quantize(w, "int8")
    assert q.codes.dtype == jnp.int8 and q.scales.dtype == jnp.float32 and q.offset is None
    err = np.abs(np.asarray(w - quant.dequantize(q))).reshape(-1, 64).max(1)
    absmax = np.abs(np.asarray(w)).reshape(-1, 64).max(1)
    assert np.all(err <= absmax / 254 * (1 + 1e-5))
    assert np.any(err > absmax / 254 * 0.9)  # the bound is tight


def test_packing_and_layout():
    x = jnp.asarray(np.outer(np.ones(2), quant.NF4_LEVELS[[15, 0, 7, 8] * 16]), jnp.float32)
    q = quant.quantize(x, "nf4", double_quant=False)
    # Two codes per byte, the first in the high nibble (bitsandbytes' packing).
    assert q.codes.shape == (64,) and q.codes.dtype == jnp.uint8
    assert int(q.codes[0]) == 15 << 4 | 0 and int(q.codes[1]) == 7 << 4 | 8
    # perm: blocks run along the axis that comes last after permuting (a PyTorch weight's in).
    k = normal(4, (128, 64))  # a Flax (in, out) kernel
    qt = quant.quantize(k, "nf4", perm=(1, 0))
    np.testing.assert_array_equal(np.asarray(qt.codes), np.asarray(quant.quantize(k.T).codes))
    back = quant.dequantize(qt)
    assert back.shape == (128, 64)
    transposed = quant.dequantize(quant.quantize(k.T))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(transposed).T)
    # An all-zero block codes zeros.
    z = quant.quantize(jnp.zeros((2, 64)).at[1].set(1.0), "nf4")
    np.testing.assert_array_equal(np.asarray(quant.dequantize(z))[0], 0.0)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_storage_bytes_match_the_arrays(fmt, double_quant):
    shape = (96, 320)
    q = jax.eval_shape(lambda x: quant.quantize(x, fmt, double_quant=double_quant), W)
    want = quant.storage_bytes(shape, fmt, double_quant=double_quant)
    assert memory.tree_bytes(q) == want
    assert quant.quantize(W, fmt, double_quant=double_quant).nbytes == want


def test_nf4_is_under_three_tenths_of_bfloat16():
    for shape in [(4096, 4096), (576, 1536), (128, 344)]:
        bf16 = np.prod(shape) * 2
        assert quant.storage_bytes(shape, "nf4") <= 0.3 * bf16
        assert quant.storage_bytes(shape, "int8") <= 0.55 * bf16


def test_quantize_and_dequantize_jit_and_keep_dtype():
    w = W.astype(jnp.bfloat16)
    q = jax.jit(quant.quantize, static_argnames=("format",))(w, format="nf4")
    eager = quant.quantize(w, "nf4")
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(eager.codes))
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(eager)):  # fused reductions: <= 1 ulp
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6)
    assert q.dtype == "bfloat16" and q.shape == w.shape
    out = jax.jit(quant.dequantize)(q)
    assert out.dtype == jnp.bfloat16
    assert jax.jit(quant.dequantize, static_argnums=1)(q, jnp.float32).dtype == jnp.float32
    assert q[...].shape == w.shape  # indexing dequantizes


def test_bad_input():
    with pytest.raises(ValueError, match="'nf3' is not a storage format; use 'nf4'"):
        quant.quantize(W, "nf3")
    with pytest.raises(ValueError, match="not a whole number of blocks of 64; use a block_size"):
        quant.quantize(jnp.ones((3, 7)), "nf4")
    with pytest.raises(ValueError, match="block_size must be even"):
        quant.quantize(W, "nf4", block_size=15)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        quant.quantize(W, "int8", block_size=0)
    with pytest.raises(ValueError, match="must be a float array"):
        quant.quantize(jnp.ones((64, 2), jnp.int32))


def test_parity_with_bitsandbytes():
    torch = pytest.importorskip("torch", reason="bitsandbytes parity needs the compare extra")
    bnb = pytest.importorskip("bitsandbytes.functional",
                              reason="pip install 'lowrank_jax[compare]' (bitsandbytes)")
    w = np.array(W)  # a PyTorch-layout (out, in) weight
    w[3, :64] = 0.0
    np.testing.assert_array_equal(bnb.get_4bit_type("nf4", device="cpu").numpy(),
                                  quant.NF4_LEVELS)
    np.testing.assert_allclose(bnb.create_dynamic_map().numpy(), quant.dynamic_map(),
                               rtol=2e-7, atol=0)  # float32 vs float64 linspace: <= 1 ulp
    # Without double quantization: codes, packing and absmax bit for bit.
    packed, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                      compress_statistics=False)
    q = quant.quantize(jnp.asarray(w), "nf4", double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.scales), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)),
                                  bnb.dequantize_4bit(packed, state).numpy())
    # Double quantization: same layout (offset = mean absmax, 8-bit codes of absmax - offset
    # in blocks of 256, one float32 absmax per block). The float32 mean's summation order
    # differs (a few ulps), and bitsandbytes' CPU 8-bit encoder is not always the nearest
    # level: a scale near a rounding boundary may take the neighbouring code.
    packed, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                      compress_statistics=True)
    q = quant.quantize(jnp.asarray(w), "nf4")
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    assert state.nested and state.state2.blocksize == q.scale_block_size == 256
    np.testing.assert_allclose(float(q.offset), float(state.offset), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.scale_absmax), state.state2.absmax.numpy(), rtol=1e-6)
    ours, theirs = np.asarray(q.scales, np.int32), state.absmax.numpy().astype(np.int32)
    assert np.abs(ours - theirs).max() <= 1 and np.mean(ours == theirs) > 0.99
    np.testing.assert_allclose(np.asarray(quant.dequantize(q)),
                               bnb.dequantize_4bit(packed, state).numpy(), rtol=0, atol=2e-4)


def test_quantized_tensor_is_a_pytree_with_static_layout():
    q = quant.quantize(W, "nf4")
    leaves, treedef = jax.tree.flatten(q)
    assert [x.dtype for x in leaves] == [jnp.uint8, jnp.uint8, jnp.float32, jnp.float32]
    again = jax.tree.unflatten(treedef, leaves)
    assert (again.format, again.shape, again.block_size, again.scale_block_size) == (
        "nf4", (96, 320), 64, 256)
    assert len(jax.tree.leaves(quant.quantize(W, "int8"))) == 2  # no placeholders
