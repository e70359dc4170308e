"""The NNX fast path: adapted layers equal the functional apply, train only the adapters, and
never build ΔW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowrank_jax import reparam as R
from lowrank_jax.targets import MatrixDims

from .conftest import ZEROS, filled, normal, perturb


class Net(nnx.Module):
    def __init__(self, rngs, d=8):
        self.q_proj = nnx.Linear(d, 12, rngs=rngs, **ZEROS)
        self.heads = nnx.Einsum("btd,dhk->bthk", (d, 2, 4), (2, 4), rngs=rngs, **ZEROS)
        self.mix = nnx.Einsum("bthk,hkd->bthd", (2, 4, d), rngs=rngs, **ZEROS)  # h: shared batch

    def __call__(self, x):
        return self.q_proj(x).sum(-1) + self.mix(self.heads(x)).sum((-1, -2))


def make_net():
    return filled(Net(nnx.Rngs(0)))


# The heads kernel (d, h, k): in = d, out = k, h a batch axis of the output.
DIMS = lambda path, leaf: MatrixDims(0, 2) if path.startswith("heads") else MatrixDims()
X = normal(3, (2, 5, 8))
# LoRA and DoRA on all three layers; the others (same einsum plumbing) on two.
TWO = "q_proj|mix"
FACTORIES = {
    "lora": lambda: R.lora(2, 4, dims=DIMS),
    "dora": lambda: R.dora(2, dims=DIMS),
    "lora_xs": lambda: R.lora_xs(2, dims=DIMS, targets=TWO),
    "vera": lambda: R.vera(3, dims=DIMS, targets=TWO),
    "nola": lambda: R.nola(2, num_a=3, num_b=4, dims=DIMS, targets=TWO),
    "diablo": lambda: R.diablo(2, dims=DIMS, targets=TWO),
}


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_params(model, params):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_wrapped_forward_equals_the_functional_apply(name, key):
    net = make_net()
    base_out, base = net(X), params_of(net)
    wrapped = R.wrap(net, FACTORIES[name](), key=key)
    np.testing.assert_allclose(wrapped(X), base_out, atol=1e-5)  # a no-op at init
    adapters = perturb(R.adapters_of(wrapped))
    moved = R.wrap(make_net(), adapters)
    want = with_params(make_net(), R.apply(base, adapters))(X)
    np.testing.assert_allclose(moved(X), want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(moved(X) - base_out).max()) > 1e-2
    merged = R.unwrap(moved)  # merge into plain layers
    assert isinstance(merged.q_proj, nnx.Linear)
    np.testing.assert_allclose(merged(X), want, rtol=1e-5, atol=1e-5)


def test_residual_init_updates_the_kernels_in_place(key):
    net = make_net()
    base_out = net(X)
    wrapped = R.wrap(net, R.pissa(2, dims=DIMS), key=key)
    np.testing.assert_allclose(wrapped(X), base_out, atol=1e-5)
    q = wrapped.q_proj
    a, b = q.adapter["A"][...], q.adapter["B"][...]
    np.testing.assert_allclose(
        q.base.kernel[...] + a @ b, params_of(make_net())["q_proj"]["kernel"], atol=1e-5
    )


def test_training_with_nnx_optimizer_moves_only_adapters(key):
    model = R.wrap(make_net(), R.dora(2, dims=DIMS), key=key)
    kernels = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean(m(X) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam)
        )(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for path in ("q_proj", "heads", "mix"):
        np.testing.assert_array_equal(
            after[path]["base"]["kernel"], kernels[path]["base"]["kernel"]
        )
        assert not np.allclose(after[path]["adapter"]["B"], kernels[path]["adapter"]["B"])


def test_dropout_applies_to_the_adapter_input_only(key):
    class One(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(4, 6, rngs=rngs, **ZEROS)

    model = R.wrap(filled(One(nnx.Rngs(0))), R.lora(4, dropout=0.5), rngs=nnx.Rngs(0, dropout=1))
    layer = model.proj
    layer.adapter["B"][...] = normal(4, (4, 6))
    x = normal(5, (5, 4)) + 3.0
    a, b, w = (
        np.asarray(v)
        for v in (layer.adapter["A"][...], layer.adapter["B"][...], layer.base.kernel[...])
    )
    base = np.asarray(x @ w + layer.base.bias[...])
    model.train()
    y1, y2 = np.asarray(layer(x)), np.asarray(layer(x))
    assert not np.allclose(y1, y2)  # a fresh dropout mask per call
    # Invert the adapter branch: (y - xW - b) = dropout(x) @ A @ B with A square, B full rank.
    dropped = (y1 - base) @ np.linalg.pinv(b) @ np.linalg.inv(a)
    ratio = np.round(dropped / np.asarray(x), 3)
    assert set(np.unique(ratio)) == {0.0, 2.0}  # kept entries scaled by 1/(1-p); base untouched
    model.eval()
    np.testing.assert_allclose(layer(x), base + np.asarray(x) @ a @ b, atol=1e-4)


def count_dots(jaxpr, shape):
    found = 0
    for eqn in jaxpr.eqns:
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else []:
            found += count_dots(sub, shape)
        if eqn.primitive.name == "dot_general":
            found += any(tuple(v.aval.shape) == shape for v in eqn.outvars)
        for param in eqn.params.values():
            if hasattr(param, "jaxpr"):
                found += count_dots(param.jaxpr, shape)
    return found


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_forward_never_materialises_delta_w(name, key):
    d_in, d_out, tokens = 256, 384, 4

    class Big(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(d_in, d_out, rngs=rngs, **ZEROS)

        def __call__(self, x):
            return self.proj(x)

    x = jnp.ones((tokens, d_in))
    base_model = filled(Big(nnx.Rngs(0)))
    model = R.wrap(filled(Big(nnx.Rngs(0))), FACTORIES[name](), key=key)

    def forward(m):
        graphdef, state = nnx.split(m)
        return lambda s, x: nnx.merge(graphdef, s)(x), state

    f_base, s_base = forward(base_model)
    f_lora, s_lora = forward(model)
    # No matmul produces an (in, out) matrix: ΔW = A@B is never formed.
    assert count_dots(jax.make_jaxpr(f_lora)(s_lora, x).jaxpr, (d_in, d_out)) == 0

    def temp(f, s):
        return jax.jit(f).lower(s, x).compile().memory_analysis().temp_size_in_bytes

    # XLA's scratch memory: the base forward's plus buffers the size of the adapters (A^T W is
    # as big as B) and of the outputs (the low-rank branch); far below one ΔW.
    adapter_bytes = 4 * R.num_trainable(R.adapters_of(model))
    output_bytes = 4 * tokens * d_out
    assert temp(f_lora, s_lora) <= temp(f_base, s_base) + 2 * adapter_bytes + 2 * output_bytes
    assert temp(f_lora, s_lora) < (4 * d_in * d_out) // 10


def test_wrap_errors(key):
    class Odd(nnx.Module):
        def __init__(self, rngs):
            self.table = nnx.Param(jnp.ones((4, 4)))
            self.heads = nnx.Einsum("btd,dhk->bthk", (8, 2, 4), rngs=rngs, **ZEROS)

    with pytest.raises(ValueError, match="not: \\['table'\\]"):
        R.wrap(Odd(nnx.Rngs(0)), R.lora(2, targets="table"), key=key)
    with pytest.raises(ValueError, match="heads/kernel.*in axis 'h'"):
        R.wrap(Odd(nnx.Rngs(0)), R.lora(2, targets="heads"), key=key)  # default dims: wrong axes

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs):
        return nnx.Linear(4, 5, rngs=rngs, **ZEROS)

    class Scanned(nnx.Module):
        def __init__(self):
            self.layers = stacked(nnx.Rngs(0))

    with pytest.raises(ValueError, match="stacked"):
        R.wrap(Scanned(), R.lora(2), key=key)
    with pytest.raises(ValueError, match="dropout=0.1 needs"):
        R.wrap(make_net(), R.lora(2, dropout=0.1, targets="q_proj"), key=key)


def test_collect_inputs_feeds_eva(key):
    net = make_net()
    rp = R.eva(2, dims=DIMS, targets="q_proj|heads|mix")
    cal = rp.calibration(params_of(net))
    inputs = R.collect_inputs(net, lambda m: m(X), cal.sites)
    assert inputs["q_proj/kernel"].shape == (10, 8)  # (tokens, in)
    assert inputs["heads/kernel"].shape == (1, 10, 8)  # one input shared by the 2 heads
    assert inputs["mix/kernel"].shape == (2, 10, 4)  # per head (h is in the input)
    np.testing.assert_allclose(inputs["q_proj/kernel"], X.reshape(10, 8))
    cal.add_activations(inputs)
    wrapped = R.wrap(net, rp, key=key, calibration=cal)
    np.testing.assert_allclose(wrapped(X), make_net()(X), atol=1e-5)
    assert sum(s.method.rank for s in R.adapters_of(wrapped).sites) == 6  # the rank budget


def test_adapters_of_round_trips_through_save(key, tmp_path):
    wrapped = R.wrap(make_net(), R.dora(2, dims=DIMS), key=key)
    adapters = perturb(R.adapters_of(wrapped))
    R.save(str(tmp_path), adapters)
    again = R.wrap(make_net(), R.load(str(tmp_path), params_of(make_net())))
    np.testing.assert_allclose(again(X), R.wrap(make_net(), adapters)(X), atol=0)
