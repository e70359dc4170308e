"""Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 (and LLaMA with biases) through the HF loader:
logits equal transformers' on tiny random checkpoints; configs parse and export per family."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from lowrank_jax.models import Llama, load_hf, save_hf
from lowrank_jax.models.hf_config import UnsupportedCheckpointError, config_from_hf, config_to_hf
from tests.models.families import (
    FAMILIES,
    reference_logits,
    relative_error,
    require_transformers,
    tiny_config,
    tiny_reference,
)

forward = nnx.jit(lambda model, tokens: model(tokens))
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 20)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path, name):
    reference = tiny_reference(name)
    reference.save_pretrained(tmp_path)
    expected = reference_logits(reference, TOKENS)
    for scan in (False, True):
        model = load_hf(str(tmp_path), scan_layers=scan)
        assert relative_error(forward(model, jnp.asarray(TOKENS)), expected) < 1e-4
    # The export loads in transformers (same family) with the same logits.
    out = tmp_path / "exported"
    save_hf(model, str(out))
    _, transformers = require_transformers()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(reference)
    assert relative_error(reference_logits(reloaded, TOKENS), expected) < 1e-6


def test_multimodal_gemma3_loads_its_language_model(tmp_path):
    torch, transformers = require_transformers()
    torch.manual_seed(0)
    text = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=6,
        sliding_window_pattern=2,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=297,
        eoi_token_index=298,
        image_token_index=299,
        attn_implementation="eager",
    )
    reference = transformers.Gemma3ForConditionalGeneration(config).eval()
    reference.save_pretrained(tmp_path)
    tokens = TOKENS % 290
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    model = load_hf(str(tmp_path))
    assert model.config.model_type == "gemma3_text"
    assert relative_error(forward(model, jnp.asarray(tokens)), expected) < 1e-4


def _hf(model_type, **kw):
    base = dict(
        model_type=model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return {**base, **kw}


def test_family_switches_without_torch():
    qwen2 = config_from_hf(_hf("qwen2"))
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.sliding_window) == (True, False, None)
    window = config_from_hf(_hf("qwen2", use_sliding_window=True, sliding_window=8))
    # transformers' default max_window_layers (28) exceeds the depth: no layer slides
    assert window.sliding_layers() == (False,) * 4
    window = config_from_hf(
        _hf("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    )
    assert window.sliding_layers() == (False, False, True, True)
    qwen3 = config_from_hf(_hf("qwen3"))
    assert qwen3.qk_norm and qwen3.head_dim == 128 and not qwen3.qkv_bias
    mistral = config_from_hf(_hf("mistral", sliding_window=16))
    assert mistral.sliding_layers() == (True,) * 4
    assert config_from_hf(_hf("mistral", sliding_window=None)).sliding_layers() == (False,) * 4
    # An older Gemma 3 config.json: rope_theta / rope_local_base_freq / sliding_window_pattern.
    gemma = config_from_hf(
        _hf(
            "gemma3_text",
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            sliding_window_pattern=2,
            sliding_window=512,
        )
    )
    assert gemma.sliding_layers() == (True, False, True, False)
    assert (gemma.rope_theta, gemma.local_rope_theta) == (1e6, 1e4)
    assert dict(gemma.rope_scaling) == {"rope_type": "linear", "factor": 8.0}
    assert gemma.query_pre_attn_scalar == 256 and gemma.tie_embeddings and gemma.qk_norm
    assert gemma.norm_plus_one and gemma.sandwich_norms and gemma.activation == "gelu_tanh"
    gemma2 = config_from_hf(_hf("gemma2"))
    assert (gemma2.attn_softcap, gemma2.final_softcap) == (50.0, 30.0)
    assert gemma2.sliding_layers() == (True, False, True, False) and not gemma2.qk_norm
    multimodal = config_from_hf({"model_type": "gemma3", "text_config": {"hidden_size": 64}})
    assert multimodal.num_layers == 26 and multimodal.vocab_size == 262_208


@pytest.mark.parametrize(
    "hf",
    [
        _hf("llama", attention_bias=True, mlp_bias=True),
        _hf("mistral", sliding_window=16),
        _hf("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1),
        _hf("qwen3", head_dim=16, attention_bias=True),
        _hf("gemma2", head_dim=16, query_pre_attn_scalar=24.5),
        _hf("gemma3_text", head_dim=16, sliding_window=4, sliding_window_pattern=3),
    ],
    ids=lambda hf: hf["model_type"],
)
def test_config_round_trip_per_family(hf):
    config = config_from_hf(hf)
    assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma3_text"])
def test_save_load_round_trip_without_torch(tmp_path, model_type):
    config = config_from_hf(_hf(model_type, head_dim=8, sliding_window=3), scan_layers=True)
    model = Llama(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    # Non-trivial norms and biases, so a dropped or swapped one shows.
    nnx.update(
        model,
        jax.tree.map(lambda x: x + 0.1 * jnp.arange(x.size).reshape(x.shape) / x.size, params),
    )
    save_hf(model, str(tmp_path))
    loaded = load_hf(str(tmp_path))
    tokens = jnp.asarray(TOKENS % 64)
    np.testing.assert_allclose(forward(loaded, tokens), forward(model, tokens), atol=1e-5)


def test_gemma_norm_scales_by_one_plus_weight():
    config = config_from_hf(_hf("gemma3_text", head_dim=8))
    model = Llama(config, rngs=nnx.Rngs(0))
    assert float(jnp.abs(model.layers[0].input_norm.scale[...]).max()) == 0.0
    x = jax.random.normal(jax.random.key(0), (3, 32))
    expected = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + config.rms_norm_eps)
    np.testing.assert_allclose(model.final_norm(x), expected, rtol=1e-5)


def test_sliding_window_limits_what_a_token_sees():
    config = config_from_hf(_hf("mistral", sliding_window=4, num_hidden_layers=1))
    model = Llama(config, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(1).integers(0, 64, (1, 12))
    changed = tokens.copy()
    changed[0, 2] = (changed[0, 2] + 1) % 64
    a, b = forward(model, jnp.asarray(tokens)), forward(model, jnp.asarray(changed))
    # One layer: position 2 is seen by positions 2..5 (window 4) and by no later one.
    assert not np.allclose(a[0, 5], b[0, 5], atol=1e-4)
    np.testing.assert_allclose(a[0, 6:], b[0, 6:], atol=1e-6)


def test_scanned_layers_of_both_kinds_match_the_loop():
    config = config_from_hf(
        _hf("gemma3_text", head_dim=8, sliding_window=3, sliding_window_pattern=2)
    )
    loop = Llama(config, rngs=nnx.Rngs(0))
    scanned = _stacked_copy(loop)
    tokens = jnp.asarray(TOKENS % 64)
    np.testing.assert_allclose(forward(scanned, tokens), forward(loop, tokens), atol=1e-5)


def _stacked_copy(model):
    """``model`` with its weights stacked in a ``scan_layers=True`` model."""
    other = Llama(dataclasses.replace(model.config, scan_layers=True), rngs=nnx.Rngs(1))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers = params.pop("layers")
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in sorted(layers)])
    nnx.update(other, params)
    return other


@pytest.mark.parametrize(
    "hf, message",
    [
        (_hf("gpt2"), "model_type 'gpt2' is not supported; supported: llama, mistral"),
        (_hf("gemma3_text", hidden_activation="gelu"), "hidden_activation 'gelu'"),
        (_hf("qwen3", mlp_bias=True), "mlp_bias"),
        (_hf("gemma3_text", use_bidirectional_attention=True), "use_bidirectional_attention"),
        (
            _hf(
                "gemma3_text",
                rope_parameters={
                    "full_attention": {"rope_type": "default"},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0},
                },
            ),
            "scaled rope on Gemma 3's sliding layers",
        ),
        (_hf("qwen2", use_sliding_window=True, layer_types=["x"] * 4, sliding_window=2), "x"),
    ],
)
def test_unsupported_family_features_are_clear_errors(hf, message):
    with pytest.raises(UnsupportedCheckpointError, match=message):
        config_from_hf(hf)


def test_export_rejects_switches_the_family_cannot_express():
    config = config_from_hf(_hf("llama"))
    with pytest.raises(ValueError, match="qk_norm.*cannot be exported as HF model_type 'llama'"):
        config_to_hf(dataclasses.replace(config, qk_norm=True))
    with pytest.raises(ValueError, match="o_bias"):
        config_to_hf(dataclasses.replace(config, qkv_bias=True))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_param_count_and_sharding_metadata(name):
    config = tiny_config(name, scan_layers=True)
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params()
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))["layers"]
    if config.qkv_bias:
        assert specs["attn"]["q_proj"]["bias"] == PartitionSpec(None, "tensor")
    if config.qk_norm:
        assert specs["attn"]["q_norm"]["scale"] == PartitionSpec(None, None)
    if config.sandwich_norms:
        assert specs["post_mlp_norm"]["scale"] == PartitionSpec(None, None)
