"""SST: zero-distortion init and re-SVD, orthonormal factors, the sampling law, the update rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import memory
from lowrank_jax.transforms import sst_adamw, sst_init, sst_merge, sst_probabilities
from lowrank_jax.transforms._sst import _resvd
from tests.helpers import assert_same_types, orbax_roundtrip

TARGET = jax.random.normal(jax.random.key(2), (3, 12, 8))


def dense_params(key):
    return {"w": jax.random.normal(key, (3, 12, 8)), "b": jnp.zeros(8)}


def loss(dense):
    return jnp.mean((dense["w"] - TARGET) ** 2) + jnp.mean((dense["b"] - 1.0) ** 2)


def train(tx, params, steps):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(sst_merge(p)), s, p)
        return optax.apply_updates(p, u), s

    seen = []
    for _ in range(steps):
        params, state = step(params, state)
        seen.append((params, state))
    return seen


def orthonormality_error(f):
    eye = np.eye(f.u.shape[-1])
    gram_u = np.asarray(jnp.swapaxes(f.u, -1, -2) @ f.u)
    gram_v = np.asarray(jnp.swapaxes(f.v, -1, -2) @ f.v)
    return max(np.abs(gram_u - eye).max(), np.abs(gram_v - eye).max())


def test_init_and_resvd_do_not_distort(key):
    dense = dense_params(key)
    params = sst_init(dense)
    np.testing.assert_allclose(sst_merge(params)["w"], dense["w"], atol=1e-5)
    assert orthonormality_error(params["w"]) < 1e-5
    f = params["w"]
    bent = f._replace(u=f.u + 0.1, s=f.s * 2)  # not orthonormal any more
    u, s, v = _resvd(*bent)
    np.testing.assert_allclose((u * s[..., None, :]) @ jnp.swapaxes(v, -1, -2),
                               sst_merge({"w": bent})["w"], atol=1e-5)


def test_training_keeps_orthonormal_factors_after_each_round_and_learns(key):
    params = sst_init(dense_params(key))
    seen = train(sst_adamw(1e-2, rank=2, iteration=2, round_iterations=2), params, 8)
    for t, (p, _) in enumerate(seen):
        if (t + 1) % 4 == 0:  # a round is 2 iterations of 2 steps: re-SVD at its end
            assert orthonormality_error(p["w"]) < 1e-5
        assert float(jnp.min(p["w"].s)) >= 0.0
    assert float(loss(sst_merge(seen[-1][0]))) < 0.95 * float(loss(sst_merge(params)))
    indices = [np.asarray(s.indices["w"]) for _, s in seen]
    np.testing.assert_array_equal(indices[0], indices[1])  # one draw per iteration
    assert all(len(set(row)) == 2 for row in indices[0])  # without replacement


def test_one_step_follows_the_rule(key):
    """Only σ and the sampled columns move; the first Adam step is lr·sign per coordinate."""
    params = sst_init(dense_params(key))
    (p, state), = train(sst_adamw(1e-3, rank=2, iteration=10), params, 1)
    f0, f1, idx = params["w"], p["w"], np.asarray(state.indices["w"])
    g = jax.grad(loss)(sst_merge(params))["w"]
    for m in range(3):
        others = np.setdiff1d(np.arange(8), idx[m])
        np.testing.assert_array_equal(f1.u[m][:, others], f0.u[m][:, others])
        np.testing.assert_allclose(np.linalg.norm(f1.u[m][:, idx[m]], axis=0), 1.0, rtol=1e-5)
        grad_s = np.einsum("ik,ij,jk->k", f0.u[m], g[m], f0.v[m])
        expected = np.maximum(f0.s[m] - 1e-3 * np.sign(grad_s), 0)
        np.testing.assert_allclose(f1.s[m][others], expected[others], rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(p["b"] - params["b"]))) == pytest.approx(1e-3, rel=1e-3)


def test_sampling_frequencies_match_the_law():
    s = jnp.array([4.0, 2.0, 1.0, 1.0, 0.0])
    p = np.asarray(sst_probabilities(s))
    np.testing.assert_allclose(p, 0.5 * (1 / 5 + np.asarray(s) / 8))
    draws = jax.random.choice(jax.random.key(0), 5, (10_000,), p=jnp.asarray(p))
    freq = np.bincount(np.asarray(draws), minlength=5) / 10_000
    np.testing.assert_allclose(freq, p, atol=0.015)


def test_memory_and_roundtrip(key, tmp_path):
    dense = dense_params(key)
    params = sst_init(dense)
    tx = sst_adamw(1e-2, rank=2)
    assert memory.state_bytes(tx, params, scalars=False) == memory.sst_bytes(dense, rank=2)
    assert memory.tree_bytes(params) == memory.sst_param_bytes(dense)
    (_, state), = train(tx, params, 1)
    assert_same_types(orbax_roundtrip(state, tmp_path), state)


def test_bad_inputs(key):
    dense = dense_params(key)
    with pytest.raises(ValueError, match="sst_init"):
        sst_adamw(1e-2, rank=2).init(dense)
    with pytest.raises(ValueError, match="'w'"):
        sst_adamw(1e-2, rank=9).init(sst_init(dense))
    with pytest.raises(ValueError, match="iteration"):
        sst_adamw(1e-2, rank=2, iteration=0)
    with pytest.raises(ValueError, match="parameters"):
        tx = sst_adamw(1e-2, rank=2)
        tx.update(dense, tx.init(sst_init(dense)))


def test_state_can_be_donated(key):
    params = sst_init(dense_params(key))
    tx = sst_adamw(1e-2, rank=2)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p), donate_argnums=(1,))
    _, state = step(params, tx.init(params), jax.grad(loss)(sst_merge(params)))
    assert int(state.column_count) == 1
