"""Mixtures of LoRA experts: one expert is plain LoRA, k = all is the dense mixture, SMoRA with
equal scores is LoRA, MoLA's layer counts, MeteoRA's gate loss, X-LoRA's two passes, balance
loss, jit/grad, save/load and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from lowrank_jax import reparam as R

from .conftest import ZEROS, filled, normal


class Net(nnx.Module):
    def __init__(self, layers=2, width=8):
        rngs = nnx.Rngs(0)
        self.layers = nnx.List(
            [nnx.Linear(width, width, rngs=rngs, **ZEROS) for _ in range(layers)]
        )
        self.lm_head = nnx.Linear(width, 5, rngs=rngs, **ZEROS)

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.lm_head(x)


def net(layers=2):
    return filled(Net(layers), seed=3)


X = normal(7, (2, 5, 8))


def set_experts(layer, seed, scale=0.5):
    layer.lora_a[...] = normal(seed, layer.lora_a.shape, scale)
    layer.lora_b[...] = normal(seed + 1, layer.lora_b.shape, scale)


def mixture(layer, x, gates):
    """The reference: base + s Σ_e g_e (x A_e) B_e."""
    a, b = layer.lora_a[...], layer.lora_b[...]
    terms = jnp.einsum("...i,eir,ero->...eo", x, a, b)
    return layer.base(x) + layer.expert_scale * jnp.einsum("...e,...eo->...o", gates, terms)


def test_one_expert_is_plain_lora():
    plain, routed = net(1), net(1)
    lora = R.wrap(plain, R.lora(rank=3, alpha=6, targets=r"layers/0"), key=jax.random.key(0))
    routed = R.wrap_experts(
        routed, R.Routing(num_experts=1, rank=3, alpha=6, top_k=1), targets=r"layers/0",
        rngs=nnx.Rngs(1),
    )  # fmt: skip
    layer = R.routed_layers(routed)[0]
    set_experts(layer, 0)
    lora.layers[0].adapter["A"][...] = layer.lora_a[0]
    lora.layers[0].adapter["B"][...] = layer.lora_b[0]
    np.testing.assert_allclose(routed(X), lora(X), atol=1e-6)


def test_top_k_of_all_experts_is_the_dense_softmax_mixture():
    model = R.wrap_experts(net(1), R.Routing(num_experts=3, rank=2, top_k=3),
                           targets=r"layers/0", rngs=nnx.Rngs(1))  # fmt: skip
    layer = R.routed_layers(model)[0]
    set_experts(layer, 0)
    probs = jax.nn.softmax(X @ layer.router[...], axis=-1)
    np.testing.assert_allclose(layer(X), mixture(layer, X, probs), atol=1e-5)
    # top-2 of 3: two non-zero gates per token, renormalised to sum 1
    top2 = R.wrap_experts(net(1), R.Routing(num_experts=3, rank=2, top_k=2),
                          targets=r"layers/0", rngs=nnx.Rngs(1))  # fmt: skip
    gates = R.routed_layers(top2)[0].gates(X)[0]
    assert np.all(np.sum(gates > 0, -1) == 2)
    np.testing.assert_allclose(jnp.sum(gates, -1), 1.0, atol=1e-6)


def test_smora_with_equal_scores_is_lora_of_the_full_rank():
    model = R.wrap_experts(net(1), R.smora(rank=4, top_k=4, alpha=8), targets=r"layers/0",
                           rngs=nnx.Rngs(1))  # fmt: skip
    layer = R.routed_layers(model)[0]
    set_experts(layer, 0)
    layer.router[...] = jnp.zeros_like(layer.router[...])  # σ(0) = 1/2 for every rank: g = 1
    a = jnp.moveaxis(layer.lora_a[...], 0, -1)[..., 0, :]  # (in, r)
    b = layer.lora_b[...][:, 0, :]  # (r, out)
    np.testing.assert_allclose(layer(X), layer.base(X) + 8 / 4 * (X @ a) @ b, atol=1e-5)


def test_smora_bias_moves_toward_balance_in_training_only():
    model = R.wrap_experts(net(1), R.smora(rank=4, top_k=1, bias_update_rate=0.1),
                           targets=r"layers/0", rngs=nnx.Rngs(1))  # fmt: skip
    layer = R.routed_layers(model)[0]
    layer.router[...] = jnp.zeros_like(layer.router[...]).at[:, 2].set(1.0)
    x = jnp.abs(X)  # every token prefers rank 2
    nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(layer.bias[...], [0.1, 0.1, -0.1, 0.1])
    model.eval()
    nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(layer.bias[...], [0.1, 0.1, -0.1, 0.1])


def test_mola_gives_higher_layers_more_experts():
    model = R.wrap_experts(net(4), R.mola(experts=(2, 4, 6, 8), num_layers=4, rank=2),
                           targets=r"layers/", rngs=nnx.Rngs(1))  # fmt: skip
    layers = R.routed_layers(model)
    assert [n.routing.num_experts for n in layers] == [2, 4, 6, 8]
    assert all(n.routing.top_k == 2 for n in layers)
    assert R.mola(experts=(2, 8), num_layers=4).routings[1].num_experts == 2


def test_balance_loss_is_one_when_balanced_and_larger_when_collapsed():
    model = R.wrap_experts(net(1), R.Routing(num_experts=4, rank=2, top_k=1),
                           targets=r"layers/0", rngs=nnx.Rngs(1))  # fmt: skip
    layer = R.routed_layers(model)[0]
    layer.router[...] = jnp.zeros_like(layer.router[...]).at[:, 1].set(10.0)
    with R.collect_routing() as records:
        model(jnp.abs(X))
    assert records[0].load.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert float(records.balance_loss()) == pytest.approx(4.0, abs=1e-3)
    dense = R.wrap_experts(net(1), R.Routing(num_experts=4, rank=2), targets=r"layers/0",
                           rngs=nnx.Rngs(1))  # fmt: skip
    R.routed_layers(dense)[0].router[...] = jnp.zeros((8, 4))
    with R.collect_routing() as records:
        dense(X)
    assert float(records.balance_loss()) == pytest.approx(1.0, abs=1e-6)


def test_meteora_gate_loss_is_the_routers_cross_entropy():
    model = R.wrap_experts(net(2), R.meteora(num_tasks=3, rank=2), targets=r"layers/",
                           rngs=nnx.Rngs(1))  # fmt: skip
    labels = jnp.array([2, 0])
    with R.collect_routing() as records:
        model(X)
    manual = np.mean([
        optax.softmax_cross_entropy_with_integer_labels(
            X_in @ n.router[...], jnp.broadcast_to(labels[:, None], (2, 5))
        ).mean()
        for n, X_in in zip(R.routed_layers(model), _inputs(model, X))
    ])  # fmt: skip
    assert float(R.gate_loss(records, labels)) == pytest.approx(float(manual), rel=1e-5)


def _inputs(model, x):
    out = []
    for layer in model.layers:
        out.append(x)
        x = jnp.tanh(layer(x))
    return out


def xlora_model(ranks=(2, 3, 1), **kw):
    base = net(2)
    params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    experts = []
    for k, r in enumerate(ranks):
        _, ad = R.lora(rank=r, alpha=2 * r, targets=r"layers/").init(jax.random.key(k), params)
        experts.append(_moved(ad, 10 * k))
    wrapped = R.wrap_experts(base, R.xlora(len(ranks), **kw), experts=experts)
    return R.XLoRA(wrapped, hidden_size=8, rngs=nnx.Rngs(5)), experts, params


def _moved(adapters, seed):
    leaves, treedef = jax.tree.flatten(adapters.trainable)
    new = [x + normal(seed + i, x.shape, 0.4) for i, x in enumerate(leaves)]
    return adapters.replace(trainable=jax.tree.unflatten(treedef, new))


def plain_forward(params, x):
    model = nnx.merge(nnx.graphdef(Net(2)), nnx.state(Net(2)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model(x), model


def test_xlora_scaling_pass_is_the_base_model_and_one_hot_heads_pick_an_expert():
    model, experts, params = xlora_model()
    want, base = plain_forward(params, X)
    hidden = model.hidden(X)
    h = X
    for layer in base.layers:
        h = jnp.tanh(layer(h))
    np.testing.assert_allclose(hidden, h, atol=1e-6)  # experts off in the scaling pass
    for k in range(3):  # a head that always picks expert k gives that adapter's model
        model.head[0].kernel[...] = jnp.zeros((8, 3))
        model.head[0].bias[...] = jnp.zeros(3).at[k].set(100.0)
        got = model(X)
        np.testing.assert_allclose(got, plain_forward(R.apply(params, experts[k]), X)[0], atol=1e-5)
    assert model.num_layers == 2 and model.scalings(hidden).shape == (2, 5, 2, 3)


def test_xlora_layerwise_top_k_and_training_only_the_head():
    model, _, _ = xlora_model(top_k=2, softmax_topk=True)
    model = R.XLoRA(model.model, hidden_size=8, layerwise=True, depth=2, size=16, dropout=0.0,
                    rngs=nnx.Rngs(6))  # fmt: skip
    assert model.scalings(X).shape == (2, 5, 2, 3)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    assert len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == 4  # two head layers

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam)
        )(model)
        optimizer.update(model, grads)
        return loss

    experts_before = R.routed_layers(model)[0].lora_a[...]
    losses = [float(step(model, optimizer, X)) for _ in range(5)]
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(R.routed_layers(model)[0].lora_a[...], experts_before)


def test_routed_model_jits_trains_and_round_trips(tmp_path):
    model = R.wrap_experts(net(2), R.mola(experts=(2, 3), rank=2), targets=r"layers/",
                           rngs=nnx.Rngs(1))  # fmt: skip
    for i, layer in enumerate(R.routed_layers(model)):
        set_experts(layer, 10 * i, 0.1)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, x):
        def loss_fn(m):
            with R.collect_routing() as records:
                y = m(x)
            return jnp.mean((y - 1.0) ** 2) + 0.01 * records.balance_loss()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    eager = model(X)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, X), eager, atol=1e-6)
    losses = [float(step(model, optimizer, X)) for _ in range(5)]
    assert losses[-1] < losses[0]
    state = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "experts", state)
    fresh = R.wrap_experts(net(2), R.mola(experts=(2, 3), rank=2), targets=r"layers/",
                           rngs=nnx.Rngs(9))  # fmt: skip
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "experts", state)
    target = nnx.state(fresh, nnx.LoRAParam)
    nnx.replace_by_pure_dict(target, restored)
    nnx.update(fresh, target)
    np.testing.assert_allclose(fresh(X), model(X), atol=1e-6)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="top_k=5 must be in"):
        R.Routing(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="rank_experts needs num_experts == rank"):
        R.Routing(num_experts=3, rank=4, rank_experts=True)
    with pytest.raises(ValueError, match="gating must be one of"):
        R.Routing(gating="hash")

    class Mixed(nnx.Module):
        def __init__(self):
            self.proj = nnx.Einsum("bi,io->bo", (8, 4), rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match="'proj/kernel' belongs to a Einsum"):
        R.wrap_experts(Mixed(), R.Routing(num_experts=2, rank=2), rngs=nnx.Rngs(0))
    model, experts, params = xlora_model()
    with pytest.raises(ValueError, match="call the model through reparam.XLoRA"):
        model.model(X)
    with pytest.raises(ValueError, match="no X-LoRA layers"):
        R.XLoRA(net(1), hidden_size=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden_from='head'"):
        R.XLoRA(model.model, hidden_size=8, hidden_from="head", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="do not cover"):
        R.wrap_experts(net(2), R.xlora(3), experts=experts, targets=r"layers/|lm_head")
    with pytest.raises(ValueError, match="no layer index < 2"):
        R.wrap_experts(net(4), R.mola(experts=(2, 4)), targets=r"layers/", rngs=nnx.Rngs(0))


def test_xlora_on_the_library_llama_sees_batch_and_sequence_axes():
    """Our Llama's head takes the [batch, seq, hidden] state (its Linear flattens the tokens
    itself), so X-LoRA's hidden-state tap gives per-token scalings of the right shape. Fails
    when the model flattens before the head: the scalings come out [batch*seq, ...] and do not
    broadcast against the routed layers' [batch, seq, ...] inputs."""
    from lowrank_jax.models import Llama, get_config

    config = get_config("llama_tiny", vocab_size=61, hidden_size=16, intermediate_size=32,
                        num_heads=2, num_kv_heads=2, num_layers=2)  # fmt: skip
    base = Llama(config, rngs=nnx.Rngs(0))
    wrapped = R.wrap_experts(base, R.xlora(2), targets=r"attn/(q|v)_proj", rngs=nnx.Rngs(1))
    model = R.XLoRA(wrapped, hidden_size=16, rngs=nnx.Rngs(2))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)), jnp.int32)
    assert model.hidden(tokens).shape == (2, 9, 16)
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert logits.shape == (2, 9, 61) and bool(jnp.all(jnp.isfinite(logits)))
