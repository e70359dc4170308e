"""Layer-wise fused updates: the same trajectory as the ordinary step, clear refusals."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lr
from lowrank_jax.models import Llama, get_config
from lowrank_jax.train import layerwise
from lowrank_jax.train.step import TrainState, make_train_step
from tests.helpers import losses_on_a_4x2_mesh

VOCAB, LAYERS, STEPS = 64, 2, 10


def tiny(scan_layers=True, remat=False):
    cfg = get_config(
        "llama_tiny", vocab_size=VOCAB, num_layers=LAYERS, scan_layers=scan_layers, remat=remat
    )
    model = Llama(cfg, rngs=nnx.Rngs(0))
    return nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))


def batches(n=STEPS, rows=2):
    keys = jax.random.split(jax.random.key(1), n)
    return [jax.random.randint(k, (rows, 17), 0, VOCAB) for k in keys]


def run(step, tx, params, data):
    state = TrainState(jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params))
    losses = []
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, np.asarray(losses), float(metrics["grad_norm"])


# refreshes at steps 0, 3, 6, 9
METHODS = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "galore_svd": lambda: lr.galore_adamw(1e-2, rank=8, update_proj_gap=3),
    "galore_randomized": lambda: lr.galore_adamw(
        1e-2, rank=8, update_proj_gap=3, basis="randomized", on_refresh="reproject"
    ),
    "fira": lambda: lr.fira_adamw(1e-2, rank=8, update_proj_gap=3),
    "apollo": lambda: lr.apollo_adamw(1e-2, rank=8, update_proj_gap=3),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_layerwise_equals_the_ordinary_step(name):
    graphdef, params = tiny()
    tx = METHODS[name]()
    data = batches()
    a, losses_a, norm_a = run(make_train_step(graphdef, tx), tx, params, data)
    b, losses_b, norm_b = run(make_train_step(graphdef, tx, layerwise=True), tx, params, data)
    # float32 round-off only (the two programs fuse differently; Adam's m/sqrt(v) magnifies a
    # last-bit difference of a tiny gradient): a wrong update would be off by ~lr = 1e-2
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5)
    np.testing.assert_allclose(norm_b, norm_a, rtol=1e-4)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(x))))
    assert jax.tree.structure(a.opt_state) == jax.tree.structure(b.opt_state)
    for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(x)) + 1))


def test_layerwise_8bit_galore_tracks_the_ordinary_step():
    """8-bit codes round: a float32 round-off difference can move a value to the neighbouring
    code, so the trajectories agree to the quantization's precision, not bit for bit, and drift
    apart slowly once a code has flipped."""
    graphdef, params = tiny()
    # rank 32: every layer's low-rank moment is a whole number of 256-element blocks
    tx = lr.galore_adamw_8bit(1e-2, rank=32, update_proj_gap=3, min_8bit_size=512)
    data = batches()
    _, losses_a, _ = run(make_train_step(graphdef, tx), tx, params, data)
    _, losses_b, _ = run(make_train_step(graphdef, tx, layerwise=True), tx, params, data)
    np.testing.assert_allclose(losses_b[:5], losses_a[:5], rtol=2e-3)
    np.testing.assert_allclose(losses_b, losses_a, rtol=5e-2)


def test_layerwise_with_remat_recomputes_and_agrees():
    graphdef, params = tiny(remat=True)
    tx = METHODS["galore_svd"]()
    data = batches(4)
    _, losses_a, _ = run(make_train_step(graphdef, tx), tx, params, data)
    _, losses_b, _ = run(make_train_step(graphdef, tx, layerwise=True), tx, params, data)
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5)


def test_per_layer_clipping_clips_each_layer_and_reports_the_global_norm():
    graphdef, params = tiny()
    tx = optax.sgd(1.0)
    batch = batches(1)[0]
    step = make_train_step(graphdef, tx, layerwise=True, grad_clip=1e-3, clip_per_layer=True)
    state = TrainState(jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params))
    new, metrics = step(state, batch)
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, p)(batch[:, :-1]), batch[:, 1:]
    ).mean()
    grads = jax.grad(loss_fn)(params)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), 1e-5)
    moved = jax.tree.map(lambda a, b: a - b, params, new.params)
    layer_part, rest_part = layerwise.partition_params(moved)
    per_layer = [
        float(optax.tree.norm(jax.tree.map(lambda x, i=i: x[i], layer_part))) for i in range(LAYERS)
    ]
    np.testing.assert_allclose(per_layer, 1e-3, rtol=1e-3)  # each layer clipped on its own
    np.testing.assert_allclose(float(optax.tree.norm(rest_part)), 1e-3, rtol=1e-3)


@pytest.mark.usefixtures("eight_devices")
def test_layerwise_on_a_4x2_mesh_equals_one_device():
    graphdef, params = tiny()
    tx = METHODS["galore_svd"]()
    data = batches(4, rows=8)  # the batch is split over the 4-way fsdp axis
    _, want, _ = run(make_train_step(graphdef, tx, layerwise=True), tx, params, data)
    config = get_config("llama_tiny", vocab_size=VOCAB, num_layers=LAYERS, scan_layers=True)
    losses, state, state_sharding = losses_on_a_4x2_mesh(
        graphdef, tx, params, data, config, layerwise=True
    )
    np.testing.assert_allclose(losses, want, rtol=1e-4)
    kernel = state.params["layers"]["attn"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == state_sharding.params["layers"]["attn"]["q_proj"]["kernel"].spec


def test_a_model_without_stacked_layers_is_refused_naming_scan_layers():
    graphdef, params = tiny(scan_layers=False)
    tx = optax.adamw(1e-3)
    step = make_train_step(graphdef, tx, layerwise=True)
    state = TrainState(jnp.int32(0), params, tx.init(params))
    with pytest.raises(ValueError, match="scan_layers=True"):
        step(state, batches(1)[0])


def test_layer_sampling_methods_are_refused_naming_the_method():
    graphdef, params = tiny()
    with pytest.raises(ValueError, match="lisa cannot be applied per layer"):
        layerwise.split_state(lr.lisa_adamw(1e-3, n_active=1), params, method="lisa")


def test_8bit_blocks_that_straddle_layers_are_refused():
    graphdef, params = tiny()
    tx = lr.galore_adamw_8bit(1e-2, rank=8, min_8bit_size=512)  # 8 x 344 per layer: 10.75 blocks
    with pytest.raises(ValueError, match="straddle layers"):
        layerwise.split_state(tx, params, method="galore_adamw_8bit")


def test_global_clipping_with_layerwise_needs_an_explicit_choice():
    graphdef, _ = tiny()
    with pytest.raises(ValueError, match="clip_per_layer=True"):
        make_train_step(graphdef, optax.adamw(1e-3), layerwise=True, grad_clip=1.0)


def test_split_state_sorts_the_state_leaves():
    _, params = tiny()
    split = layerwise.split_state(lr.galore_adamw(1e-2, rank=8), params)
    assert split.n_layers == LAYERS
    per_layer = [p for _, p in split.layer_sources]
    assert any(per_layer) and not all(per_layer)  # moments, projectors / the shared counters
    shared = [i for i, p in split.layer_sources if not p]
    assert set(shared) <= {i for i, _ in split.rest_sources}  # counters also in the rest


def test_a_non_finite_step_leaves_every_layer_and_the_state_as_they_were():
    graphdef, params = tiny()
    tx = METHODS["adamw"]()
    params["layers"]["mlp"]["up_proj"]["kernel"] = (
        params["layers"]["mlp"]["up_proj"]["kernel"].at[1, 0, 0].set(jnp.inf)
    )
    state = TrainState(jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params))
    before = jax.tree.map(np.asarray, state)
    state, metrics = make_train_step(graphdef, tx, layerwise=True)(state, batches(1)[0])
    assert bool(metrics["skipped"])
    assert int(state.step) == 1
    chex.assert_trees_all_equal(before[1:], jax.tree.map(np.asarray, state[1:]))
