"""SoRA: gated LoRA, the proximal L1 step on the gate, effective rank and pruning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowrank_jax import reparam as R
from lowrank_jax.reparam.sora import soft_threshold

from . import family
from .conftest import normal, perturb

XI = 0.1
G = jnp.array([-3, -1.5, -0.5, 0.5, 1.5, 3.0]) * XI


@pytest.mark.parametrize(
    "mode, want",
    [("exact", [-2, -0.5, 0, 0, 0.5, 2]), ("reference", [-2, 0, 0, 0, 0, 2])],
)
def test_soft_threshold_exact_and_reference_modes(mode, want):
    np.testing.assert_allclose(soft_threshold(G, XI, mode), np.array(want) * XI, atol=1e-7)
    # As an optax transformation after the gate optimizer: u -> prox(g + u) - g.
    tx = R.prox_l1(XI, mode=mode)
    u, _ = tx.update(jnp.zeros(6), tx.init(G), jnp.zeros(6) + G)
    np.testing.assert_allclose(G + u, np.array(want) * XI, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    g=hnp.arrays(np.float32, 8, elements=st.floats(-4, 4, width=32)),
    xi=st.floats(0, 2, width=32),
)
def test_exact_mode_is_the_proximal_operator(g, xi):
    # v = prox(g) minimises ½(v - g)² + ξ|v|: g - v = ξ·sign(v) where v ≠ 0, |g| <= ξ where 0.
    v = np.asarray(soft_threshold(jnp.asarray(g), xi, "exact"))
    live = v != 0
    np.testing.assert_allclose((g - v)[live], xi * np.sign(v[live]), atol=1e-5)
    assert np.all(np.abs(g[~live]) <= xi + 1e-6)
    ref = np.asarray(soft_threshold(jnp.asarray(g), xi, "reference"))
    assert np.all((ref == 0) | (np.abs(ref) >= np.abs(v) - 1e-6))  # never shrinks more


def test_reference_mode_keeps_a_gate_at_exactly_xi():
    g = jnp.array([XI, -XI])
    np.testing.assert_array_equal(soft_threshold(g, XI, "reference"), g)  # g[|g| < ξ] only
    np.testing.assert_array_equal(soft_threshold(g, XI, "exact"), jnp.zeros(2))


def test_delta_is_a_gated_lora(key):
    w = normal(0, (8, 6))
    _, adapters = R.sora(4, 8.0).init(key, {"w": w})
    adapters = perturb(adapters)
    t = {k: np.asarray(v, np.float64) for k, v in adapters.trainable["w"].items()}
    want = np.asarray(w) + 2.0 * t["A"] @ np.diag(t["g"]) @ t["B"]  # s = 8 / 4
    np.testing.assert_allclose(R.apply({"w": w}, adapters)["w"], want, rtol=1e-5, atol=1e-5)
    # Reference init: A Kaiming U(±1/√in), g ~ N(0, 1), B = 0.
    _, fresh = R.sora(4).init(key, {"w": w})
    f = fresh.trainable["w"]
    assert float(jnp.abs(f["A"]).max()) <= 1 / np.sqrt(8) and not np.any(f["B"])
    assert float(jnp.abs(f["g"]).max()) > 0.2 and len(np.unique(f["g"])) == 4


def test_init_count_merge_io_jit(key, tmp_path):
    count = lambda b, i, o: b * 4 * (i + o + 1)
    _, base, adapters = family.noop_and_count(R.sora(4), key, count)
    family.merge_unmerge(base, adapters)
    family.round_trips(base, adapters, tmp_path)
    family.jitted(base, adapters)


def train(key, threshold, steps=30, mode="exact"):
    w = normal(1, (3, 8, 6))
    params = {"w": w}
    _, adapters = R.sora(6, 6.0).init(key, params)
    x = normal(2, (16, 8))
    target = x @ (w[0] + 0.3 * normal(3, (8, 6)))  # a low-rank-ish change of layer 0 only
    tx = R.sora_optimizer(optax.adam(3e-2), optax.adam(3e-2), threshold, mode=mode)

    def loss(trainable):
        a = adapters.replace(trainable=trainable)
        eff = R.apply(params, a)["w"]
        return jnp.mean((x @ eff[0] - target) ** 2) + 1e-2 * R.sora_l1(a)

    @jax.jit
    def step(trainable, state):
        grads = jax.grad(loss)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    trainable, state = adapters.trainable, tx.init(adapters.trainable)
    first = float(loss(trainable))
    for _ in range(steps):
        trainable, state = step(trainable, state)
    assert step._cache_size() == 1
    return params, adapters.replace(trainable=trainable), first, float(loss(trainable))


def test_training_switches_ranks_off_and_prune_keeps_the_weights(key):
    params, trained, first, last = train(key, threshold=0.05)
    assert last < first
    ranks = R.sora_rank(trained)["w"]
    assert ranks.shape == (3,) and ranks.min() < 6  # some gates are exactly zero
    g = np.asarray(trained.trainable["w"]["g"])
    assert np.all((g == 0) | (np.abs(g) > 0))  # exact zeros, not merely small
    # The factors are not thresholded: only the gates are.
    assert np.count_nonzero(trained.trainable["w"]["A"]) == trained.trainable["w"]["A"].size
    pruned = R.sora_prune(trained)
    r = pruned.sites[0].method.rank
    assert r == int(np.any(g != 0, axis=0).sum()) and pruned.sites[0].method.scale == 1.0
    assert R.num_trainable(pruned) == 3 * r * (8 + 6 + 1)
    np.testing.assert_allclose(
        R.apply(params, pruned)["w"], R.apply(params, trained)["w"], atol=1e-6
    )


def test_zero_threshold_schedule_does_not_prune(key):
    # A staged schedule (the paper's sparsifying scheduler) that stays at ξ = 0 here.
    schedule = optax.piecewise_constant_schedule(0.0, {1000: 0.05})
    _, trained, _, _ = train(key, threshold=schedule, steps=10)
    assert np.all(R.sora_rank(trained)["w"] == 6)


def test_nnx_fast_path(key):
    family.nnx_matches_apply(R.sora(2), key)
    family.never_builds_delta_w(R.sora(2), key)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: R.sora(0), "rank must be a positive int"),
        (lambda: R.sora(4, -1.0), "alpha must be a number >= 0"),
        (lambda: R.sora(4, dropout=1.0), r"dropout must be in \[0, 1\)"),
        (lambda: R.sora(4, gate_init="zeros"), "gate_init must be one of"),
        (lambda: R.prox_l1(-0.1), "threshold must be a number >= 0"),
        (lambda: R.prox_l1(0.1, mode="soft"), "mode must be one of"),
        (lambda: R.prox_l1(0.1).update(G, R.prox_l1(0.1).init(G)), "needs params"),
        (lambda: R.sora(9).init(jax.random.key(0), {"w": jnp.ones((8, 12))}), "rank=9 .*'w'"),
        (lambda: R.sora_rank(R.lora(2).init(jax.random.key(0), {"w": jnp.ones((4, 4))})[1]),
         "no SoRA site"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
