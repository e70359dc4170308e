"""IncreLoRA: slots, the pinned reserve, importance scores and the growth schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import reparam as R
from lowrank_jax.reparam.increlora import RESERVE_E

from . import family
from .conftest import normal, perturb


def test_slots_active_reserve_and_off(key):
    w = normal(0, (8, 6))
    _, adapters = R.increlora(4, init_rank=1, alpha=16.0, reserve=2).init(key, {"w": w})
    adapters = perturb(adapters)
    t = {k: np.asarray(v, np.float64) for k, v in adapters.trainable["w"].items()}
    e_eff = np.array([t["E"][0], RESERVE_E, RESERVE_E, 0.0])  # active, reserve x2, off
    want = np.asarray(w) + 16.0 / (1 + 1e-5) * (t["A"] * e_eff) @ t["B"]
    np.testing.assert_allclose(R.apply({"w": w}, adapters)["w"], want, rtol=1e-5, atol=1e-6)
    # Reserve components learn in advance (A, B get gradients), their E does not.
    x = normal(1, (5, 8))
    loss = lambda tr: jnp.sum(jnp.tanh(x @ R.apply({"w": w}, adapters.replace(trainable=tr))["w"]))
    g = jax.grad(loss)(adapters.trainable)["w"]
    assert np.all(np.abs(np.asarray(g["A"])).sum(0)[:3] > 0) and not np.any(g["A"][:, 3])
    assert g["E"][0] != 0 and not np.any(g["E"][1:])


def test_growth_changes_the_scale_as_the_reference(key):
    params = {"a": normal(2, (8, 6)), "b": normal(3, (8, 6))}
    _, adapters = R.increlora(4, init_rank=1, alpha=8.0).init(key, params)
    adapters = perturb(adapters)
    schedule = R.IncreLoRASchedule(target_rank=2, init_warmup=0, incre_interval=1, top_h=1)
    state = schedule.init(adapters)
    scores = {"a": jnp.asarray(1.0), "b": jnp.asarray(0.5)}  # "a" is the more important
    grown, state = schedule.update(1, adapters, scores, state)
    assert R.increlora_ranks(grown) == {"a": 2, "b": 1}
    t = {k: np.asarray(v, np.float64) for k, v in grown.trainable["a"].items()}
    assert t["E"][1] == pytest.approx(RESERVE_E)  # the activated reserve starts where it was
    e_eff = np.array([t["E"][0], RESERVE_E, RESERVE_E, 0.0])  # active x2, new reserve, off
    want = np.asarray(params["a"]) + 8.0 / (2 + 1e-5) * (t["A"] * e_eff) @ t["B"]  # α/ranknum
    np.testing.assert_allclose(R.apply(params, grown)["a"], want, rtol=1e-5, atol=1e-6)
    # The scalars in use: rank·(in + out + 1) + reserve·(in + out) per matrix.
    assert R.increlora_num_trainable(grown) == (2 * 15 + 14) + (1 * 15 + 14)  # in + out = 14
    # Total 3 < target 4: grows again; then at the target the reserve switches off.
    final, _ = schedule.update(2, grown, scores, state)
    assert sum(R.increlora_ranks(final).values()) == 4
    assert all(int(final.frozen[p]["reserve"]) == 0 for p in ("a", "b"))
    assert R.increlora_num_trainable(final) == 3 * 15 + 1 * 15  # no reserve left


def test_value_and_grad_scores_the_weight_gradient(key):
    params = {"w": normal(4, (2, 8, 6))}
    _, adapters = R.increlora(4, init_rank=2).init(key, params)
    adapters = perturb(adapters)
    x = normal(5, (5, 8))
    loss_fn = lambda p: jnp.sum(jnp.tanh(jnp.einsum("ti,lio->lto", x, p["w"])) ** 2)
    loss, grads, scores = R.increlora_value_and_grad(loss_fn, params, adapters)
    direct = jax.grad(lambda t: loss_fn(R.apply(params, adapters.replace(trainable=t))))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), grads, direct(adapters.trainable)
    )
    g_w = jax.grad(loss_fn)(R.apply(params, adapters))["w"]
    delta = R.apply(params, adapters)["w"] - params["w"]
    want = jnp.sum(jnp.abs(delta * g_w), axis=(-2, -1)) / np.sqrt(48)
    np.testing.assert_allclose(scores["w"], want, rtol=1e-4)
    assert scores["w"].shape == (2,)


def test_schedule_grows_the_important_matrices_under_jit(key):
    params = {"w": normal(6, (3, 8, 6))}  # three stacked matrices
    _, adapters = R.increlora(4, init_rank=1).init(key, params)
    x = normal(7, (16, 8))
    target = jnp.einsum("ti,io->to", x, normal(8, (8, 6)))
    schedule = R.IncreLoRASchedule(target_rank=2, init_warmup=2, incre_interval=3, top_h=1)
    tx = optax.adam(1e-2)

    def loss_fn(p):  # only matrix 0 matters: it should be grown first
        return jnp.mean((x @ p["w"][0] - target) ** 2) + 1e-3 * jnp.mean(p["w"][1:] ** 2)

    @jax.jit
    def step(t, adapters, opt_state, state):
        loss, grads, scores = R.increlora_value_and_grad(loss_fn, params, adapters)
        grads = jax.tree.map(
            jnp.add,
            grads,
            jax.grad(lambda tr: schedule.regularizer(adapters.replace(trainable=tr)))(
                adapters.trainable
            ),
        )
        updates, opt_state = tx.update(grads, opt_state)
        adapters = adapters.replace(trainable=optax.apply_updates(adapters.trainable, updates))
        adapters, state = schedule.update(t, adapters, scores, state)
        return loss, adapters, opt_state, state

    opt_state, state, history = tx.init(adapters.trainable), schedule.init(adapters), []
    for t in range(14):
        loss, adapters, opt_state, state = step(t, adapters, opt_state, state)
        history.append(np.asarray(adapters.frozen["w"]["active"]).tolist())
    assert step._cache_size() == 1
    # Growth every 3 steps after the warmup, always the matrix that matters, up to the target
    # total 3 x 2 = 6 (its capacity of 4 slots); then the reserve switches off.
    assert [history[t] for t in (2, 3, 6, 9, 13)] == [
        [1, 1, 1],
        [2, 1, 1],
        [3, 1, 1],
        [4, 1, 1],
        [4, 1, 1],
    ]
    assert int(adapters.frozen["w"]["reserve"]) == 0


def test_init_count_merge_io_jit(key, tmp_path):
    count = lambda b, i, o: b * 4 * (i + o + 1)  # the slots; 1·(i+o+1) + 1·(i+o) train at r=1
    _, base, adapters = family.noop_and_count(R.increlora(4, init_rank=1), key, count)
    in_use = sum(b * ((i + o + 1) + (i + o)) for b, i, o in family.TARGETED.values())
    assert R.increlora_num_trainable(adapters) == in_use
    family.merge_unmerge(base, adapters)
    family.round_trips(base, adapters, tmp_path)
    family.jitted(base, adapters)


def test_nnx_fast_path(key):
    family.nnx_matches_apply(R.increlora(3, init_rank=2), key)
    family.never_builds_delta_w(R.increlora(3, init_rank=2), key)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: R.increlora(0), "rank must be a positive int"),
        (lambda: R.increlora(2, init_rank=3), "init_rank=3 exceeds rank=2"),
        (lambda: R.increlora(4, reserve=0), "reserve must be a positive int"),
        (lambda: R.IncreLoRASchedule(top_h=0), "top_h must be a positive int"),
        (lambda: R.IncreLoRASchedule(beta2=0.0), r"beta2 must be in \(0, 1\)"),
        (lambda: R.increlora(9).init(jax.random.key(0), {"w": jnp.ones((8, 12))}), "rank=9 .*'w'"),
        (
            lambda: R.increlora_ranks(
                R.lora(2).init(jax.random.key(0), {"w": jnp.ones((4, 4))})[1]
            ),
            "no IncreLoRA site",
        ),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_schedule_state_can_be_donated(key):
    _, adapters = R.increlora(4, init_rank=1).init(key, family.tree())
    state = R.IncreLoRASchedule().init(adapters)
    ids = [id(x) for x in jax.tree.leaves(state)]
    assert len(ids) == len(set(ids))
    step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    after = jax.block_until_ready(step(state))
    assert all(bool(jnp.all(x == 1)) for x in jax.tree.leaves(after))
