"""Fira: state, the two variants' formulas, the limiter, batch axes, composition, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import projection
from lowrank_jax.optimizers import fira_adamw
from lowrank_jax.transforms import fira, scale_by_adam_bias_correction, scale_by_adam_hf
from lowrank_jax.transforms._norm_scaling import limit_norm_growth
from tests.helpers import grad_stream, make_params, run_steps

UNCORRECTED = scale_by_adam_hf(correct_bias=False)


def test_state_is_galore_plus_one_norm_per_matrix(key):
    params = {**make_params(key), "stacked": {"kernel": jnp.zeros((3, 8, 12))}}
    state = fira(UNCORRECTED, rank=4).init(params)
    assert state.lowrank_state.mu["layers"]["up_proj"]["kernel"].shape == (4, 40)
    assert state.limiter_norms["layers"]["up_proj"]["kernel"].shape == (1,)
    assert state.limiter_norms["stacked"]["kernel"].shape == (3, 1)
    assert isinstance(state.limiter_norms["embed"]["embedding"], optax.MaskedNode)
    assert state.fullrank_state.mu["embed"]["embedding"].shape == (50, 16)
    assert fira(UNCORRECTED, rank=4, limiter=None).init(params).limiter_norms is None


@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize("shape", [(20, 8), (8, 20)])  # out side, in side
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_first_step_follows_the_formulas(key, variant, shape, scale_type):
    g = np.asarray(jax.random.normal(key, shape), np.float64)
    alpha, rank = 0.25, 3
    tx = fira(UNCORRECTED, rank=rank, scale=alpha, variant=variant, scale_type=scale_type)
    update, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, tx.init({"w": g}))
    proj = state.projectors["w"]
    r = np.asarray(projection.project(jnp.asarray(g, jnp.float32), proj), np.float64)
    n = 0.1 * r / (np.sqrt(0.001 * r * r) + 1e-6)
    axis = -2 if proj.in_basis is not None else -1
    axes = (-2, -1) if scale_type == "tensor" else (axis,)
    norm = lambda x: np.sqrt(np.sum(x * x, axis=axes, keepdims=True))
    phi = norm(n) / (norm(r) + 1e-8)
    back = lambda x: np.asarray(projection.project_back(jnp.asarray(x, jnp.float32), proj))
    if variant == "code":
        residual = phi * (g - alpha * back(r))
        expected = alpha * back(n) + residual
    else:
        residual = phi * (g - back(r))
        expected = alpha * (back(n) + residual)
    np.testing.assert_allclose(update["w"], expected, rtol=2e-4, atol=2e-5)
    # the first step is not limited: the stored norm is the residual's own norm
    np.testing.assert_allclose(state.limiter_norms["w"], [np.linalg.norm(residual)], rtol=1e-4)


def test_limiter_caps_the_residual_growth_at_gamma(key):
    base = jax.random.normal(key, (12, 20))
    grads = [{"w": base * 10.0**t} for t in range(4)]  # the residual grows 10x per step
    tx = fira(optax.identity(), rank=3, update_proj_gap=100, limiter=1.01)
    state = tx.init({"w": base})
    norms = []
    for g in grads:
        _, state = tx.update(g, state)
        norms.append(float(state.limiter_norms["w"][0]))
    np.testing.assert_allclose(np.array(norms[1:]) / np.array(norms[:-1]), 1.01, rtol=1e-5)
    # and a shrinking residual is not limited
    out, limited = limit_norm_growth(base, jnp.full((1,), 1e6), jnp.bool_(False), 1.01)
    np.testing.assert_allclose(out, base)
    np.testing.assert_allclose(limited, [jnp.linalg.norm(base)], rtol=1e-6)


def test_bias_correction_split_equals_hf_adam(key):
    params = {"w": jnp.zeros((6, 5))}
    grads = grad_stream(params, 4)
    split = optax.chain(UNCORRECTED, scale_by_adam_bias_correction())
    out_split, _ = run_steps(split, params, grads)
    out_hf, _ = run_steps(scale_by_adam_hf(), params, grads)
    np.testing.assert_allclose(out_split["w"], out_hf["w"], rtol=1e-6, atol=1e-7)


def test_stacked_leaves_equal_per_matrix_results(key):
    stacked = {"w": jax.random.normal(key, (2, 12, 20))}
    grads = grad_stream(stacked, 4)
    tx = fira_adamw(1e-2, rank=4, update_proj_gap=3, weight_decay=0.1)
    out_stacked, _ = run_steps(tx, stacked, grads)
    out, _ = run_steps(tx, {"w": stacked["w"][1]}, [{"w": g["w"][1]} for g in grads])
    np.testing.assert_allclose(out_stacked["w"][1], out["w"], rtol=1e-5, atol=1e-6)


def test_one_compile_and_inject_hyperparams(key):
    params = make_params(key)
    grads = grad_stream(params, 3)
    tx = optax.inject_hyperparams(fira_adamw, static_args=("rank", "variant"))(
        learning_rate=1e-2, rank=4, update_proj_gap=2, scale=0.25
    )
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(1)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    out = params
    for g in grads:
        out, state = step(out, state, g)
    assert len(traces) == 1
    expected, _ = run_steps(fira_adamw(1e-2, rank=4, update_proj_gap=2, scale=0.25), params, grads)
    np.testing.assert_allclose(
        out["layers"]["up_proj"]["kernel"], expected["layers"]["up_proj"]["kernel"], atol=1e-6
    )
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    again, _ = step(out, state, grads[0])
    q = lambda p: p["layers"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q(again), q(out))


def test_chain_with_clipping_and_skipping_nonfinite_steps(key):
    params = make_params(key)
    grads = grad_stream(params, 3)
    reference, _ = run_steps(fira_adamw(1e-2, rank=4), params, [grads[0], grads[2]])
    safe = optax.apply_if_finite(
        optax.chain(optax.clip_by_global_norm(1e9), fira_adamw(1e-2, rank=4)), 3
    )
    nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads[1])
    out, _ = run_steps(safe, params, [grads[0], nan, grads[2]])
    np.testing.assert_allclose(
        out["layers"]["down_proj"]["kernel"], reference["layers"]["down_proj"]["kernel"], atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"variant": "torch"}, "variant"),
        ({"scale_type": "row"}, "scale_type"),
        ({"proj_type": "full"}, "full"),
        ({"limiter": 0.5}, "limiter"),
        ({"rank": 0}, "rank must be positive"),
        ({"adaptive_refresh": 3}, "AdaptiveRefresh"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fira(UNCORRECTED, **{"rank": 2, **kwargs})


def test_bad_leaves_name_the_path(key):
    with pytest.raises(ValueError, match="'w'.*int32"):
        fira(UNCORRECTED, rank=2, targets="w").init({"w": jnp.ones((4, 4), jnp.int32)})
    with pytest.raises(ValueError, match="final_norm/scale"):
        fira(UNCORRECTED, rank=2, targets="norm").init(make_params(key))
