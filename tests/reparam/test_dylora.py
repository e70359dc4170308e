"""DyLoRA: nested truncation at a sampled rank; evaluate, merge and export at any rank."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import reparam as R

from . import family
from .conftest import normal, perturb

W = {"w": normal(0, (8, 6))}


def test_every_rank_is_the_alpha_over_b_truncation(key):
    _, adapters = R.dylora(4, 8.0).init(key, W)
    adapters = perturb(adapters)
    a, b = (np.asarray(adapters.trainable["w"][k], np.float64) for k in ("A", "B"))
    for rank in range(1, 5):
        got = R.apply(W, R.dylora_set_rank(adapters, rank))["w"]
        want = np.asarray(W["w"]) + 8.0 / rank * a[:, :rank] @ b[:rank]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Above r_max the rank is clipped; the default (init) rank is r_max.
    full = R.apply(W, R.dylora_set_rank(adapters, 9))["w"]
    np.testing.assert_allclose(full, R.apply(W, adapters)["w"], atol=1e-6)


@pytest.mark.parametrize("frozen_lower", [True, False])
def test_frozen_mode_trains_only_the_bth_component(frozen_lower, key):
    _, adapters = R.dylora(4, frozen_lower=frozen_lower).init(key, W)
    adapters = R.dylora_set_rank(perturb(adapters), 3)
    x = normal(1, (5, 8))

    def loss(t):
        return jnp.sum(jnp.tanh(x @ R.apply(W, adapters.replace(trainable=t))["w"]) ** 2)

    g = jax.grad(loss)(adapters.trainable)["w"]
    col_a = np.abs(np.asarray(g["A"])).sum(0)
    row_b = np.abs(np.asarray(g["B"])).sum(1)
    assert col_a[3] == 0 and row_b[3] == 0  # beyond b: no gradient
    assert col_a[2] > 0 and row_b[2] > 0
    if frozen_lower:
        assert np.all(col_a[:2] == 0) and np.all(row_b[:2] == 0)
    else:
        assert np.all(col_a[:2] > 0) and np.all(row_b[:2] > 0)


def test_training_with_a_sampled_rank_compiles_once(key):
    params = {"w": normal(2, (2, 8, 6))}
    _, adapters = R.dylora(4, 4.0, min_rank=2).init(key, params)
    x = normal(3, (16, 8))
    target = x @ normal(4, (8, 6))
    tx = optax.adam(1e-2)

    @jax.jit
    def step(k, trainable, state):
        a = R.dylora_sample_rank(k, adapters.replace(trainable=trainable))
        loss = lambda t: jnp.mean((x @ R.apply(params, a.replace(trainable=t))["w"] - target) ** 2)
        updates, state = tx.update(jax.grad(loss)(trainable), state)
        return optax.apply_updates(trainable, updates), state, a.frozen["w"]["b"]

    trainable, state, seen = adapters.trainable, tx.init(adapters.trainable), set()
    for i in range(12):
        trainable, state, b = step(jax.random.key(i), trainable, state)
        seen.add(int(b))
    assert step._cache_size() == 1  # a new rank never retraces
    assert seen <= {2, 3, 4} and len(seen) > 1
    trained = adapters.replace(trainable=trainable)
    errors = [
        float(jnp.mean((x @ R.apply(params, R.dylora_set_rank(trained, r))["w"][0] - target) ** 2))
        for r in (2, 3, 4)
    ]
    assert all(np.isfinite(errors))


def test_truncate_exports_a_plain_lora(key, tmp_path):
    params = {"q_proj": {"kernel": W["w"]}}
    _, adapters = R.dylora(4, 8.0).init(key, params)
    adapters = perturb(adapters)
    lora = R.dylora_truncate(adapters, 2)
    assert lora.sites[0].method == R.LoRA(rank=2, alpha=8.0)
    at_two = R.apply(params, R.dylora_set_rank(adapters, 2))
    np.testing.assert_allclose(
        R.apply(params, lora)["q_proj"]["kernel"], at_two["q_proj"]["kernel"], atol=1e-6
    )
    R.to_peft(str(tmp_path), lora)  # a PEFT LoRA file of rank 2 (r=2, lora_alpha=8)
    back = R.from_peft(str(tmp_path), params)
    np.testing.assert_allclose(
        R.apply(params, back)["q_proj"]["kernel"], at_two["q_proj"]["kernel"], atol=1e-6
    )


def test_init_count_merge_io_jit(key, tmp_path):
    count = lambda b, i, o: b * 4 * (i + o)
    _, base, adapters = family.noop_and_count(R.dylora(4), key, count)
    adapters = R.dylora_set_rank(adapters, 3)  # merge at a chosen rank
    family.merge_unmerge(base, adapters)
    family.round_trips(base, adapters, tmp_path)
    family.jitted(base, adapters)


def test_nnx_fast_path(key):
    family.nnx_matches_apply(R.dylora(2), key)
    family.never_builds_delta_w(R.dylora(2), key)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: R.dylora(0), "rank must be a positive int"),
        (lambda: R.dylora(4, min_rank=5), "min_rank=5 exceeds rank=4"),
        (lambda: R.dylora(4, min_rank=0), "min_rank must be a positive int"),
        (lambda: R.dylora(9).init(jax.random.key(0), {"w": jnp.ones((8, 12))}), "rank=9 .*'w'"),
        (lambda: R.dylora_truncate(R.dylora(2).init(jax.random.key(0), W)[1], 0), "rank must be"),
        (lambda: R.dylora_set_rank(R.lora(2).init(jax.random.key(0), W)[1], 1), "no DyLoRA"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
