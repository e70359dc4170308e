"""Q-GaLore: INT4 projectors (parity with q-galore-torch's format), INT8 weights with stochastic
rounding (unbiased, moves where round-to-nearest cannot), lazy refresh, plumbing."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lr
from lowrank_jax import memory, projection
from lowrank_jax.train.layerwise import split_state
from lowrank_jax.transforms import (
    dequantize_groups,
    dequantize_weights,
    q_galore,
    quantize_groups,
    quantize_weights,
    stochastic_weight_update,
)
from tests.helpers import assert_same_types, grad_stream, orbax_roundtrip

HAVE_QGALORE = all(importlib.util.find_spec(m) for m in ("torch", "q_galore_torch", "bitsandbytes"))


def orthonormal(key, shape):
    return jnp.linalg.qr(jax.random.normal(key, shape))[0]


@pytest.mark.skipif(not HAVE_QGALORE, reason="needs the `compare` extra (torch, q-galore-torch)")
def test_int4_format_parity_with_q_galore_torch(key):
    import torch
    from q_galore_torch.q_galore_projector import GaLoreProjector

    basis = orthonormal(key, (128, 8)).T  # Vh[:r]: (r, n)
    codes, scales, zeros, _ = GaLoreProjector._quantize(
        None, torch.tensor(np.asarray(basis)), q_group_size=256, n_bit=4
    )
    ours = quantize_groups(basis, 4, 256)
    np.testing.assert_array_equal(ours.codes.reshape(-1, 256), codes.numpy())
    np.testing.assert_allclose(ours.scales, scales.numpy()[:, 0], rtol=1e-7)
    np.testing.assert_array_equal(ours.zeros, zeros.numpy()[:, 0])


def test_dequantization_error_is_at_most_half_a_step(key):
    basis = orthonormal(key, (256, 8))
    q = quantize_groups(basis, 4, 256)
    back = dequantize_groups(q, basis.shape, jnp.float32)
    step = np.repeat(np.asarray(q.scales), 256).reshape(basis.shape)
    assert np.all(np.abs(np.asarray(back - basis)) <= step / 2 + 1e-6)
    again = quantize_groups(back, 4, 256)  # storing the dequantized basis again is exact
    np.testing.assert_array_equal(again.codes, q.codes)
    packed = quantize_groups(basis, 4, 256, pack=True)
    assert packed.codes.shape == (8, 128)
    np.testing.assert_array_equal(dequantize_groups(packed, basis.shape, jnp.float32, pack=True),
                                  back)


def test_stochastic_rounding_is_unbiased(key):
    w = jax.random.normal(key, (1, 256))
    draws = jax.vmap(
        lambda k: dequantize_groups(quantize_groups(w, 8, 256, key=k), w.shape, jnp.float32)
    )(jax.random.split(jax.random.key(1), 10_000))
    step = float(quantize_groups(w, 8, 256).scales[0])
    inner = (w > w.min() + step) & (w < w.max() - step)  # away from the clipped extremes
    bias = np.abs(np.asarray(jnp.mean(draws, 0) - w))[np.asarray(inner)]
    assert bias.max() < 0.05 * step


@pytest.mark.parametrize("stochastic", [False, True])
def test_small_updates_move_only_with_stochastic_rounding(key, stochastic):
    params = {"w": jax.random.normal(key, (16, 16))}
    qparams = quantize_weights(params)
    w0 = dequantize_weights(qparams, params)["w"]
    step = float(qparams["w"].scales[0])
    tx = stochastic_weight_update(like=params, stochastic=stochastic)
    state = tx.init(qparams)
    update = jax.jit(tx.update)
    for _ in range(20):
        u, state = update({"w": jnp.full((16, 16), 0.1 * step)}, state, qparams)
        qparams = optax.apply_updates(qparams, u)
    assert qparams["w"].codes.dtype == jnp.uint8
    moved = float(jnp.mean(dequantize_weights(qparams, params)["w"] - w0))
    if stochastic:
        assert moved == pytest.approx(20 * 0.1 * step, rel=0.15)
    else:  # round to nearest swallows every 0.1-step update (up to re-grouping at the edges)
        assert abs(moved) < 0.05 * 20 * 0.1 * step


def test_projection_uses_the_dequantized_basis_and_lazy_refresh(key):
    params = {"w": jax.random.normal(key, (64, 32))}
    tx = q_galore(optax.scale_by_adam(), rank=4, update_proj_gap=1, proj_group_size=64,
                  adaptive_refresh=lr.AdaptiveRefresh(queue_size=1, threshold=-2.0))
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = grad_stream(params, 4)
    for g in grads:
        _, state = update(g, state)
    q = state.projectors["w"].out_basis  # (in=64, out=32): out compressed; U[:, :r] layout
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (2, 64)
    basis = dequantize_groups(q, (32, 4), jnp.float32)
    # the first refresh pushes nothing; threshold -2 doubles the gap at each refresh after
    gaps = state.refresh_state["w"].gap
    assert int(gaps) == 4 and lr.transforms.svd_count(state) == 3
    exact = projection.compute_projector(grads[2]["w"], "out", 4, "svd").out_basis
    assert np.abs(np.asarray(basis - exact)).max() < float(jnp.max(q.scales))
    # the low-rank moment is the projection with the dequantized basis: M = (1-β1)·G P̂ + ...
    fresh = tx.init(params)
    _, one = update(grads[0], fresh)
    p0 = dequantize_groups(one.projectors["w"].out_basis, (32, 4), jnp.float32)
    np.testing.assert_allclose(one.lowrank_state.mu["w"], 0.1 * grads[0]["w"] @ p0, atol=1e-5)


def test_memory_roundtrip_jit_and_layerwise(key, tmp_path):
    params = {"layers": {"w": jax.random.normal(key, (2, 32, 64))},
              "embed": {"embedding": jax.random.normal(key, (50, 16))}}
    tx = lr.q_galore_adamw_8bit(1e-3, rank=8, proj_group_size=64, min_8bit_size=64)
    expected = memory.qgalore_bytes(params, rank=8, proj_group_size=64, min_8bit_size=64)
    assert memory.state_bytes(tx, params, scalars=False) == expected
    packed = lr.q_galore_adamw_8bit(1e-3, rank=8, proj_group_size=64, pack_projector=True,
                                    min_8bit_size=64)
    assert memory.state_bytes(packed, params, scalars=False) == memory.qgalore_bytes(
        params, rank=8, proj_group_size=64, pack_projector=True, min_8bit_size=64
    ) == expected - 2 * 32 * 8 // 2
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for g in grad_stream(params, 3):
        params, state = step(params, state, g)
    assert len(traces) == 1
    assert_same_types(orbax_roundtrip(state, tmp_path), state)
    assert split_state(tx, params, "q_galore").n_layers == 2


def test_int8_weights_train_like_float_weights(key):
    params = {"w": jax.random.normal(key, (32, 32)), "b": jnp.zeros(32)}
    qparams = quantize_weights(params)
    assert memory.tree_bytes(qparams) == memory.int8_weight_bytes(params)
    target = jax.random.normal(jax.random.key(5), (32, 32))
    loss = lambda p: jnp.mean((p["w"] - target) ** 2) + jnp.mean(p["b"] ** 2)
    options = dict(rank=8, update_proj_gap=5, proj_group_size=128, weight_decay=0.01)

    def train(tx, start, to_float):
        @jax.jit
        def step(p, s):
            u, s = tx.update(jax.grad(loss)(to_float(p)), s, p)
            return optax.apply_updates(p, u), s

        p, s = start, tx.init(params)
        for _ in range(30):
            p, s = step(p, s)
        return p, float(loss(to_float(p)))

    quantized, int8_loss = train(
        lr.q_galore_adamw_8bit(0.1, int8_weights=params, **options), qparams,
        lambda q: dequantize_weights(q, params),
    )
    _, float_loss = train(lr.q_galore_adamw_8bit(0.1, **options), params, lambda p: p)
    assert quantized["w"].codes.dtype == jnp.uint8 and quantized["w"].scales.dtype == jnp.bfloat16
    assert float_loss < 0.9 * float(loss(params))
    assert int8_loss == pytest.approx(float_loss, rel=0.05)


def test_bad_inputs(key):
    with pytest.raises(ValueError, match="group_size"):
        quantize_weights({"w": jnp.ones((10, 10))})
    with pytest.raises(ValueError, match="proj_bits"):
        q_galore(optax.scale_by_adam(), rank=2, proj_bits=0)
    with pytest.raises(ValueError, match="pack_projector"):
        q_galore(optax.scale_by_adam(), rank=2, proj_bits=8, pack_projector=True)
    with pytest.raises(ValueError, match="projector"):
        q_galore(optax.scale_by_adam(), rank=3).init({"w": jnp.ones((10, 20))})
    with pytest.raises(ValueError, match="quantized"):
        stochastic_weight_update(like={"w": jnp.ones(2)}).update({"w": jnp.ones(2)}, None)
