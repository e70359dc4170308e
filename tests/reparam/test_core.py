"""The shared machinery: no-op at init, parameter counts, gradients, merge/unmerge, layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import reparam as R
from lowrank_jax.reparam.dora import column_norm
from lowrank_jax.reparam.method import normal as method_normal
from lowrank_jax.reparam.method import uniform
from lowrank_jax.targets import MatrixDims

from .conftest import METHODS, ZEROS, filled, normal, perturb, tree

TARGETED = {"layers/attn/q_proj/kernel": (1, 8, 12), "layers/mlp/up/kernel": (3, 8, 16)}


def kernels(p):
    return [p["layers"]["attn"]["q_proj"]["kernel"], p["layers"]["mlp"]["up"]["kernel"]]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_noop_at_init_counts_and_effect(name, params, key):
    factory, formula = METHODS[name]
    base, adapters = factory().init(key, params)
    # Every additive method is a no-op at init; residual inits (PiSSA, OLoRA) subtract their
    # start from the base, so they are equal within float32 round-off.
    out = R.apply(base, adapters)
    for got, want in zip(kernels(out), kernels(params)):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    np.testing.assert_array_equal(out["head"]["kernel"], params["head"]["kernel"])
    # Default targets skip the embedding, the norm and the head; the count is the paper's.
    assert set(adapters.paths) == set(TARGETED)
    assert R.num_trainable(adapters) == sum(formula(*shape) for shape in TARGETED.values())
    # Once trained, the adapters do change every targeted matrix.
    out = R.apply(base, perturb(adapters))
    for got, want in zip(kernels(out), kernels(params)):
        assert float(jnp.max(jnp.abs(got - want))) > 1e-3


@pytest.mark.parametrize("name", ["lora", "dora", "lora_xs", "vera"])
def test_gradients_reach_only_trainable_leaves(name, params, key):
    rp = METHODS[name][0]()
    base, adapters = rp.init(key, params)
    x = normal(5, (5, 8))

    def loss(trainable):
        p = R.apply(base, adapters.replace(trainable=trainable))
        kernels = p["layers"]["attn"]["q_proj"]["kernel"], p["layers"]["mlp"]["up"]["kernel"]
        return sum(jnp.sum(jnp.tanh(x @ k) ** 2) for k in kernels)

    # Differentiate the trainable leaves only: the base and the frozen factors are constants.
    grads = jax.jit(jax.grad(loss))(perturb(adapters).trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters.trainable)
    for path, leaves in grads.items():  # every trainable leaf of every site is reached
        for name, g in leaves.items():
            assert float(jnp.abs(g).sum()) > 0, (path, name)


def test_trainable_mask_freezes_frozen_leaves_in_optax(params, key):
    base, adapters = R.lora_xs(4).init(key, params)
    mask = R.trainable_mask(adapters)
    assert jax.tree.leaves(mask.trainable) and all(jax.tree.leaves(mask.trainable))
    assert not any(jax.tree.leaves(mask.frozen))
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    tx = optax.multi_transform({"train": optax.sgd(0.1), "freeze": optax.set_to_zero()}, labels)
    loss = lambda a: jnp.sum(R.apply(base, a)["layers"]["attn"]["q_proj"]["kernel"] ** 2)
    grads = jax.grad(loss)(adapters)
    updates, _ = tx.update(grads, tx.init(adapters))
    new = optax.apply_updates(adapters, updates)
    jax.tree.map(np.testing.assert_array_equal, new.frozen, adapters.frozen)
    assert float(jnp.abs(new.trainable["layers/attn/q_proj/kernel"]["R"]).sum()) > 0


def test_dora_norm_comes_from_the_factors_and_is_detached(key):
    w = normal(6, (2, 8, 6))
    a = normal(7, (2, 8, 3))
    b = normal(8, (2, 3, 6))
    direct = jnp.linalg.norm(w + 0.7 * a @ b, axis=-2)
    np.testing.assert_allclose(column_norm(w, a, b, 0.7), direct, rtol=1e-5)

    params = {"w": w[0]}
    _, adapters = R.dora(3, 2.1).init(key, params)
    adapters = perturb(adapters)

    def loss(t):
        return jnp.sum(R.apply(params, adapters.replace(trainable=t))["w"] ** 3)

    def loss_constant_norm(t):  # the paper's §4.3: the norm is a constant in backprop
        ta = adapters.trainable["w"]
        norm = jnp.linalg.norm(params["w"] + 0.7 * ta["A"] @ ta["B"], axis=0)
        v = params["w"] + 0.7 * t["w"]["A"] @ t["w"]["B"]
        return jnp.sum((t["w"]["magnitude"] * v / norm) ** 3)

    grad, grad_constant_norm = jax.jit(jax.grad(loss)), jax.jit(jax.grad(loss_constant_norm))
    got, want = grad(adapters.trainable), grad_constant_norm(adapters.trainable)
    jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, rtol=2e-4, atol=1e-5), got, want)


def many_adapters(params, key):
    """Two DoRA adapters (one PiSSA-started), a LoRA and a VeRA on the same base."""
    keys = jax.random.split(key, 8)
    out = {}
    for i, (name, rp) in enumerate(
        {"d1": R.dora(4), "d2": R.dora(2, 3.0), "l": R.lora(4, 8), "v": R.vera(6)}.items()
    ):
        _, a = rp.init(keys[i], params)
        out[name] = perturb(a, seed=10 * i)
    return out


def test_merge_unmerge_float32_several_dora(params, key):
    adapters = many_adapters(params, key)
    weights = {"d1": 1.0, "d2": 0.5, "l": -0.7, "v": 1.3}
    merged, record = R.merge(params, adapters, weights=weights)
    # The merged weights are the adapted forward's weights (peft#3608: several DoRA adapters).
    applied = R.apply(params, adapters, weights=weights)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), merged, applied)
    back = R.unmerge(merged, adapters, record)
    for got, want in zip(kernels(back), kernels(params)):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert float(jnp.max(jnp.abs(kernels(merged)[0] - kernels(params)[0]))) > 1e-2


def test_merge_unmerge_bfloat16_base(key):
    params = tree(key, jnp.bfloat16)
    adapters = many_adapters(params, key)
    merged, record = R.merge(params, adapters)
    assert kernels(merged)[0].dtype == jnp.bfloat16
    back = R.unmerge(merged, adapters, record)
    for got, want, m in zip(kernels(back), kernels(params), kernels(merged)):
        got, want, m = (x.astype(jnp.float32) for x in (got, want, m))
        # One bf16 rounding of the merged weight, carried back: 2 ulps at the tensor's scale.
        ulp = 2.0**-7 * float(jnp.maximum(jnp.abs(m).max(), jnp.abs(want).max()))
        np.testing.assert_allclose(got, want, atol=ulp, rtol=0)
        assert float(jnp.max(jnp.abs(m - want))) > 10 * ulp  # the merge did change the weights


def test_stacked_kernels_get_one_adapter_per_matrix(params, key):
    base, adapters = R.lora(4, 8).init(key, params)
    adapters = perturb(adapters)
    up = "layers/mlp/up/kernel"
    a, b = adapters.trainable[up]["A"], adapters.trainable[up]["B"]
    assert a.shape == (3, 8, 4) and b.shape == (3, 4, 16)
    out = R.apply(base, adapters)["layers"]["mlp"]["up"]["kernel"]
    for layer in range(3):
        want = params["layers"]["mlp"]["up"]["kernel"][layer] + 2.0 * a[layer] @ b[layer]
        np.testing.assert_allclose(out[layer], want, atol=1e-5)


def test_pytorch_layout_via_dims(key):
    w = normal(9, (12, 8))  # (out, in)
    rp = R.dora(3, dims=MatrixDims(in_axis=-1, out_axis=-2))
    _, adapters = rp.init(key, {"w": w})
    _, flax_adapters = R.dora(3).init(key, {"w": w.T})
    adapters = perturb(adapters)
    flax_adapters = flax_adapters.replace(trainable=adapters.trainable)
    got = R.apply({"w": w}, adapters)["w"]
    want = R.apply({"w": w.T}, flax_adapters)["w"].T
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert adapters.trainable["w"]["A"].shape == (8, 3)  # canonical (in, r) whatever the layout


def test_rank_and_alpha_patterns(params, key):
    rp = R.lora(4, 8, rank_pattern={"q_proj": 2}, alpha_pattern={"up": 2.0})
    _, adapters = rp.init(key, params)
    q, up = (adapters.trainable[p] for p in TARGETED)
    assert q["A"].shape == (8, 2) and up["A"].shape == (3, 8, 4)
    sites = {s.path: s.method for s in adapters.sites}
    assert sites["layers/attn/q_proj/kernel"].scale == 4.0  # alpha 8 / rank 2
    assert sites["layers/mlp/up/kernel"].scale == 0.5  # alpha 2 / rank 4
    assert R.lora(4, 8, rslora=True).method.scale == 4.0  # 8 / sqrt(4)


def test_works_on_nnx_state(key):
    from flax import nnx

    layer = filled(nnx.Linear(6, 5, rngs=nnx.Rngs(0), **ZEROS))
    before = np.asarray(layer.kernel[...])
    state = nnx.state(layer, nnx.Param)
    base, adapters = R.lora(2).init(key, state)
    assert adapters.paths == ("kernel",)  # NNX's trailing `.value` is not part of the path
    adapters = perturb(adapters)
    out = R.apply(base, adapters)
    assert isinstance(out, nnx.State)
    nnx.update(layer, out)
    a, b = adapters.trainable["kernel"]["A"], adapters.trainable["kernel"]["B"]
    np.testing.assert_allclose(layer.kernel[...], before + a @ b, atol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: R.lora(9, targets="q_proj").init(jax.random.key(0), p), "rank=9 does not fit"),
        (lambda p: R.lora(2, targets="nothing").init(jax.random.key(0), p), "'nothing' matches no"),
        (lambda p: R.lora(2, targets=["q_proj", "k_proj"]).init(jax.random.key(0), p), "'k_proj'"),
        (lambda p: R.lora(2, targets="norm").init(jax.random.key(0), p), "'norm' matches no float"),
        (
            lambda p: R.lora(2, targets=lambda path, _: path == "step").init(jax.random.key(0), p),
            "'step' has dtype int32; only floating-point",
        ),
        (
            lambda p: R.lora(2, targets=lambda path, _: "norm" in path).init(jax.random.key(0), p),
            "needs a matrix",
        ),
        (lambda p: R.lora(2, rank_pattern={"zz": 1}).init(jax.random.key(0), p), "'zz'"),
        (lambda p: R.diablo(3).init(jax.random.key(0), p), "must divide"),
        (lambda p: R.loraga(2).init(jax.random.key(0), p), "pass calibration"),
    ],
)
def test_errors_name_the_leaf_and_the_fix(make, match, params):
    params = {**params, "step": jnp.zeros((2, 2), jnp.int32)}
    with pytest.raises(ValueError, match=match):
        make(params)


def test_adapter_base_mismatch_is_an_error(params, key):
    _, adapters = R.lora(2).init(key, params)
    other = {**params, "head": {"kernel": jnp.ones((16, 8))}}
    other["layers"] = {**params["layers"], "attn": {"q_proj": {"kernel": jnp.ones((8, 10))}}}
    with pytest.raises(ValueError, match="q_proj/kernel.*shape"):
        R.apply(other, adapters)
    with pytest.raises(ValueError, match="no such leaf"):
        R.apply({"head": params["head"]}, adapters)


def test_apply_under_jit_and_vmap_free_batch(params, key):
    base, adapters = R.dora(4).init(key, params)
    adapters = perturb(adapters)
    got = jax.jit(R.apply)(base, adapters)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, R.apply(base, adapters)
    )


def test_flat_random_draws_equal_shaped_draws(key):
    # method.uniform / normal draw flat (cheaper to compile); the values must not change.
    shape = (6, 4)
    want = jax.random.uniform(key, shape, minval=-2.0, maxval=2.0)
    np.testing.assert_array_equal(uniform(key, shape, 2.0), want)
    np.testing.assert_array_equal(method_normal(key, shape), jax.random.normal(key, shape))


def test_seeded_bases_are_per_matrix_or_shared(key):
    params = {"a": jnp.ones((8, 6)), "b": jnp.ones((8, 6))}
    for shared in (False, True):
        _, adapters = R.nola(2, num_a=3, num_b=3, shared=shared).init(key, params)
        seeds = [np.asarray(adapters.frozen[p]["seed"]) for p in ("a", "b")]
        assert np.array_equal(*seeds) == shared
    _, adapters = R.vera(4).init(key, params)  # VeRA: one set of bases for every layer
    np.testing.assert_array_equal(adapters.frozen["a"]["seed"], adapters.frozen["b"]["seed"])
