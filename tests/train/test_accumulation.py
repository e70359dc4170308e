"""Gradient accumulation (``accum_steps``): the ordinary and the layer-wise step over ``k``
microbatches follow the one-batch step; the layer-wise one keeps one layer's gradient and one
microbatch's activations; bad input is refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lr
from lowrank_jax import memory
from lowrank_jax.models import Llama, get_config
from lowrank_jax.train import RunConfig, train
from lowrank_jax.train.config import ConfigError
from lowrank_jax.train.step import TrainState, cross_entropy, make_train_step, microbatches
from tests.helpers import losses_on_a_4x2_mesh
from tests.train.runs import TINY
from tests.train.runs import losses as _losses

VOCAB, LAYERS, STEPS, ROWS, K = 64, 2, 6, 4, 2


def tiny(**changes):
    cfg = get_config("llama_tiny", vocab_size=VOCAB, num_layers=LAYERS, scan_layers=True, **changes)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    return nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))


def batches(n=STEPS, rows=ROWS):
    keys = jax.random.split(jax.random.key(2), n)
    return [jax.random.randint(k, (rows, 17), 0, VOCAB) for k in keys]


def run(step, tx, params, data):
    state = TrainState(jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params))
    losses, norms = [], []
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return state, np.asarray(losses), np.asarray(norms)


# SGD shows a wrong scale (a sum for a mean) directly in the parameters; GaLore refreshes its
# projector at steps 0 and 3 from the accumulated gradient; APOLLO scales the full gradient.
METHODS = {
    "sgd": lambda: optax.sgd(0.5),
    "galore_svd": lambda: lr.galore_adamw(1e-2, rank=8, update_proj_gap=3),
    "apollo": lambda: lr.apollo_adamw(1e-2, rank=8, update_proj_gap=3),
}


@pytest.mark.parametrize("layerwise", [False, True], ids=["ordinary", "layerwise"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_accumulated_steps_follow_the_one_batch_step(name, layerwise):
    graphdef, params = tiny()
    tx = METHODS[name]()
    data = batches()
    want, want_losses, want_norms = run(make_train_step(graphdef, tx), tx, params, data)
    step = make_train_step(graphdef, tx, layerwise=layerwise, accum_steps=K)
    got, losses, norms = run(step, tx, params, data)
    # float32 round-off only: the microbatch sums run in another order
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-4)
    atol = 1e-5 if name == "sgd" else 1e-3  # Adam's m / sqrt(v) magnifies round-off ~100x
    for x, y in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=atol * float(jnp.max(jnp.abs(x))))
    assert jax.tree.structure(got.opt_state) == jax.tree.structure(want.opt_state)


def test_microbatches_take_strided_rows_and_refuse_a_remainder():
    batch = jnp.arange(6)[:, None] * jnp.ones((1, 3), jnp.int32)
    micro = microbatches(batch, 3)
    assert micro.shape == (3, 2, 3)
    np.testing.assert_array_equal(micro[:, :, 0], [[0, 3], [1, 4], [2, 5]])
    with pytest.raises(ValueError, match=r"accum_steps=4 must divide the batch size 6"):
        microbatches(batch, 4)


@pytest.mark.parametrize("layerwise", [False, True], ids=["ordinary", "layerwise"])
def test_bad_accum_steps_are_refused(layerwise):
    graphdef, params = tiny()
    tx = optax.sgd(0.1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="accum_steps must be a positive integer"):
            make_train_step(graphdef, tx, layerwise=layerwise, accum_steps=bad)
    step = make_train_step(graphdef, tx, layerwise=layerwise, accum_steps=3)
    state = TrainState(jnp.int32(0), params, tx.init(params))
    with pytest.raises(ValueError, match="accum_steps=3 must divide the batch size 4"):
        step(state, batches(1)[0])


def test_layerwise_accumulation_keeps_one_microbatch_of_activations():
    """Compile only: with 4 microbatches the layer-wise step's temporaries are far below the
    one-batch steps' (whose activations are the whole batch's), and below the ordinary
    accumulating step's (which keeps a whole-model gradient sum)."""
    cfg = dict(hidden_size=128, intermediate_size=344, num_heads=4, num_kv_heads=4)
    graphdef, params = tiny(**cfg)
    tx = lr.galore_adamw(1e-2, rank=16)
    state = jax.eval_shape(lambda: TrainState(jnp.int32(0), params, tx.init(params)))
    batch = jax.ShapeDtypeStruct((16, 257), jnp.int32)

    def temp(**kw):
        return memory.compiled_memory(make_train_step(graphdef, tx, **kw), state, batch).temp_bytes

    one_batch = temp()
    layerwise = temp(layerwise=True)
    ordinary_accumulated = temp(accum_steps=4)
    layerwise_accumulated = temp(layerwise=True, accum_steps=4)
    assert layerwise_accumulated < 0.5 * layerwise, (layerwise_accumulated, layerwise)
    assert layerwise_accumulated < 0.5 * one_batch, (layerwise_accumulated, one_batch)
    assert layerwise_accumulated < ordinary_accumulated, (
        layerwise_accumulated,
        ordinary_accumulated,
    )


@pytest.mark.usefixtures("eight_devices")
def test_layerwise_accumulation_on_a_4x2_mesh_equals_one_device():
    graphdef, params = tiny()
    tx = METHODS["galore_svd"]()
    data = batches(2, rows=8)  # 8 rows: 2 microbatches of 4, one row of each per fsdp device
    _, want, _ = run(make_train_step(graphdef, tx, layerwise=True, accum_steps=K), tx, params,
                     data)  # fmt: skip
    config = get_config("llama_tiny", vocab_size=VOCAB, num_layers=LAYERS, scan_layers=True)
    losses, _, _ = losses_on_a_4x2_mesh(
        graphdef, tx, params, data, config, layerwise=True, accum_steps=K
    )
    np.testing.assert_allclose(losses, want, rtol=1e-4)


def test_accum_steps_in_the_trainer_and_its_errors(tmp_path):
    """``--accum-steps 2`` follows the one-batch run; a resume may change it (it is a memory
    setting, not part of the run's identity) and continues the same trajectory."""
    # AdamW: the trainer's GaLore at its default learning rate moves so fast on this tiny
    # model that an SVD of a round-off-different gradient picks visibly other singular
    # vectors (the step tests above check GaLore's accumulation at a gentler rate)
    common = dict(TINY, optimizer="adamw", scan_layers=True, grad_clip=0.0, steps=4,
                  eval_every=4, checkpoint_every=2)  # fmt: skip
    a, b, c = (str(tmp_path / name) for name in ("plain", "accumulated", "resumed"))
    train(RunConfig(out=a, **common), log=lambda _: None)
    train(RunConfig(out=b, accum_steps=2, layerwise=True, **common), log=lambda _: None)
    want, got = _losses(a), _losses(b)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)],
                               rtol=1e-5)  # fmt: skip
    train(RunConfig(out=c, stop_at=2, **common), log=lambda _: None)
    train(RunConfig(out=c, resume=True, accum_steps=2, **common), log=lambda _: None)
    resumed = _losses(c)
    np.testing.assert_allclose([resumed[k] for k in sorted(resumed)],
                               [want[k] for k in sorted(want)], rtol=1e-5)  # fmt: skip
    with pytest.raises(ConfigError, match="--accum-steps 3 must divide --batch-size 2"):
        RunConfig(**dict(TINY, accum_steps=3)).validate()
    with pytest.raises(ConfigError, match="--accum-steps must be a positive integer"):
        RunConfig(**dict(TINY, accum_steps=0)).validate()


def masked_loss(batch):
    """A fine-tuning ``layerwise_loss``: the next-token loss over the positions ``mask``
    keeps, as ``(total, count)`` so that accumulation weighs microbatches by their count."""

    def loss(logits):
        nll = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["tokens"][:, 1:]
        )
        mask = batch["mask"].astype(jnp.float32)
        return jnp.sum(nll * mask), jnp.sum(mask)

    return (batch["tokens"][:, :-1],), loss


def masked_batches(n=2):
    # microbatch 0 (rows 0, 2) keeps 27 positions, microbatch 1 (rows 1, 3) keeps 3: a mean of
    # the microbatches' means would weigh each of microbatch 1's tokens 9x more
    mask = np.zeros((ROWS, 16), bool)
    mask[0, 2:] = mask[2, 3:] = mask[1, 14:] = mask[3, 15:] = True
    return [{"tokens": t, "mask": jnp.asarray(mask)} for t in batches(n)]


@pytest.mark.parametrize("name", ["sgd", "adamw", "galore"])
def test_layerwise_accumulation_of_a_custom_loss_is_the_whole_batchs_token_mean(name):
    """``layerwise_loss`` returning ``(total, count)`` with ``accum_steps=2``: the same loss
    (the mean over all the batch's kept tokens), gradient norm and parameters as the
    one-batch layer-wise step, though the microbatches keep very different numbers of
    tokens."""
    graphdef, params = tiny()
    # eps=1e-6: Adam's g / (|g| + eps) turns round-off in a near-zero gradient entry into up
    # to ~lr of update; eps bounds that magnification (optax's 1e-8 is below round-off here)
    tx = {"sgd": lambda: optax.sgd(0.5), "adamw": lambda: optax.adamw(1e-2, eps=1e-6),
          "galore": lambda: lr.galore_adamw(1e-2, rank=8, update_proj_gap=1)}[name]()  # fmt: skip
    data = masked_batches()
    results = []
    for k in (1, K):
        step = make_train_step(graphdef, tx, layerwise=True, accum_steps=k,
                               layerwise_loss=masked_loss)  # fmt: skip
        results.append(run(step, tx, params, data))
    (want, want_losses, want_norms), (got, losses, norms) = results
    first = data[0]
    total, count = masked_loss(first)[1](nnx.merge(graphdef, params)(first["tokens"][:, :-1]))
    assert want_losses[0] == pytest.approx(float(total / count), rel=1e-5)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    # Adam's updates are ~lr * g / (|g| + eps): the parameters agree to 1% of lr (a mean of
    # the microbatches' means would move most of them by ~lr)
    atol = 1e-6 if name == "sgd" else 1e-2 * 1e-2
    for x, y in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=atol)


def test_layerwise_accumulation_of_a_mean_loss_weighs_microbatches_equally():
    """A ``layerwise_loss`` that returns the mean (no count): the microbatches' means are
    averaged, which is the whole batch's mean when they keep as many tokens (here: all)."""
    graphdef, params = tiny()
    tx = optax.sgd(0.5)

    def mean_loss(batch):
        return (batch[:, :-1],), lambda logits: cross_entropy(logits, batch[:, 1:])

    data = batches(2)
    want = run(make_train_step(graphdef, tx, layerwise=True), tx, params, data)
    got = run(make_train_step(graphdef, tx, layerwise=True, accum_steps=K,
                              layerwise_loss=mean_loss), tx, params, data)  # fmt: skip
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(want[0].params), jax.tree.leaves(got[0].params), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_layerwise_accumulation_of_a_custom_loss_refuses_a_remainder():
    graphdef, params = tiny()
    tx = optax.sgd(0.1)
    step = make_train_step(graphdef, tx, layerwise=True, accum_steps=3, layerwise_loss=masked_loss)
    state = TrainState(jnp.int32(0), params, tx.init(params))
    with pytest.raises(ValueError, match="accum_steps=3 must divide the batch size 4"):
        step(state, masked_batches(1)[0])
