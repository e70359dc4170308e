"""LaMDA: frozen A, trained core S, and B frozen row by row (reference and exact modes)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import reparam as R

from . import family
from .conftest import normal, perturb


def test_delta_and_init(key):
    w = normal(0, (8, 6))
    _, adapters = R.lamda(4, 8.0).init(key, {"w": w})
    assert set(adapters.frozen["w"]) == {"A"} and set(adapters.trainable["w"]) == {"S", "B"}
    f, t = adapters.frozen["w"], adapters.trainable["w"]
    assert float(jnp.abs(f["A"]).max()) <= 1 / np.sqrt(8)  # Kaiming U(±1/√in)
    assert float(jnp.abs(t["S"]).max()) <= 1 / np.sqrt(4) and not np.any(t["B"])  # U(±1/√r), 0
    moved = perturb(adapters)
    t = moved.trainable["w"]
    want = np.asarray(w) + 2.0 * np.asarray(f["A"]) @ np.asarray(t["S"]) @ np.asarray(t["B"])
    np.testing.assert_allclose(R.apply({"w": w}, moved)["w"], want, rtol=1e-5, atol=1e-5)


def test_svd_init_is_a_noop_from_the_singular_vectors(key):
    w = normal(1, (8, 6))
    _, adapters = R.lamda(3, init="svd").init(key, {"w": w})
    u, _, vh = np.linalg.svd(np.asarray(w), full_matrices=False)
    np.testing.assert_allclose(np.abs(adapters.frozen["w"]["A"]), np.abs(u[:, :3]), atol=1e-5)
    np.testing.assert_allclose(np.abs(adapters.trainable["w"]["B"]), np.abs(vh[:3]), atol=1e-5)
    np.testing.assert_array_equal(R.apply({"w": w}, adapters)["w"], w)


@pytest.mark.parametrize("where", ["before", "after"])
def test_gradual_freeze_of_b(where, key):
    params = {"w": normal(2, (8, 6))}
    _, adapters = R.lamda(4).init(key, params)
    x, target = normal(3, (16, 8)), normal(4, (16, 6))
    freeze = R.lamda_freeze_b(max_steps=10, eta=0.1)  # t_f = step: one more row per step
    adam = optax.adam(1e-2)
    tx = optax.chain(freeze, adam) if where == "before" else optax.chain(adam, freeze)
    loss = lambda t: jnp.mean(
        (x @ R.apply(params, adapters.replace(trainable=t))["w"] - target) ** 2
    )

    @jax.jit
    def step(trainable, state):
        updates, state = tx.update(jax.grad(loss)(trainable), state, trainable)
        return optax.apply_updates(trainable, updates), state

    trainable, state, history = adapters.trainable, tx.init(adapters.trainable), []
    for _ in range(6):
        trainable, state = step(trainable, state)
        history.append(np.asarray(trainable["w"]["B"]))
    # Row 0 is frozen from step 1 on (after one update), row 1 from step 2, ...
    moved = [np.abs(history[t] - history[t - 1]).max(axis=1) for t in range(2, 6)]
    if where == "after":  # zeroed updates: exactly constant
        assert moved[0][0] == 0 and moved[1][1] == 0 and np.all(moved[3] == 0)
    else:  # the reference: zero gradients, but Adam's momentum still moves the rows
        assert moved[0][0] > 0 and moved[3][3] > 0
    assert np.any(history[0] != 0)  # B did train before it froze


def test_frozen_projection_never_changes_under_training(key):
    params = {"w": normal(5, (8, 6))}
    _, adapters = R.lamda(4).init(key, params)
    grads = jax.grad(lambda a: jnp.sum(R.apply(params, a)["w"] ** 2))(adapters)
    assert set(grads.trainable["w"]) == {"S", "B"}  # A lives in the frozen tree
    assert R.trainable_mask(adapters).frozen["w"]["A"] is False


def test_init_count_merge_io_jit(key, tmp_path):
    count = lambda b, i, o: b * (4 * 4 + 4 * o)  # r² + r·out
    _, base, adapters = family.noop_and_count(R.lamda(4), key, count)
    family.merge_unmerge(base, adapters)
    family.round_trips(base, adapters, tmp_path)
    family.jitted(base, adapters)


def test_nnx_fast_path(key):
    family.nnx_matches_apply(R.lamda(2), key)
    family.never_builds_delta_w(R.lamda(2), key)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: R.lamda(-1), "rank must be a positive int"),
        (lambda: R.lamda(4, init="pissa"), "init must be one of"),
        (lambda: R.lamda_freeze_b(0), "max_steps must be a positive int"),
        (lambda: R.lamda_freeze_b(10, eta=0.0), "eta must be > 0"),
        (lambda: R.lamda(9).init(jax.random.key(0), {"w": jnp.ones((8, 12))}), "rank=9 .*'w'"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
