"""Packed documents (segment ids, per-document positions) and the KV cache, for every family."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.models import Llama, init_cache
from lowrank_jax.models.layers import attention_mask
from tests.models.families import FAMILIES, randomize, tiny_config

forward = nnx.jit(lambda model, tokens, positions, segments: model(tokens, positions, segments))
decode = nnx.jit(
    lambda model, tokens, positions, segments, cache: model(
        tokens, positions, segments, cache=cache
    )
)


def _model(name, **overrides):
    return randomize(Llama(tiny_config(name, **overrides), rngs=nnx.Rngs(0)))


def _docs(lengths, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_packed_documents_equal_separate_runs(name):
    model = _model(name)
    docs = _docs([8, 8, 8])  # longer than every sliding window
    tokens = np.concatenate(docs + [np.zeros(4, np.int32)])[None]  # and 4 padding slots
    segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [[0] * 4])
    positions = np.concatenate([np.arange(len(d)) for d in docs] + [np.arange(4)])
    packed = forward(
        model, jnp.asarray(tokens), jnp.asarray(positions[None]), jnp.asarray(segments[None])
    )
    start = 0
    for doc in docs:
        alone = forward(model, jnp.asarray(doc[None]), None, None)
        np.testing.assert_allclose(packed[0, start : start + len(doc)], alone[0], atol=2e-5)
        start += len(doc)


def test_segment_ids_block_gradients_across_documents():
    model = _model("qwen3")
    tokens = jnp.asarray(np.concatenate(_docs([6, 6]))[None])
    segments = jnp.asarray([[1] * 6 + [2] * 6])
    positions = jnp.asarray([list(range(6)) * 2])

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def second_doc_loss(params):
        return nnx.merge(graphdef, params, rest)(tokens, positions, segments)[0, 6:].sum()

    grad = jax.jit(jax.grad(second_doc_loss))(params)["embed"]["embedding"][...]
    first_doc_ids = np.setdiff1d(np.asarray(tokens[0, :6]), np.asarray(tokens[0, 6:]))
    assert float(jnp.abs(grad[first_doc_ids]).max()) == 0.0
    assert float(jnp.abs(grad[np.asarray(tokens[0, 6:])]).max()) > 0.0


def test_attention_mask_rules():
    slots = jnp.arange(5)
    np.testing.assert_array_equal(attention_mask(slots, slots), np.tril(np.ones((5, 5), bool)))
    window = np.asarray(attention_mask(slots, slots, window=2))
    assert window[4].tolist() == [False, False, False, True, True]
    segments = jnp.asarray([[1, 1, 2, 2, 0]])
    mask = np.asarray(attention_mask(slots, slots, segments, segments))[0, 0, 0]
    assert mask[3].tolist() == [False, False, True, True, False]
    assert mask[4].tolist() == [False, False, False, False, True]


@pytest.mark.parametrize(
    "name, scan", [(n, False) for n in sorted(FAMILIES)] + [("gemma3", True), ("qwen2", True)]
)
def test_cached_decoding_equals_the_full_forward(name, scan):
    model = _model(name, scan_layers=scan)
    tokens = jnp.asarray(np.stack(_docs([14, 14], seed=1)))
    full = forward(model, tokens, None, None)
    cache = init_cache(model.config, 2, 16)
    logits, cache = decode(model, tokens[:, :6], None, None, cache)
    steps = [logits]
    for t in range(6, 14):
        logits, cache = decode(model, tokens[:, t : t + 1], None, None, cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)
    assert int(cache.index) == 14
    np.testing.assert_array_equal(cache.segment_ids, [[1] * 14 + [0] * 2] * 2)


def test_left_padded_prompt_in_the_cache_equals_the_unpadded_run():
    model = _model("gemma3")
    prompt = _docs([7], seed=2)[0]
    padded = np.concatenate([np.zeros(5, np.int32), prompt])[None]
    segments = np.asarray([[0] * 5 + [1] * 7])
    positions = np.maximum(np.cumsum(segments, 1) - 1, 0)
    cache = init_cache(model.config, 1, 12)
    logits, _ = decode(
        model, jnp.asarray(padded), jnp.asarray(positions), jnp.asarray(segments), cache
    )
    alone = forward(model, jnp.asarray(prompt[None]), None, None)
    np.testing.assert_allclose(logits[0, 5:], alone[0], atol=2e-5)


def test_remat_does_not_change_the_segment_aware_forward():
    config = tiny_config("mistral")
    plain = _model("mistral")
    remat = Llama(dataclasses.replace(config, remat=True), rngs=nnx.Rngs(1))
    nnx.update(remat, nnx.state(plain, nnx.Param))
    tokens = jnp.asarray(np.concatenate(_docs([5, 7]))[None])
    segments = jnp.asarray([[1] * 5 + [2] * 7])
    np.testing.assert_allclose(
        forward(remat, tokens, None, segments), forward(plain, tokens, None, segments), atol=1e-6
    )
