"""8-bit Adam states: code maps, block-wise round trip, memory, fidelity, 8-bit GaLore."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import memory
from lowrank_jax.optimizers import adamw_8bit, galore_adamw_8bit
from lowrank_jax.quantization import code_map, dequantize_blockwise, quantize_blockwise
from lowrank_jax.transforms import QuantizedArray, galore, scale_by_adam_8bit
from tests.helpers import run_steps

SDS = jax.ShapeDtypeStruct


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("quantization", ["dynamic", "linear"])
def test_code_maps_have_256_sorted_values_with_zero_and_one(signed, quantization):
    table = code_map(signed, quantization)
    assert table.shape == (256,) and np.all(np.diff(table) >= 0)
    assert len(np.unique(table)) >= 255
    assert 0.0 in table and table.max() == 1.0
    assert table.min() >= (-1.0 if signed else 0.0)


def test_dynamic_quantization_keeps_small_values_that_linear_loses(key):
    # a second moment: squares of gradients spanning two orders of magnitude per block
    x = jnp.square(jax.random.normal(key, (64, 256)) * jnp.logspace(-2, 0, 256)).reshape(-1, 256)
    blockmax = jnp.max(x, axis=1, keepdims=True)
    small = (x > 1e-4 * blockmax) & (x < 1e-3 * blockmax)
    relative = {}
    for quantization in ("dynamic", "linear"):
        kind = dict(signed=False, quantization=quantization)
        back = dequantize_blockwise(quantize_blockwise(x, 256, **kind), 256, **kind)
        assert float(jnp.max(jnp.abs(back - x) / blockmax)) <= 0.01  # both: 1% of absmax
        relative[quantization] = (jnp.abs(back - x) / x)[small]
    # dynamic: every small value keeps its magnitude; linear: they are (nearly) all zeroed
    assert float(jnp.max(relative["dynamic"])) < 0.3
    assert float(jnp.mean(relative["linear"] == 1.0)) > 0.9


def test_roundtrip_of_a_ragged_signed_tensor(key):
    x = jax.random.normal(key, (7, 300))  # 2100 elements: the last block is partial
    q = quantize_blockwise(x, 256, signed=True)
    assert q.codes.shape == x.shape and q.codes.dtype == jnp.uint8 and q.scales.shape == (9,)
    back = dequantize_blockwise(q, 256, signed=True)
    np.testing.assert_allclose(back, x, atol=0.008 * float(jnp.max(jnp.abs(x))))
    # the codes are the nearest values of the map (an arithmetic encoder, no search)
    table = code_map(True)
    blocks = jnp.pad(x.reshape(-1), (0, 9 * 256 - x.size)).reshape(9, 256)
    normed = (blocks / q.scales[:, None]).reshape(-1)[: x.size]
    nearest = np.searchsorted((table[1:] + table[:-1]) / 2, np.asarray(normed))
    assert np.mean(nearest == np.asarray(q.codes).reshape(-1)) > 0.999


def test_large_moments_cost_at_most_0_27_of_float32():
    params = {"w": SDS((4096, 4096), jnp.float32), "b": SDS((1024,), jnp.float32)}
    measured = memory.state_bytes(scale_by_adam_8bit(), params, scalars=False)
    assert measured == memory.adam8bit_bytes(params)
    w_only = memory.state_bytes(scale_by_adam_8bit(), {"w": params["w"]}, scalars=False)
    assert w_only <= 0.27 * memory.adamw_bytes({"w": params["w"]})
    state = jax.eval_shape(scale_by_adam_8bit().init, params)
    assert state.mu["b"].dtype == jnp.float32 and isinstance(state.mu["w"], QuantizedArray)


def test_tracks_float32_adam(key):
    k1, k2 = jax.random.split(key)
    x, w_true = jax.random.normal(k1, (256, 64)), jax.random.normal(k2, (64, 64))
    loss = lambda p: jnp.mean((x @ p["w"] - x @ w_true) ** 2)

    def run(tx):
        params, state = {"w": jnp.zeros((64, 64))}, tx.init({"w": jnp.zeros((64, 64))})

        @jax.jit
        def step(params, state):
            value, g = jax.value_and_grad(loss)(params)
            updates, state = tx.update(g, state, params)
            return optax.apply_updates(params, updates), state, value

        losses = []
        for _ in range(100):
            params, state, value = step(params, state)
            losses.append(float(value))
        return np.array(losses)

    fp32, eight = run(optax.adam(3e-2)), run(adamw_8bit(3e-2, weight_decay=0.0))
    assert eight[-1] < 0.05 * eight[0]
    np.testing.assert_allclose(eight[-10:], fp32[-10:], rtol=0.1)


def test_small_lm_loss_within_2_percent_of_float32_states():
    """A quick version of experiments/eight_bit_vs_fp32.py (40 steps, d=64)."""
    from experiments.eight_bit_vs_fp32 import train

    small = dict(d=64, heads=2, layers=1, context=32, batch=8)
    fp32 = train(optax.adamw(3e-3, weight_decay=0.0), 40, **small)
    eight = train(adamw_8bit(3e-3, weight_decay=0.0), 40, **small)
    assert abs(eight["eval"] - fp32["eval"]) <= 0.02 * fp32["eval"]
    assert eight["state_bytes"] < 0.35 * fp32["state_bytes"]
    assert fp32["losses"][-1] < 0.8 * fp32["losses"][0]  # it learned something


def test_eight_bit_galore_state_and_memory(key):
    params = {"w": SDS((256, 1024), jnp.float32), "norm": SDS((256,), jnp.float32)}
    tx = galore_adamw_8bit(1e-3, rank=64)
    state = jax.eval_shape(tx.init, params)[0]
    mu = state.lowrank_state.mu["w"]
    assert mu.codes.shape == (64, 1024) and mu.codes.dtype == jnp.uint8
    assert memory.state_bytes(tx, params, scalars=False) == memory.galore8bit_bytes(params, rank=64)
    real = jax.tree.map(lambda s: jax.random.normal(key, s.shape), params)
    out, _ = run_steps(galore(scale_by_adam_8bit(), rank=8), real, [real, real])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(out))


def test_inject_hyperparams_and_one_compile(key):
    params = {"w": jax.random.normal(key, (64, 128))}
    grads = [jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), params) for i in range(3)]
    tx = optax.inject_hyperparams(adamw_8bit, static_args=("block_size", "min_8bit_size"))(
        learning_rate=1e-2, weight_decay=0.0
    )
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(1)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    out, state = params, tx.init(params)
    for g in grads:
        out, state = step(out, state, g)
    assert len(traces) == 1
    expected, _ = run_steps(adamw_8bit(1e-2, weight_decay=0.0), params, grads)
    np.testing.assert_allclose(out["w"], expected["w"], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"quantization": "fp8"}, "quantization"),
        ({"block_size": 0}, "block_size"),
        ({"min_8bit_size": 2.5}, "min_8bit_size"),
        ({"block_size": jnp.asarray(256)}, "static_args"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scale_by_adam_8bit(**kwargs)


def test_stacked_leaves_update_slice_by_slice_in_one_slices_memory(key):
    """A ``[L, ...]`` leaf whose slices are whole blocks is updated one slice at a time: the
    same blocks as the whole leaf (here: the same values as a 2-D leaf, which is updated at
    once), to float32 round-off of the update (the two programs fuse differently), and the
    compiled update holds less than half a float32 copy of the stack (at once: 4 copies)."""
    shape, block = (8, 128, 256), 256
    tx = scale_by_adam_8bit(block_size=block)
    flat = lambda tree: jax.tree.map(lambda x: x.reshape(-1, shape[-1]), tree)
    stacked, whole = (
        tx.init({"w": jnp.zeros(shape)}),
        tx.init({"w": jnp.zeros(shape).reshape(-1, 256)}),
    )
    update = jax.jit(tx.update)
    for k in jax.random.split(key, 3):
        g = {"w": jax.random.normal(k, shape)}
        u_stacked, stacked = update(g, stacked)
        u_whole, whole = update(flat(g), whole)
        np.testing.assert_allclose(flat(u_stacked)["w"], u_whole["w"], rtol=1e-6)
        for a, b in ((stacked.mu["w"], whole.mu["w"]), (stacked.nu["w"], whole.nu["w"])):
            np.testing.assert_allclose(a.scales, b.scales, rtol=1e-6)
            # a value within round-off of a code boundary may round to its neighbour
            assert (
                np.mean(np.asarray(a.codes).reshape(-1) != np.asarray(b.codes).reshape(-1)) < 1e-3
            )
    temp = memory.compiled_memory(tx.update, g, stacked).temp_bytes
    stack_f32 = 4 * np.prod(shape)
    assert temp < 0.5 * stack_f32, (temp, stack_f32)
