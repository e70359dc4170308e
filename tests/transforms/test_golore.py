"""GoLore (SVD then random bases) and GaLore 2 (randomized-SVD refreshes): rules and plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lr
from lowrank_jax import memory, projection
from lowrank_jax.train.layerwise import split_state
from tests.helpers import assert_same_types, grad_stream, make_params, orbax_roundtrip
from tests.helpers import run_steps as run


def bases(tx, params, grads):
    state, out = tx.init(params), []
    update = jax.jit(tx.update)
    for g in grads:
        _, state = update(g, state)
        out.append(np.asarray(state.projectors["w"].in_basis))
    return out, state


def test_switch_to_random_at_the_first_refresh_after_tau(key):
    params = {"w": jax.random.normal(key, (12, 20))}
    grads = grad_stream(params, 8)
    tx = lr.golore(optax.scale_by_adam(), rank=3, update_proj_gap=3, random_after=4)
    seen, _ = bases(tx, params, grads)
    top = lambda g: np.linalg.svd(np.asarray(g["w"]))[0][:, :3]
    # refreshes at 0, 3 (t < 4: SVD) and 6 (t >= 4: random)
    for t in (0, 3):
        np.testing.assert_allclose(np.abs(seen[t].T @ top(grads[t])), np.eye(3), atol=1e-5)
    np.testing.assert_array_equal(seen[5], seen[3])
    assert not np.allclose(np.abs(seen[6].T @ top(grads[6])), np.eye(3), atol=0.1)
    # a random basis does not depend on the gradient, only on the key and the step
    other = [g if t != 6 else jax.tree.map(lambda x: 5 * x + 1, g) for t, g in enumerate(grads)]
    seen_other, _ = bases(tx, params, other)
    np.testing.assert_allclose(seen_other[6], seen[6], atol=1e-6)
    np.testing.assert_allclose(seen[6].T @ seen[6], np.eye(3), atol=1e-5)  # orthonormal


def test_random_bases_are_seeded_and_differ_per_refresh(key):
    params = {"w": jax.random.normal(key, (12, 20))}
    grads = grad_stream(params, 3)
    make = lambda seed: lr.golore(
        optax.scale_by_adam(), rank=3, update_proj_gap=1, random_after=0, seed=seed
    )
    a, _ = bases(make(0), params, grads)
    b, _ = bases(make(0), params, grads)
    c, _ = bases(make(1), params, grads)
    np.testing.assert_array_equal(a[2], b[2])
    assert not np.allclose(a[2], c[2]) and not np.allclose(a[1], a[2])


def test_first_moment_is_rotated_and_second_kept(key):
    """At full rank the rotation is exact: P_new M_new = P_old M_old; V is left as it was."""
    k1, k2 = jax.random.split(key)
    g1, g2 = jax.random.normal(k1, (6, 20)), jax.random.normal(k2, (6, 20))
    adam = optax.scale_by_adam(b1=1.0 - 1e-7, b2=0.5)
    tx = lr.golore(adam, rank=6, update_proj_gap=1, random_after=1)
    update = jax.jit(tx.update)
    _, state = update({"w": g1}, tx.init({"w": g1}))
    _, after = update({"w": g2}, state)
    full = lambda s: s.projectors["w"].in_basis @ s.lowrank_state.mu["w"]
    np.testing.assert_allclose(full(after), full(state), atol=1e-5)
    r_new = after.projectors["w"].in_basis.T @ g2
    np.testing.assert_allclose(
        after.lowrank_state.nu["w"], 0.5 * state.lowrank_state.nu["w"] + 0.5 * r_new**2, rtol=1e-5
    )
    # rotate_first_moment=False keeps the old coordinates (GoLore's code as run)
    keep = lr.golore(adam, rank=6, update_proj_gap=1, random_after=1, rotate_first_moment=False)
    _, kept = jax.jit(keep.update)({"w": g2}, state)
    np.testing.assert_allclose(kept.lowrank_state.mu["w"], state.lowrank_state.mu["w"], atol=1e-5)


def test_before_tau_golore_is_galore(key):
    params = {"w": jax.random.normal(key, (12, 20)), "b": jnp.zeros(20)}
    grads = grad_stream(params, 5)
    a, _ = run(lr.golore_adamw(1e-2, rank=4, update_proj_gap=2, random_after=100,
                               rotate_first_moment=False), params, grads)
    b, _ = run(lr.galore_adamw(1e-2, rank=4, update_proj_gap=2), params, grads)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_one_compile_roundtrip_and_memory(key, tmp_path):
    params = make_params(key)
    tx = lr.golore_adamw(1e-2, rank=4, update_proj_gap=2, total_steps=4, random_ratio=0.5)
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for g in grad_stream(params, 5):  # crosses the switch at step 2
        params, state = step(params, state, g)
    assert len(traces) == 1
    restored = orbax_roundtrip(state, tmp_path)
    assert_same_types(restored, state)
    assert memory.state_bytes(tx, params, scalars=False) == memory.galore_bytes(params, rank=4)


def test_works_layerwise():
    params = {"layers": {"w": jnp.zeros((3, 8, 12))}, "embed": {"embedding": jnp.zeros((10, 8))}}
    split = split_state(lr.golore_adamw(1e-2, rank=2, random_after=5), params, "golore")
    assert split.n_layers == 3


def test_galore2_refresh_spans_the_svd_subspace(key):
    k1, k2, k3 = jax.random.split(key, 3)
    g = jax.random.normal(k1, (60, 4)) @ jax.random.normal(k2, (4, 48))
    g = g + 1e-4 * jax.random.normal(k3, g.shape)
    tx = lr.galore2_adamw(1e-2, rank=4)
    _, state = jax.jit(tx.update)({"w": g}, tx.init({"w": g}), {"w": g})
    p = state[0].projectors["w"].out_basis  # (in=60, out=48): the out axis is compressed
    exact = projection.compute_projector(g, "out", 4, "svd").out_basis
    cosines = np.linalg.svd(np.asarray(p.T @ exact), compute_uv=False)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-6)  # principal angles ~ 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="random_after"):
        lr.golore(optax.scale_by_adam(), rank=2, random_after=-1)
    with pytest.raises(ValueError, match="total_steps"):
        lr.golore_adamw(1e-2)
    with pytest.raises(ValueError, match="randomized"):
        lr.galore2_adamw(1e-2, basis="svd")
    with pytest.raises(ValueError, match="rank"):
        lr.golore(optax.scale_by_adam(), rank=0, random_after=1)
