"""The jitted step (clipping, donation, any optax tx) and orbax checkpoints of optax states."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lr
from lowrank_jax.data import IteratorState
from lowrank_jax.models import Llama, get_config
from lowrank_jax.train.checkpoint import Checkpointer, CheckpointError, CorruptCheckpointError
from lowrank_jax.train.step import TrainState, make_eval_step, make_train_step

CONFIG = get_config("llama_tiny", vocab_size=40, num_layers=1)


def _setup(tx, seed=0):
    model = Llama(CONFIG, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return nnx.graphdef(model), TrainState(jnp.int32(0), params, tx.init(params))


def _batch(seed=0, shape=(4, 17)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 40, shape), jnp.int32)


@pytest.mark.parametrize("name", ["adamw", "galore"])
def test_step_lowers_the_loss_and_donates(name):
    tx = {"adamw": optax.adamw(3e-3), "galore": lr.galore_adamw(3e-2, rank=8)}[name]
    graphdef, state = _setup(tx)
    step = make_train_step(graphdef, tx, grad_clip=1.0)
    evaluate = make_eval_step(graphdef)
    batch = _batch()
    before = float(evaluate(state.params, batch))
    old_leaf = jax.tree.leaves(state.params)[0]
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert old_leaf.is_deleted()  # the state buffers were donated
    assert int(state.step) == 8
    assert losses[0] == pytest.approx(before, rel=1e-5)
    assert float(evaluate(state.params, batch)) < before - 0.5


def test_gradient_clipping_matches_torch_rule():
    graphdef, state = _setup(optax.sgd(1.0))
    step = make_train_step(graphdef, optax.sgd(1.0), grad_clip=1e-3)
    before = jax.tree.map(jnp.copy, state.params)
    after, metrics = step(state, _batch())
    norm = float(metrics["grad_norm"])  # reported before clipping
    assert norm > 1e-3
    delta = optax.tree.norm(jax.tree.map(jnp.subtract, after.params, before))
    np.testing.assert_allclose(float(delta), 1e-3 * norm / (norm + 1e-6), rtol=1e-3)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_galore_state_round_trips_with_types(tmp_path):
    tx = lr.galore_adamw(1e-2, rank=2, update_proj_gap=2)
    params = {
        "embed": {"embedding": jnp.ones((5, 4))},
        "layers": {0: {"attn": {"q_proj": {"kernel": jnp.arange(24.0).reshape(6, 4)}}}},
        "final_norm": {"scale": jnp.ones(4)},
    }
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.sin(x + 1.0), params)
    _, opt_state = tx.update(grads, opt_state, params)
    state = TrainState(jnp.int32(1), params, opt_state)
    galore_state = opt_state[0]
    assert isinstance(galore_state, lr.GaLoreState)
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    nodes = jax.tree.leaves(galore_state.projectors, is_leaf=is_masked)
    assert any(is_masked(x) for x in nodes)  # untargeted leaves hold MaskedNode
    ckpt = Checkpointer(str(tmp_path), keep=2)
    ckpt.save(1, state, IteratorState(2, 24), {"model": "x"})
    restored, position = ckpt.restore(1, jax.eval_shape(lambda: state), {"model": "x"})
    assert position == IteratorState(2, 24)
    assert isinstance(restored, TrainState)
    assert isinstance(restored.opt_state[0], lr.GaLoreState)
    _assert_same(restored, state)
    restored_nodes = jax.tree.leaves(restored.opt_state[0].projectors, is_leaf=is_masked)
    assert [is_masked(x) for x in restored_nodes] == [is_masked(x) for x in nodes]


def test_keeps_last_k_and_ignores_half_written(tmp_path):
    tx = optax.adamw(1e-3)
    _, state = _setup(tx)
    ckpt = Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state, IteratorState(0, step), {})
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]
    # What a kill during a save leaves: orbax's temporary directory, never renamed.
    os.makedirs(tmp_path / "4.orbax-checkpoint-tmp-123" / "state")
    reopened = Checkpointer(str(tmp_path), keep=2)
    assert reopened.latest_step() == 3
    _, position = reopened.restore(3, jax.eval_shape(lambda: state), {})
    assert position == IteratorState(0, 3)


def test_incompatible_and_corrupt_checkpoints_are_one_line_errors(tmp_path):
    tx = optax.adamw(1e-3)
    _, state = _setup(tx)
    ckpt = Checkpointer(str(tmp_path), keep=2)
    ckpt.save(5, state, IteratorState(0, 0), {"model": "llama_tiny", "rank": 4})
    abstract = jax.eval_shape(lambda: state)
    with pytest.raises(
        CheckpointError, match=r"incompatible run: model='llama_tiny' \(now 'llama_20m'\)"
    ):
        ckpt.restore(5, abstract, {"model": "llama_20m", "rank": 4})
    other = jax.eval_shape(lambda: _setup(lr.galore_adamw(1e-3, rank=4))[1])
    with pytest.raises(CheckpointError, match="cannot be restored") as err:
        ckpt.restore(5, other, {"model": "llama_tiny", "rank": 4})
    assert "\n" not in str(err.value)
    for root, _, files in os.walk(tmp_path / "5" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be restored") as err:
        ckpt.restore(5, abstract, {"model": "llama_tiny", "rank": 4})
    assert "\n" not in str(err.value)


def test_a_nonfinite_step_leaves_params_and_optimizer_state_unchanged():
    tx = lr.galore_adamw(3e-2, rank=8)  # test_step_lowers_the_loss's step: a cache hit
    graphdef, state = _setup(tx)
    step = make_train_step(graphdef, tx, grad_clip=1.0)
    state, metrics = step(state, _batch(0))
    assert not bool(metrics["skipped"])
    before = jax.tree.map(np.asarray, state)
    poisoned = _batch(1).at[0, 0].set(10**6)  # out of the vocabulary: NaN logits
    state, metrics = step(state, poisoned)
    assert bool(metrics["skipped"]) and not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 2  # the step count advances (the batch was consumed)
    _assert_same(state.params, before.params)
    _assert_same(state.opt_state, before.opt_state)
    state, metrics = step(state, _batch(2))  # and the next step trains normally
    assert not bool(metrics["skipped"]) and np.isfinite(float(metrics["loss"]))
    sgd = optax.sgd(1.0)  # skip_nonfinite=False: the NaN goes in, as before
    raw = make_train_step(graphdef, sgd, skip_nonfinite=False)
    state, metrics = raw(TrainState(state.step, state.params, sgd.init(state.params)), poisoned)
    assert not bool(metrics["skipped"])
    assert not np.isfinite(np.asarray(jax.tree.leaves(state.params)[0])).all()


def test_checksums_catch_swapped_arrays_and_are_the_same_on_any_mesh(tmp_path, eight_devices):
    from lowrank_jax import sharding
    from lowrank_jax.train.integrity import tree_checksums

    tx = optax.adamw(1e-3)
    _, state = _setup(tx)
    ckpt = Checkpointer(str(tmp_path), keep=3)
    ckpt.save(1, state, IteratorState(0, 1), {})
    other = state._replace(params=jax.tree.map(lambda x: x + 1, state.params))
    ckpt.save(2, other, IteratorState(0, 2), {})
    # Valid arrays of another step (and no files.json): only the checksums can tell.
    for step in (1, 2):
        os.remove(tmp_path / str(step) / "files.json")
    os.rename(tmp_path / "1" / "state", tmp_path / "swap")
    os.rename(tmp_path / "2" / "state", tmp_path / "1" / "state")
    os.rename(tmp_path / "swap", tmp_path / "2" / "state")
    with pytest.raises(CorruptCheckpointError, match=r"array .* does not match the checksum"):
        ckpt.restore(2, jax.eval_shape(lambda: state), {})
    leaf = jnp.arange(64.0).reshape(8, 8)
    mesh = sharding.make_mesh(4, 2, explicit=False)
    spec = jax.sharding.PartitionSpec("fsdp", "tensor")
    sharded = jax.device_put(leaf, jax.sharding.NamedSharding(mesh, spec))
    assert tree_checksums({"w": sharded}) == tree_checksums({"w": leaf})
    assert tree_checksums({"w": leaf.T}) != tree_checksums({"w": leaf})  # same words, moved


def test_restore_latest_falls_back_past_a_corrupt_step(tmp_path):
    tx = optax.adamw(1e-3)
    _, state = _setup(tx)
    ckpt = Checkpointer(str(tmp_path), keep=3)
    for step in (1, 2):
        ckpt.save(step, state._replace(step=jnp.int32(step)), IteratorState(0, step), {"a": 1})
    data = tmp_path / "2" / "meta" / "metadata"
    data.write_text(data.read_text()[:-5])
    warnings, accepted = [], []
    found = ckpt.restore_latest(
        jax.eval_shape(lambda: state), lambda saved, step: accepted.append(step), warnings.append
    )
    step, restored, position, settings = found
    assert (step, int(restored.step), position, settings) == (1, 1, IteratorState(0, 1), {"a": 1})
    assert accepted == [1] and len(warnings) == 1
    assert f"{data} has " in warnings[0] and "resuming from step 1" in warnings[0]
    assert ckpt.all_steps() == [1] and (tmp_path / "2.corrupt").is_dir()
    assert Checkpointer(str(tmp_path / "empty")).restore_latest(state, None, None) is None


def _masked_loss(graphdef):
    """A fine-tuning loss for ``make_train_step(loss_fn=...)``: the summed next-token loss
    over the positions ``batch["mask"]`` keeps, and their count."""

    def loss(params, batch, scale):
        logits = nnx.merge(graphdef, params)(batch["tokens"][:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
        mask = batch["mask"].astype(jnp.float32)
        return scale * jnp.sum(nll * mask), jnp.sum(mask)

    return loss


def _masked_batch():
    mask = np.zeros((4, 16), bool)
    mask[0, 2:] = mask[1, 12:] = mask[2, :5] = mask[3, 7:9] = True  # uneven counts per row
    return {"tokens": _batch(), "mask": jnp.asarray(mask)}


def test_a_custom_loss_trains_the_whole_batchs_weighted_mean():
    """``loss_fn`` returns (total, count): the step's loss is the batch's masked mean, and
    with accumulation the microbatches' totals and counts are summed before dividing (rows
    with more kept tokens weigh more), so 2 microbatches give the 1-microbatch step."""
    tx = optax.sgd(0.5)
    graphdef, state = _setup(tx)
    loss_fn, batch = _masked_loss(graphdef), _masked_batch()
    total, count = loss_fn(state.params, batch, 1.0)
    results = []
    for accum in (1, 2):
        step = make_train_step(None, tx, accum_steps=accum, loss_fn=loss_fn, grad_clip=1.0)
        copy = jax.tree.map(jnp.copy, state)
        after, metrics = step(copy, batch, jnp.float32(1.0))
        assert float(metrics["loss"]) == pytest.approx(float(total / count), rel=1e-5)
        results.append(after.params)
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree.map(chex_close, *results)
    # and the gradient is that of the masked mean (plain SGD, no clipping reached)
    grads = jax.grad(lambda p: (lambda t, c: t / c)(*loss_fn(p, batch, 1.0)))(state.params)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g * min(1.0, 1.0 / (
        float(optax.tree.norm(grads)) + 1e-6)), state.params, grads)  # fmt: skip
    jax.tree.map(chex_close, results[0], expected)


def test_a_custom_losss_non_finite_step_is_skipped():
    tx = optax.adamw(1e-2)
    graphdef, state = _setup(tx)
    step = make_train_step(None, tx, loss_fn=_masked_loss(graphdef))
    before = jax.tree.map(np.asarray, state)
    after, metrics = step(state, _masked_batch(), jnp.float32(np.nan))
    assert bool(metrics["skipped"]) and int(after.step) == 1
    jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state),
                 (before.params, before.opt_state))  # fmt: skip


def test_a_sharded_custom_loss_step_takes_extra_arguments_with_their_own_shardings():
    """With ``state_sharding`` the step pins the state's and the batch's shardings; the
    ``extra`` arguments of ``loss_fn`` keep theirs (``jax.jit`` needs an ``in_shardings``
    entry per argument: the step used to give two, so any extra argument failed)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    tx = optax.sgd(0.5)  # plain SGD: the sharded and the plain step agree to rounding
    graphdef, state = _setup(tx)
    mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    state_sharding = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    batch_sharding = NamedSharding(mesh, P("fsdp"))
    step = make_train_step(
        None, tx, loss_fn=_masked_loss(graphdef), state_sharding=state_sharding,
        batch_sharding=batch_sharding,
    )  # fmt: skip
    plain = make_train_step(None, tx, loss_fn=_masked_loss(graphdef))
    batch = _masked_batch()
    scale = jax.device_put(jnp.float32(1.0), NamedSharding(mesh, P()))
    expected, m_plain = plain(jax.tree.map(jnp.copy, state), batch, jnp.float32(1.0))
    sharded = jax.device_put(jax.tree.map(jnp.copy, state), state_sharding)
    lowered = step.lower(sharded, jax.device_put(batch, batch_sharding), scale)
    assert lowered.compile().input_shardings[0][2] == scale.sharding
    after, metrics = step(sharded, jax.device_put(batch, batch_sharding), scale)
    assert float(metrics["loss"]) == pytest.approx(float(m_plain["loss"]), rel=1e-5)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, after.params, expected.params)
    assert after.params["lm_head"]["kernel"].sharding == NamedSharding(mesh, P())


def test_a_custom_loss_is_refused_by_the_layerwise_step():
    graphdef, _ = _setup(optax.adamw(1e-3))
    with pytest.raises(ValueError, match="layerwise=True runs .* not loss_fn"):
        make_train_step(graphdef, optax.adamw(1e-3), layerwise=True,
                        loss_fn=_masked_loss(graphdef))  # fmt: skip


def test_a_custom_loss_trains_layer_by_layer_like_the_ordinary_step():
    """``layerwise_loss(batch) -> (inputs, loss_of_logits)``: the layer-wise step with a
    masked (fine-tuning) loss follows the ordinary step with the same loss as ``loss_fn``."""
    config = get_config("llama_tiny", vocab_size=40, num_layers=2, scan_layers=True)
    model = Llama(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = lr.galore_adamw(1e-2, rank=4, update_proj_gap=2)
    batch = _masked_batch()

    def layerwise_loss(batch):
        def loss(logits):
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
            mask = batch["mask"].astype(jnp.float32)
            return jnp.sum(nll * mask) / jnp.sum(mask)

        return (batch["tokens"][:, :-1],), loss

    ordinary = make_train_step(None, tx, loss_fn=_masked_loss(graphdef))
    by_layer = make_train_step(graphdef, tx, layerwise=True, layerwise_loss=layerwise_loss)
    states = [TrainState(jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params))
              for _ in range(2)]  # fmt: skip
    for _ in range(3):
        states[0], m0 = ordinary(states[0], batch, jnp.float32(1.0))
        states[1], m1 = by_layer(states[1], batch)
        assert float(m1["loss"]) == pytest.approx(float(m0["loss"]), rel=1e-5)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    jax.tree.map(close, states[1].params, states[0].params)
    with pytest.raises(ValueError, match="layerwise_loss goes with layerwise=True"):
        make_train_step(graphdef, tx, layerwise_loss=layerwise_loss)
