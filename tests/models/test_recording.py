"""The input-feature norms of every ``Linear`` (OwLore's calibration) through the layers'
``input_hook``: the norms of a class-swap reference, padding left out, stacked layers, the model
untouched outside the block, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.models import (
    Llama,
    get_config,
    input_feature_norms,
    owlore_probabilities,
    record_input_norms,
)
from lowrank_jax.models.layers import Linear
from lowrank_jax.transforms import feature_norms, outlier_scores, owl_probabilities

CONFIG = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_heads=2, num_kv_heads=1,
              num_layers=3)  # fmt: skip
TOKENS = jax.random.randint(jax.random.key(1), (2, 7), 0, 61)
SEGMENTS = jnp.array([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])  # row 0: 2 padding tokens
POSITIONS = jnp.array([[0, 1, 0, 1, 2, 0, 0], [0, 1, 2, 3, 4, 5, 6]])


def _model(**overrides):
    return Llama(get_config("llama_tiny", **{**CONFIG, **overrides}), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model():
    return _model()


def _class_swap_norms(model, tokens, mask):
    """The reference: each Linear's class swapped for a subclass that notes its inputs' norms
    (what experiments/finetune_real.py did before the hook)."""
    keep = jnp.asarray(mask, jnp.float32)
    norms, swapped = {}, []

    def recorder(path, cls):
        class Recording(cls):
            def __call__(self, inputs, out_sharding=None):
                k = keep.reshape(inputs.shape[:-1])[..., None]
                norms[path] = feature_norms(inputs * k.astype(inputs.dtype))
                return super().__call__(inputs, out_sharding)

        return Recording

    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            swapped.append((node, type(node)))
            node.__class__ = recorder("/".join(map(str, path)) + "/kernel", type(node))
    try:
        model(tokens, POSITIONS, SEGMENTS)
    finally:
        for node, cls in swapped:
            node.__class__ = cls
    return {k: np.asarray(v) for k, v in norms.items()}


def test_norms_are_the_class_swap_references(model):
    mask = SEGMENTS > 0
    norms = input_feature_norms(model, TOKENS, POSITIONS, SEGMENTS, mask=mask)
    reference = _class_swap_norms(model, TOKENS, mask)
    assert set(norms) == set(reference)
    assert len(norms) == 7 * 3 + 1  # seven matrices a layer, and the head
    assert "layers/2/mlp/down_proj/kernel" in norms and "lm_head/kernel" in norms
    for path, norm in norms.items():
        assert norm.dtype == np.float32
        np.testing.assert_allclose(norm, reference[path], rtol=0, atol=1e-6, err_msg=path)
    # ... and the head's, by hand: its inputs are the final norm of the last layer's outputs.
    x, context = model.embed_inputs(TOKENS, POSITIONS, SEGMENTS)
    for i, layer in enumerate(model.layers):
        x = model.run_layer(layer, x, context, i)
    h = model.final_norm(x) * mask[..., None]
    by_hand = np.sqrt(np.sum(np.square(np.asarray(h, np.float64)), axis=(0, 1)))
    np.testing.assert_allclose(norms["lm_head/kernel"], by_hand, rtol=1e-6, atol=1e-6)
    # The probabilities are OwLore's of these norms.
    probs, scores = owlore_probabilities(model, TOKENS, POSITIONS, SEGMENTS, mask=mask, m=3.0)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    expected = outlier_scores(params, reference, m=3.0)
    np.testing.assert_array_equal(scores, expected)
    np.testing.assert_array_equal(probs, owl_probabilities(expected))
    assert probs.shape == (3,) and probs.sum() == pytest.approx(1.0)


def test_padding_tokens_do_not_count(model):
    mask = SEGMENTS > 0
    other = TOKENS.at[0, 5:].set((TOKENS[0, 5:] + 7) % 61)  # other ids at the padding
    norms = input_feature_norms(model, TOKENS, POSITIONS, SEGMENTS, mask=mask)
    same = input_feature_norms(model, other, POSITIONS, SEGMENTS, mask=mask)
    unmasked = input_feature_norms(model, TOKENS, POSITIONS, SEGMENTS)
    unmasked_other = input_feature_norms(model, other, POSITIONS, SEGMENTS)
    for path in norms:
        np.testing.assert_array_equal(norms[path], same[path])
        assert np.all(norms[path] <= unmasked[path] + 1e-6)
    head = "layers/0/attn/q_proj/kernel"
    assert not np.allclose(unmasked[head], unmasked_other[head])  # the padding counted there
    assert not np.allclose(norms[head], unmasked[head])


def test_stacked_layers_record_a_row_per_layer(model):
    stacked = _model(scan_layers=True)
    flat = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = nnx.to_pure_dict(nnx.state(stacked, nnx.Param))
    layers = [flat["layers"][i] for i in range(3)]
    state["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    state = {**state, "embed": flat["embed"], "final_norm": flat["final_norm"],
             "lm_head": flat["lm_head"]}  # fmt: skip
    graph_state = nnx.state(stacked, nnx.Param)
    nnx.replace_by_pure_dict(graph_state, state)
    nnx.update(stacked, graph_state)
    mask = SEGMENTS > 0
    norms = input_feature_norms(stacked, TOKENS, POSITIONS, SEGMENTS, mask=mask)
    per_layer = input_feature_norms(model, TOKENS, POSITIONS, SEGMENTS, mask=mask)
    assert norms["layers/mlp/down_proj/kernel"].shape == (3, 48)
    for path, norm in norms.items():
        if path.startswith("layers/"):
            rows = [per_layer[path.replace("layers/", f"layers/{i}/")] for i in range(3)]
            np.testing.assert_allclose(norm, np.stack(rows), rtol=1e-5, atol=1e-5, err_msg=path)
    probs, _ = owlore_probabilities(stacked, TOKENS, POSITIONS, SEGMENTS, mask=mask, m=3.0)
    expected, _ = owlore_probabilities(model, TOKENS, POSITIONS, SEGMENTS, mask=mask, m=3.0)
    np.testing.assert_allclose(probs, expected, atol=1e-12)


def _hooks(model):
    return [vars(n).get("input_hook") for _, n in nnx.iter_graph(model) if isinstance(n, Linear)]


def test_the_model_is_unchanged_outside_the_block(model):
    graph, params = nnx.split(model)

    def forward(params, tokens):
        return nnx.merge(graph, params)(tokens)

    jaxpr = str(jax.make_jaxpr(forward)(params, TOKENS))
    compiled = jax.jit(forward)
    before = np.asarray(compiled(params, TOKENS))
    eager = np.asarray(model(TOKENS))
    with record_input_norms(model) as norms:
        assert all(h is not None for h in _hooks(model))
        inside = np.asarray(model(TOKENS))
        jitted = nnx.jit(lambda m, t: m(t))
        np.asarray(jitted(model, TOKENS))  # traced inside: the callbacks record as well
    assert all(h is None for h in _hooks(model)) and Linear.input_hook is None
    np.testing.assert_array_equal(inside, eager)
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), eager)
    np.testing.assert_array_equal(np.asarray(compiled(params, TOKENS)), before)
    assert nnx.graphdef(model) == graph
    assert str(jax.make_jaxpr(forward)(params, TOKENS)) == jaxpr
    # two calls: eager and jitted, the norms of both (squares added)
    once = input_feature_norms(model, TOKENS)
    for path, norm in once.items():
        np.testing.assert_allclose(norms[path], np.sqrt(2) * norm, rtol=1e-5, atol=1e-6)
    # a function traced in the block and called after it records nothing more
    with record_input_norms(model) as later:
        traced = jax.jit(lambda t: model(t))
        traced(TOKENS)
    traced(TOKENS + 1)  # (its callbacks find the recording closed)
    jax.effects_barrier()
    assert set(later) == set(once)
    for path, norm in once.items():
        np.testing.assert_allclose(later[path], norm, rtol=1e-5, atol=1e-6)
    # an exception in the block removes the hooks too
    with pytest.raises(RuntimeError, match="inside"), record_input_norms(model) as failed:
        model(TOKENS)
        raise RuntimeError("inside")
    assert failed == {} and all(h is None for h in _hooks(model))


def test_bad_input_is_a_clear_error(model):
    plain = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no lowrank_jax.models.layers.Linear"):
        input_feature_norms(plain, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"mask has shape \(7, 2\).*token shape"):
        input_feature_norms(model, TOKENS, mask=jnp.ones((7, 2)))
    assert all(h is None for h in _hooks(model))
    with pytest.raises(ValueError, match="not a scalar"):
        input_feature_norms(model, TOKENS, mask=1)
    with pytest.raises(ValueError, match="already being recorded"), record_input_norms(model):
        with record_input_norms(model):
            pass
    assert all(h is None for h in _hooks(model))
    layer = Linear(3, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="was called"):
        input_feature_norms(_Unused(layer))


class _Unused(nnx.Module):
    def __init__(self, layer):
        self.layer = layer

    def __call__(self):
        return None
