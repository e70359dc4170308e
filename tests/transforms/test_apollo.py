"""APOLLO: regenerated projections, the gain formulas, Mini, the limiter, composition, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax.optimizers import apollo_adamw, apollo_mini
from lowrank_jax.transforms import apollo, gaussian_projection, scale_by_adam_hf
from tests.helpers import grad_stream, make_params, run_steps

UNCORRECTED = scale_by_adam_hf(correct_bias=False)


def recovered_projection(tx, rank, steps):
    """``Pᵀ`` seen at each step: ``G = [I | 0]`` makes the first moment's first columns ``Pᵀ``."""
    g = {"w": jnp.eye(4, 20)}  # (in=4, out=20): the in axis is compressed
    state = tx.init(g)
    update = jax.jit(tx.update)
    seen = []
    for _ in range(steps):
        before = state.lowrank_state.mu["w"]
        _, state = update(g, state)
        seen.append(np.asarray((state.lowrank_state.mu["w"] - 0.9 * before) / 0.1)[:, :4])
    return seen


def test_projection_is_regenerated_from_the_key_each_period():
    tx = apollo(UNCORRECTED, rank=3, update_proj_gap=2, seed=7)
    assert tx.init({"w": jnp.eye(4, 20)}).projectors is None  # nothing stored
    p = recovered_projection(tx, 3, 5)
    np.testing.assert_allclose(p[1], p[0], rtol=1e-5)  # same period
    assert not np.allclose(p[2], p[1])  # new period at step 2
    np.testing.assert_allclose(p[3], p[2], rtol=1e-5)
    again = recovered_projection(apollo(UNCORRECTED, rank=3, update_proj_gap=2, seed=7), 3, 1)
    np.testing.assert_array_equal(again[0], p[0])
    other = recovered_projection(apollo(UNCORRECTED, rank=3, update_proj_gap=2, seed=8), 3, 1)
    assert not np.allclose(other[0], p[0])


def test_gaussian_projection_has_variance_one_over_rank():
    p = gaussian_projection("w", (2048, 16), jax.random.key(0))
    assert abs(float(jnp.mean(p))) < 0.01
    np.testing.assert_allclose(float(jnp.std(p)), 1 / math.sqrt(16), rtol=0.03)


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("shape", [(20, 8), (8, 20)])
def test_first_update_is_sqrt_scale_times_gain_times_gradient(key, scale_type, shape):
    k1, k2 = jax.random.split(key)
    g = jax.random.normal(k1, shape)
    compressed = min(shape)
    basis = jax.random.normal(k2, (compressed, 3)) / math.sqrt(3)
    tx = apollo(UNCORRECTED, rank=3, scale=4.0, scale_type=scale_type, proj=lambda *_: basis)
    update, state = tx.update({"w": g}, tx.init({"w": g}))
    g64, b64 = np.asarray(g, np.float64), np.asarray(basis, np.float64)
    r = b64.T @ g64 if shape[0] < shape[1] else g64 @ b64
    n = 0.1 * r / (np.sqrt(0.001 * r * r) + 1e-6)
    axis = -2 if shape[0] < shape[1] else -1
    axes = (-2, -1) if scale_type == "tensor" else (axis,)
    norm = lambda x: np.sqrt(np.sum(x * x, axis=axes, keepdims=True))
    expected = 2.0 * (norm(n) / (norm(r) + 1e-8)) * g64
    np.testing.assert_allclose(update["w"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.limiter_norms["w"], [np.linalg.norm(expected) / 2], rtol=1e-5)


def test_limiter_caps_update_growth(key):
    base = jax.random.normal(key, (12, 20))
    tx = apollo(optax.identity(), rank=3)  # gain 1: the update is the raw gradient
    state = tx.init({"w": base})
    norms = []
    for t in range(4):
        update, state = tx.update({"w": base * 10.0**t}, state)
        norms.append(float(jnp.linalg.norm(update["w"])))
    np.testing.assert_allclose(np.array(norms[1:]) / np.array(norms[:-1]), 1.01, rtol=1e-4)


def test_mini_keeps_sgd_like_state_and_scales_the_whole_gradient(key):
    params = {"w": jax.random.normal(key, (64, 16)), "b": jnp.zeros(16)}
    tx = apollo_mini(1e-2)
    state = tx.init(params)[0]
    assert state.lowrank_state.mu["w"].shape == (64, 1)  # (in=64, out=16): rank 1 on out
    assert state.projectors is None
    g = grad_stream(params, 1)[0]
    updates, _ = tx.update(g, tx.init(params), params)
    ratio = np.asarray(updates["w"] / g["w"])
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)  # one gain for the tensor


def test_stacked_leaves_equal_per_matrix_results_with_svd(key):
    stacked = {"w": jax.random.normal(key, (2, 12, 20))}
    grads = grad_stream(stacked, 4)
    tx = apollo_adamw(1e-2, rank=4, update_proj_gap=3, proj="svd", weight_decay=0.1)
    out_stacked, _ = run_steps(tx, stacked, grads)
    out, _ = run_steps(tx, {"w": stacked["w"][1]}, [{"w": g["w"][1]} for g in grads])
    np.testing.assert_allclose(out_stacked["w"][1], out["w"], rtol=1e-5, atol=1e-6)


def test_one_compile_and_inject_hyperparams(key):
    params = make_params(key)
    grads = grad_stream(params, 3)
    tx = optax.inject_hyperparams(apollo_adamw, static_args=("rank", "proj", "scale_type"))(
        learning_rate=1e-2, rank=4, update_proj_gap=2, scale=2.0
    )
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(1)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state, out = tx.init(params), params
    for g in grads:
        out, state = step(out, state, g)
    assert len(traces) == 1
    expected, _ = run_steps(apollo_adamw(1e-2, rank=4, update_proj_gap=2, scale=2.0), params, grads)
    up = lambda p: p["layers"]["up_proj"]["kernel"]
    np.testing.assert_allclose(up(out), up(expected), atol=1e-6)


def test_converges_on_least_squares(key):
    k1, k2 = jax.random.split(key)
    x, w_true = jax.random.normal(k1, (64, 16)), jax.random.normal(k2, (16, 8))
    loss = lambda p: jnp.mean((x @ p["w"] - x @ w_true) ** 2)
    tx = apollo_adamw(0.05, rank=4, update_proj_gap=20)
    params, state = {"w": jnp.zeros((16, 8))}, None
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    start = loss(params)
    for _ in range(200):
        params, state = step(params, state)
    assert loss(params) < 0.05 * start


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"proj": "qr"}, "proj must be one of"),
        ({"scale_type": "row"}, "scale_type"),
        ({"proj_type": "full"}, "full"),
        ({"limiter": 0.9}, "limiter"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apollo(UNCORRECTED, rank=2, **kwargs)


def test_a_projection_of_the_wrong_shape_names_the_leaf(key):
    params = make_params(key)
    tx = apollo(UNCORRECTED, rank=2, proj=lambda path, shape, key: jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="layers/.*expected"):
        tx.update(params, tx.init(params))
