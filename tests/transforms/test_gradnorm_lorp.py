"""GradNormLoRP: weight-norm identities, lr = 0 is exact, quirks mode, GaLore on ∇v, plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lr
from lowrank_jax import memory
from lowrank_jax.train.layerwise import split_state
from lowrank_jax.transforms import weight_norm
from tests.helpers import assert_same_types, grad_stream, orbax_roundtrip, run_steps


def params_of(key):
    k1, k2 = jax.random.split(key)
    return {"w": jax.random.normal(k1, (16, 8)), "stack": jax.random.normal(k2, (2, 8, 12)),
            "b": jnp.zeros(8)}


def test_scaling_v_leaves_the_weight_unchanged(key):
    v, g = jax.random.normal(key, (16, 8)), jnp.linspace(0.5, 2.0, 8)[None]
    np.testing.assert_allclose(weight_norm(3.7 * v, g), weight_norm(v, g), rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(weight_norm(v, g), axis=0), g[0], rtol=1e-6)


def test_exact_direction_gradient_is_orthogonal_to_v(key):
    """At full rank the low-rank moment is P ∇v with ∇v ⟂ v̂ per output unit."""
    params = {"w": jax.random.normal(key, (8, 8))}
    g = grad_stream(params, 1)[0]
    tx = lr.gradnorm_lorp_adamw(1e-2, rank=8, b1=0.0)
    _, state = jax.jit(tx.update)(g, tx.init(params), params)
    p = state.projectors["w"].in_basis
    grad_v = p @ state.lowrank_state.mu["w"]  # b1 = 0: the moment is the projected gradient
    v_hat = params["w"] / jnp.linalg.norm(params["w"], axis=0)
    np.testing.assert_allclose(jnp.sum(v_hat * grad_v, axis=0), 0.0, atol=1e-5)
    quirky = lr.gradnorm_lorp_adamw(1e-2, rank=8, b1=0.0, reference_quirks=True)
    _, q_state = jax.jit(quirky.update)(g, quirky.init(params), params)
    grad_q = q_state.projectors["w"].in_basis @ q_state.lowrank_state.mu["w"]
    np.testing.assert_allclose(grad_q, g["w"], atol=1e-5)  # the reference's ∇v = G·g/‖v‖ = G


def test_zero_learning_rate_leaves_the_weights_bit_identical(key):
    params = params_of(key)
    out, _ = run_steps(lr.gradnorm_lorp_adamw(0.0, rank=2), params, grad_stream(params, 2))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_learned_magnitude_persists_unless_reference_quirks(key):
    params = {"w": jax.random.normal(key, (8, 8))}
    grads = [{"w": -jnp.ones((8, 8))}] * 3  # ∇g = v̂ᵀG: a steady push on every magnitude
    _, exact = run_steps(lr.gradnorm_lorp_adamw(0.1, rank=2), params, grads)
    start = jnp.linalg.norm(params["w"], axis=0)
    assert np.all(np.abs(np.asarray(exact.norm_state["w"].g[0] - start)) > 0.25)  # 3 x ~0.1
    quirky_tx = lr.gradnorm_lorp_adamw(0.1, rank=2, reference_quirks=True)
    _, two = run_steps(quirky_tx, params, grads[:2])
    _, three = run_steps(quirky_tx, params, grads[2:], state=two)
    # the reference resets g to ‖v‖ first: after a step, g is one step away from the old ‖v‖
    norm_v = jnp.linalg.norm(two.norm_state["w"].v, axis=0)
    assert np.all(np.abs(np.asarray(three.norm_state["w"].g[0] - norm_v)) < 0.11)


def test_loss_decreases_and_state_plumbing(key, tmp_path):
    params = params_of(key)
    target = jax.tree.map(lambda x: jnp.ones_like(x), params)
    loss = lambda p: sum(jnp.mean((a - b) ** 2) for a, b in zip(jax.tree.leaves(p),
                                                                 jax.tree.leaves(target)))
    tx = lr.gradnorm_lorp_adamw(0.05, rank=2, update_proj_gap=5, weight_decay=0.01)
    assert memory.state_bytes(tx, params, scalars=False) == memory.gradnorm_lorp_bytes(
        params, rank=2
    )
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    p, state = params, tx.init(params)
    for _ in range(25):
        p, state = step(p, state)
    assert len(traces) == 1
    assert float(loss(p)) < 0.7 * float(loss(params))
    np.testing.assert_allclose(p["w"], weight_norm(state.norm_state["w"].v,
                                                   state.norm_state["w"].g), atol=1e-4)
    assert_same_types(orbax_roundtrip(state, tmp_path), state)
    layered = {"layers": {"w": jnp.zeros((2, 8, 12))}, "embed": {"embedding": jnp.zeros((9, 8))}}
    assert split_state(tx, layered, "gradnorm_lorp").n_layers == 2


def test_bad_inputs(key):
    params = params_of(key)
    tx = lr.gradnorm_lorp_adamw(1e-2, rank=2)
    with pytest.raises(ValueError, match="parameters"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="rank"):
        lr.gradnorm_lorp_adamw(1e-2, rank=0)
    with pytest.raises(ValueError, match="structure"):
        tx.update({"w": params["w"]}, tx.init(params), params)


def test_params_and_state_can_be_donated_together(key):
    params = params_of(key)
    tx = lr.gradnorm_lorp_adamw(1e-2, rank=2)
    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    grads = grad_stream(params, 1)[0]
    new, _ = jax.jit(step, donate_argnums=(0, 1))(params, state, grads)  # v must not alias W
    assert new["w"].shape == (16, 8)
