"""LISA / OwLore: sampled layers, restarts, per-layer and stacked leaves, O(n_active) state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import memory
from lowrank_jax.optimizers import lisa_adamw, owlore_adamw
from lowrank_jax.transforms import galore, lisa, outlier_scores, owl_probabilities, scale_by_adam_hf
from tests.helpers import D, L, grads_for, llama_1b, model, run_steps


def as_per_layer(tree):
    """A stacked tree's ``layers`` split into ``{"0": ..., ...}`` (to compare layouts)."""
    out = dict(tree)
    out["layers"] = {str(i): jax.tree.map(lambda x, i=i: x[i], tree["layers"]) for i in range(L)}
    return out


def changed(before, after):
    return bool(jnp.any(before != after))


def trajectory(tx, params, grads):
    """Parameters after every step (one compile)."""

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state, out = tx.init(params), []
    for g in grads:
        params, state = step(params, state, g)
        out.append(params)
    return out, state


def stack_layers(tree):
    return {**tree, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *tree["layers"].values())}


def test_only_active_layers_change_in_both_layouts(key):
    grads = grads_for(model(key), 4)
    tx = lisa_adamw(1e-2, n_active=2, interval=2, weight_decay=0.1)
    per_layer, s1 = trajectory(tx, model(key), grads)
    stacked, s2 = trajectory(tx, model(key, stacked=True), [stack_layers(g) for g in grads])
    np.testing.assert_array_equal(s1[0].active, s2[0].active)
    for a_step, b_step in zip(per_layer, stacked):
        for a, b in zip(jax.tree.leaves(a_step), jax.tree.leaves(as_per_layer(b_step))):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # step 3 does not resample: exactly the active layers and the always-active leaves move
    active = set(np.asarray(s1[0].active).tolist())
    assert len(active) == 2
    before, after = per_layer[2], per_layer[3]
    for i in range(L):
        layer_of = lambda tree, i=i: jax.tree.leaves(tree["layers"][str(i)])
        pairs = zip(layer_of(before), layer_of(after))
        assert all(changed(a, b) == (i in active) for a, b in pairs), i
    for name in ("embed", "final_norm", "lm_head"):
        pairs = zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name]))
        assert all(changed(a, b) for a, b in pairs)


def test_layer_moments_restart_at_each_resampling_and_the_others_never(key):
    params = model(key)
    grads = grads_for(params, 6)
    path, state = trajectory(lisa_adamw(1e-2, n_active=2, interval=3), params, grads)
    active = [str(i) for i in np.asarray(state[0].active)]
    # the layers of the second interval follow a fresh AdamW from step 3
    fresh, _ = run_steps(
        optax.adam(1e-2),
        {i: path[2]["layers"][i] for i in active},
        [{i: g["layers"][i] for i in active} for g in grads[3:]],
    )
    for i in active:
        for a, b in zip(jax.tree.leaves(path[-1]["layers"][i]), jax.tree.leaves(fresh[i])):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the head: one AdamW over all six steps
    head, _ = run_steps(optax.adam(1e-2), params["lm_head"], [g["lm_head"] for g in grads])
    np.testing.assert_allclose(path[-1]["lm_head"]["kernel"], head["kernel"], rtol=1e-6, atol=1e-7)
    assert int(state[0].layer_state.count) == 3 and int(state[0].always_state.count) == 6


def test_sampling_follows_probs_and_is_seeded(key):
    params = model(key)
    grads = grads_for(params, 1)
    tx = lisa(optax.scale_by_adam(), n_active=1, interval=1, probs=[0.0, 1.0, 0.0, 3.0], seed=3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    seen = []
    for _ in range(40):
        _, state = update(grads[0], state)
        seen.append(int(state.active[0]))
    counts = np.bincount(seen, minlength=L)
    assert counts[0] == counts[2] == 0 and counts[1] > 0 and counts[3] > counts[1]
    again = jax.jit(lisa(optax.scale_by_adam(), n_active=1, interval=1,
                         probs=[0.0, 1.0, 0.0, 3.0], seed=3).update)
    _, other = again(grads[0], tx.init(params))
    assert int(other.active[0]) == seen[0]


@pytest.mark.parametrize("stacked", [False, True])
def test_llama_1b_state_holds_two_layers_plus_embedding_and_head(stacked):
    params = llama_1b(stacked)
    tx = lisa_adamw(1e-3, n_active=2)
    measured = memory.state_bytes(tx, params, scalars=False)
    assert measured == memory.lisa_bytes(params, n_active=2)
    layers = memory.adamw_bytes(params["layers"])
    always = memory.adamw_bytes({k: v for k, v in params.items() if k != "layers"})
    assert measured <= 2 / 24 * layers + always + 8  # + the two int32 active indices
    assert measured < 0.4 * memory.adamw_bytes(params)


def test_owlore_runs_galore_on_the_sampled_layers(key):
    params = model(key)
    tx = owlore_adamw(1e-2, probs=[1, 2, 3, 4], n_active=2, interval=2, rank=2,
                      targets="attn|mlp")
    state = tx.init(params)[0]
    slot = state.layer_state.projectors["layers"]["0"]["attn"]["q_proj"]["kernel"]
    assert slot.in_basis.shape == (D, 2)
    mu = state.layer_state.lowrank_state.mu["layers"]
    assert mu["1"]["mlp"]["up_proj"]["kernel"].shape == (2, 16)
    assert sorted(state.layer_state.projectors["layers"]) == ["0", "1"]
    out, _ = run_steps(tx, params, grads_for(params, 3))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(out))
    with pytest.raises(ValueError, match="always_active_inner"):
        lisa(galore(scale_by_adam_hf(), rank=2, targets="attn|mlp")).init(params)


def test_outlier_scores_give_owl_probabilities(key):
    params = model(key, stacked=True)
    # layer 2's q_proj gets a few large weights: more outliers, more likely to be sampled
    q = params["layers"]["attn"]["q_proj"]["kernel"]
    params["layers"]["attn"]["q_proj"]["kernel"] = q.at[2, :2, :2].set(40.0)
    norms = {
        "layers/attn/q_proj/kernel": jnp.ones((L, D)),
        "layers/mlp/up_proj/kernel": jnp.ones((L, D)),
    }
    scores = outlier_scores(params, norms, m=5.0)
    assert scores.shape == (L,) and np.argmax(scores) == 2
    p = owl_probabilities(scores + 1.0)
    np.testing.assert_allclose(p.sum(), 1.0)
    # the input norms weigh the scores: a hot input feature makes its column count
    hot = dict(norms)
    hot["layers/mlp/up_proj/kernel"] = jnp.ones((L, D)).at[0, 0].set(100.0)
    assert outlier_scores(params, hot, m=5.0)[0] > scores[0]
    with pytest.raises(ValueError, match="layers/mlp/up_proj/kernel"):
        outlier_scores(params, {"layers/attn/q_proj/kernel": jnp.ones((L, D))})
    with pytest.raises(ValueError, match="not all zero"):
        owl_probabilities(np.zeros(L))


def test_one_compile_across_resamplings(key):
    params = model(key)
    tx = lisa_adamw(1e-2, n_active=2, interval=1)
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(1)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for g in grads_for(params, 4):
        params, state = step(params, state, g)
    assert len(traces) == 1


def test_frozen_non_layer_leaves_get_no_state_and_no_update(key):
    params = model(key)
    tx = lisa(optax.adam(1e-2), n_active=1, always_active="embed")
    state = tx.init(params)
    assert isinstance(state.always_state[0].mu["lm_head"]["kernel"], optax.MaskedNode)
    updates, _ = tx.update(grads_for(params, 1)[0], state, params)
    assert not bool(jnp.any(updates["lm_head"]["kernel"]))
    assert bool(jnp.any(updates["embed"]["embedding"]))


def test_inject_hyperparams(key):
    params = model(key)
    grads = grads_for(params, 3)
    tx = optax.inject_hyperparams(lisa_adamw, static_args=("n_active",))(
        learning_rate=1e-2, n_active=2, interval=2
    )
    out, _ = run_steps(tx, params, grads)
    expected, _ = run_steps(lisa_adamw(1e-2, n_active=2, interval=2), params, grads)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_inputs(key):
    params = model(key)
    adam = optax.scale_by_adam()
    with pytest.raises(ValueError, match="no leaf matches layer_pattern"):
        lisa(adam, layer_pattern=r"blocks/(\d+)/", stacked_pattern=None).init(params)
    with pytest.raises(ValueError, match="exceeds the number of layers"):
        lisa(adam, n_active=5).init(params)
    with pytest.raises(ValueError, match="4 finite non-negative"):
        lisa(adam, probs=[1.0, 2.0]).init(params)
    with pytest.raises(ValueError, match="positive weights"):
        lisa(adam, n_active=2, probs=[1.0, 0.0, 0.0, 0.0]).init(params)
    odd = jax.tree.map(lambda x: x, params)
    odd["layers"]["3"]["attn"]["q_proj"]["kernel"] = jnp.ones((D, 3))
    with pytest.raises(ValueError, match="layers/3/attn/q_proj/kernel"):
        lisa(adam).init(odd)
    gap = {**params, "layers": {"0": params["layers"]["0"], "2": params["layers"]["2"]}}
    with pytest.raises(ValueError, match="0..L-1"):
        lisa(adam).init(gap)
    stacked = model(key, stacked=True)
    stacked["layers"]["extra"] = jnp.ones((3, D))
    with pytest.raises(ValueError, match="layers/extra"):
        lisa(adam).init(stacked)
    with pytest.raises(ValueError, match="n_active must be positive"):
        lisa(adam, n_active=0)
