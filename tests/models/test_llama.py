"""The NNX LLaMA: paths GaLore targets, configs, causality, scan/remat/dtype, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from lowrank_jax import targets
from lowrank_jax.models import CONFIGS, Llama, get_config

forward = nnx.jit(lambda model, tokens: model(tokens))

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny(**kw):
    kw.setdefault("vocab_size", 61)
    kw.setdefault("num_layers", 2)
    return get_config("llama_tiny", **kw)


def _selected(model):
    state = nnx.state(model, nnx.Param)
    mask = jax.tree.leaves(targets.resolve(None, state))
    return {p for p, s in zip(targets.leaf_paths(state), mask, strict=True) if s}, state


def test_default_galore_targets_are_exactly_the_projections():
    selected, state = _selected(Llama(_tiny(), rngs=nnx.Rngs(0)))
    group = {p: "attn" if p.endswith("_proj") and p[0] in "qkvo" else "mlp" for p in PROJECTIONS}
    expected = {f"layers/{i}/{group[p]}/{p}/kernel" for i in range(2) for p in PROJECTIONS}
    assert selected == expected
    paths = set(targets.leaf_paths(state))
    for path in [
        "embed/embedding",
        "lm_head/kernel",
        "final_norm/scale",
        "layers/1/input_norm/scale",
        "layers/1/post_attn_norm/scale",
    ]:
        assert path in paths
    assert len(paths) == 2 * 9 + 3


def test_scanned_layers_are_stacked_kernels():
    selected, state = _selected(Llama(_tiny(num_layers=3, scan_layers=True), rngs=nnx.Rngs(0)))
    assert selected == {
        f"layers/{'attn' if p[0] in 'qkvo' else 'mlp'}/{p}/kernel" for p in PROJECTIONS
    }
    shapes = {p: np.shape(x) for p, x in zip(targets.leaf_paths(state), jax.tree.leaves(state))}
    assert shapes["layers/attn/q_proj/kernel"] == (3, 128, 128)
    assert shapes["layers/mlp/down_proj/kernel"] == (3, 344, 128)
    assert shapes["layers/input_norm/scale"] == (3, 128)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_count_their_parameters(name):
    config = get_config(name)
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == config.num_params()


def test_paper_configs_match_galore_reference():
    shapes = {
        k: (c.hidden_size, c.intermediate_size, c.num_heads, c.num_layers)
        for k, c in CONFIGS.items()
    }
    assert shapes["llama_60m"] == (512, 1376, 8, 8)
    assert shapes["llama_130m"] == (768, 2048, 12, 12)
    assert shapes["llama_350m"] == (1024, 2736, 16, 24)
    assert shapes["llama_1b"] == (2048, 5461, 32, 24)
    assert shapes["llama_7b"] == (4096, 11008, 32, 32)
    assert all(c.vocab_size == 32000 and c.rms_norm_eps == 1e-6 for c in CONFIGS.values())
    assert 0.8e6 < get_config("llama_tiny", vocab_size=259).num_params() < 1.2e6


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match="llama_tiny, llama_20m, llama_60m"):
        get_config("llama_3b")
    with pytest.raises(ValueError, match="unknown LlamaConfig fields"):
        get_config("llama_tiny", hidden=3)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        get_config("llama_tiny", num_kv_heads=3)


def test_attention_is_causal():
    model = Llama(_tiny(num_kv_heads=2), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 61, (1, 12))
    changed = tokens.copy()
    changed[0, 7:] = (changed[0, 7:] + 1) % 61
    a, b = forward(model, jnp.asarray(tokens)), forward(model, jnp.asarray(changed))
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not np.allclose(a[:, 7:], b[:, 7:], atol=1e-3)


def _loss_and_grads(model, tokens):
    graphdef, state = nnx.split(model)

    def loss(state):
        logits = nnx.merge(graphdef, state)(tokens).astype(jnp.float32)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.jit(jax.value_and_grad(loss))(state)


def test_scan_and_remat_compute_the_same_function():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 10)))
    loop = Llama(_tiny(num_layers=3), rngs=nnx.Rngs(0))
    scanned = Llama(_tiny(num_layers=3, scan_layers=True, remat=True), rngs=nnx.Rngs(0))
    # Give the scanned model the loop model's weights, stacked.
    params = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
    layers = params.pop("layers")
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in range(3)])
    nnx.update(scanned, params)
    loss_a, grads_a = _loss_and_grads(loop, tokens)
    loss_b, grads_b = _loss_and_grads(scanned, tokens)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    ga = nnx.to_pure_dict(grads_a)
    gb = nnx.to_pure_dict(grads_b)
    np.testing.assert_allclose(
        np.stack([ga["layers"][i]["mlp"]["up_proj"]["kernel"] for i in range(3)]),
        gb["layers"]["mlp"]["up_proj"]["kernel"],
        atol=1e-6,
    )
    np.testing.assert_allclose(ga["embed"]["embedding"], gb["embed"]["embedding"], atol=1e-6)


def test_bfloat16_params_and_compute():
    model = Llama(_tiny(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype(jnp.bfloat16)}
    logits = forward(model, jnp.zeros((1, 5), jnp.int32))
    assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))


def test_tied_embeddings_have_no_head():
    tied = Llama(_tiny(tie_embeddings=True), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(tied, nnx.Param))
    assert "lm_head" not in params
    untied = Llama(_tiny(), rngs=nnx.Rngs(1))
    params["lm_head"] = {"kernel": params["embed"]["embedding"].T}
    nnx.update(untied, params)
    tokens = jnp.array([[1, 2, 3]])
    np.testing.assert_allclose(forward(tied, tokens), forward(untied, tokens), atol=1e-5)


def test_sharding_metadata_and_sharded_creation():
    model = Llama(_tiny(scan_layers=True), rngs=nnx.Rngs(0))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    assert specs["layers"]["attn"]["q_proj"]["kernel"] == PartitionSpec(None, "fsdp", "tensor")
    assert specs["layers"]["mlp"]["down_proj"]["kernel"] == PartitionSpec(None, "tensor", "fsdp")
    assert specs["embed"]["embedding"] == PartitionSpec("tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == PartitionSpec("fsdp", "tensor")

    if jax.device_count() < 8:
        pytest.fail("conftest should provide 8 simulated CPU devices")
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        sharded = nnx.jit(lambda: Llama(_tiny(vocab_size=64), rngs=nnx.Rngs(0)))()
        kernel = sharded.layers[0].attn.q_proj.kernel[...]
        assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
        assert len(kernel.addressable_shards) == 8
        logits = nnx.jit(lambda m, t: m(t))(sharded, jnp.zeros((2, 6), jnp.int32))
    assert logits.shape == (2, 6, 64)


def test_linear_on_token_matrix_is_nnx_linear():
    """layers.Linear merges the leading axes before the product: the same values and gradients
    as nnx.Linear, with fewer copies in the compiled weight gradient (XLA:CPU transposes ``dy``
    for a contraction over two axes)."""
    from lowrank_jax.models.layers import Linear

    ours = Linear(12, 7, use_bias=True, rngs=nnx.Rngs(0))
    plain = nnx.Linear(12, 7, use_bias=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 5, 12))
    np.testing.assert_allclose(ours(x), plain(x), rtol=1e-6, atol=1e-6)
    assert ours(x[0, 0]).shape == (7,)

    def grad_fn(layer):
        graph, params = nnx.split(layer, nnx.Param)
        fn = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(graph, p)(x) ** 2)))
        return fn, params

    def copies(layer):
        fn, params = grad_fn(layer)
        names = [
            line.split("=")[0] for line in fn.lower(params, x).compile().as_text().splitlines()
        ]
        return sum(("%copy" in n or "%transpose" in n) for n in names)

    (f_ours, p_ours), (f_plain, p_plain) = grad_fn(ours), grad_fn(plain)
    for g_ours, g_plain in zip(
        jax.tree.leaves(f_ours(p_ours, x)), jax.tree.leaves(f_plain(p_plain, x))
    ):
        np.testing.assert_allclose(g_ours, g_plain, rtol=1e-5, atol=1e-5)
    if jax.devices()[0].platform == "cpu":
        assert copies(ours) < copies(plain)
