"""ReLoRA: merge-and-restart, optimizer-state pruning, the jagged schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import reparam as R

from .conftest import normal, perturb

W = {"w": normal(0, (16, 12))}


def setup(key, every=3):
    relora = R.ReLoRA(R.lora(2, 4), every=every, prune_ratio=0.9)
    params, adapters = relora.reparam.init(key, W)
    tx = optax.adam(1e-2)
    return relora, params, adapters, tx


def test_restart_merges_reinitialises_and_prunes(key):
    relora, params, adapters, tx = setup(key)
    adapters = perturb(adapters)
    state = tx.init(adapters.trainable)
    grads = jax.tree.map(lambda x: normal(1, x.shape), adapters.trainable)
    _, state = tx.update(grads, state)
    new_params, fresh, new_state = relora.restart(key, params, adapters, state, tx)
    # The model does not change: the adapter is merged, and the new one starts at B = 0.
    np.testing.assert_allclose(
        R.apply(new_params, fresh)["w"], R.apply(params, adapters)["w"], atol=1e-6
    )
    assert not np.any(fresh.trainable["w"]["B"])
    assert not np.allclose(fresh.trainable["w"]["A"], adapters.trainable["w"]["A"])
    for before, after in ((state[0].mu, new_state[0].mu), (state[0].nu, new_state[0].nu)):
        for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
            old, new = np.asarray(old), np.asarray(new)
            kept = new != 0
            assert 0 < kept.sum() <= np.ceil(0.1 * new.size)  # 90% pruned
            # Magnitude pruning keeps the largest entries, unchanged.
            np.testing.assert_array_equal(new[kept], old[kept])
            assert np.abs(old[kept]).min() >= np.abs(old[~kept]).max()
    assert int(new_state[0].count) == int(state[0].count)  # counters are not parameters


def test_training_loop_under_jit_reaches_beyond_rank_r(key):
    relora, params, adapters, tx = setup(key, every=4)
    x = normal(2, (32, 16))
    target = x @ normal(9, (16, 12))  # a full-rank update is needed

    @jax.jit
    def step(i, params, trainable, state):
        loss_fn = lambda t: jnp.mean(
            (x @ R.apply(params, adapters.replace(trainable=t))["w"] - target) ** 2
        )
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, state = tx.update(grads, state)
        trainable = optax.apply_updates(trainable, updates)
        params, new, state = relora.maybe_restart(
            i + 1, key, params, adapters.replace(trainable=trainable), state, tx
        )
        return loss, params, new.trainable, state

    trainable, state = adapters.trainable, tx.init(adapters.trainable)
    for i in range(12):
        loss, params, trainable, state = step(i, params, trainable, state)
    merged = params["w"] - W["w"]
    # Three merged cycles of rank 2 each: the accumulated update has rank > 2.
    assert np.linalg.matrix_rank(np.asarray(merged), tol=1e-4) > 2
    assert step._cache_size() == 1  # one compile for the whole run


def test_prune_modes(key):
    tx = optax.adam(1e-3)
    params = {"a": jnp.arange(1.0, 101.0)}
    state = tx.init(params)
    state = (state[0]._replace(mu={"a": jnp.arange(1.0, 101.0)}), state[1])
    pruned = R.prune_optimizer_state(tx, state, ratio=0.95)
    np.testing.assert_array_equal(np.nonzero(pruned[0].mu["a"])[0], np.arange(95, 100))
    zero = R.prune_optimizer_state(tx, state, how="zero")
    assert not np.any(zero[0].mu["a"])
    rand = R.prune_optimizer_state(tx, state, ratio=0.5, how="random", key=key)
    assert 20 < int(np.count_nonzero(rand[0].mu["a"])) < 80
    with pytest.raises(ValueError, match="needs a key"):
        R.prune_optimizer_state(tx, state, how="random")


def test_jagged_cosine_schedule():
    sched = R.jagged_cosine_schedule(
        1.0, total_steps=100, warmup_steps=10, restart_every=25, restart_warmup_steps=5
    )
    values = np.array([float(sched(t)) for t in range(100)])
    assert values[0] == 0 and abs(values[10] - 1.0) < 1e-6
    assert values[25] == 0 and values[50] == 0 and values[75] == 0  # re-warm after each restart
    assert values[24] > values[49] > values[74] > 0  # one cosine decay overall
    np.testing.assert_allclose(values[30], float(sched(30)))
    assert values[99] >= 0.1 - 1e-6
