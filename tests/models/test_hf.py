"""HF interop: logits equal to transformers' LlamaForCausalLM; save/load round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.models import Llama, get_config, load_hf, save_hf
from lowrank_jax.models.hf import UnsupportedCheckpointError, config_from_hf, config_to_hf

forward = nnx.jit(lambda model, tokens: model(tokens))

HF_CASES = {
    "mha": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "gqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "llama3_rope": dict(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=50000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
}


def _tiny_hf_config(**kwargs):
    base = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
    )
    base.update(kwargs)
    return base


def _tokens(vocab, shape=(2, 24), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


@pytest.mark.parametrize(
    "case, scan", [("mha", False), ("gqa", False), ("gqa_tied", True), ("llama3_rope", False)]
)
def test_logits_match_transformers(tmp_path, case, scan):
    torch = pytest.importorskip("torch", reason="needs torch (the `compare` extra)")
    transformers = pytest.importorskip("transformers", reason="needs transformers (`compare`)")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**_tiny_hf_config(**HF_CASES[case]))
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    # Random norm weights so a dropped or misplaced norm cannot hide.
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    tokens = _tokens(hf_config.vocab_size)
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens).long()).logits.numpy()
    model = load_hf(str(tmp_path), scan_layers=scan)
    assert model.config.num_kv_heads == HF_CASES[case]["num_key_value_heads"]
    assert model.config.tie_embeddings == HF_CASES[case]["tie_word_embeddings"]
    got = np.asarray(forward(model, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    # And back: our export loads in transformers with the same logits.
    out = tmp_path / "exported"
    save_hf(model, str(out))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        again = reloaded(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(again, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan, shard", [(False, None), (True, 30_000)])
def test_round_trip_without_torch(tmp_path, scan, shard):
    config = get_config("llama_tiny", vocab_size=67, num_layers=2, num_kv_heads=2, scan_layers=scan)
    model = Llama(config, rngs=nnx.Rngs(3))
    files = save_hf(model, str(tmp_path), max_shard_bytes=shard)
    assert (len(files) == 1) if shard is None else (len(files) > 1)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)
    loaded = load_hf(str(tmp_path), scan_layers=scan)
    assert loaded.config == config
    before = nnx.state(model, nnx.Param)
    after = nnx.state(loaded, nnx.Param)
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.asarray(_tokens(67, (1, 8)))
    np.testing.assert_array_equal(
        np.asarray(forward(model, tokens)), np.asarray(forward(loaded, tokens))
    )


def test_scanned_and_unrolled_exports_are_interchangeable(tmp_path):
    config = get_config("llama_tiny", vocab_size=50, num_layers=3, tie_embeddings=True)
    model = Llama(config, rngs=nnx.Rngs(0))
    save_hf(model, str(tmp_path))
    scanned = load_hf(str(tmp_path), scan_layers=True)
    tokens = jnp.asarray(_tokens(50, (2, 10)))
    np.testing.assert_allclose(
        np.asarray(forward(scanned, tokens)), np.asarray(forward(model, tokens)), atol=1e-5, rtol=0
    )


def test_bfloat16_params_load(tmp_path):
    model = Llama(get_config("llama_tiny", vocab_size=40, num_layers=1), rngs=nnx.Rngs(0))
    save_hf(model, str(tmp_path))
    loaded = load_hf(str(tmp_path), param_dtype="bfloat16", dtype="bfloat16")
    kernel = loaded.layers[0].attn.q_proj.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    logits = forward(loaded, jnp.zeros((1, 4), jnp.int32))
    assert logits.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="phi3"), "model_type 'phi3' is not supported"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope type 'yarn'"),
        (dict(rope_scaling={"rope_type": "linear"}), "needs ['factor']"),
        (dict(partial_rotary_factor=0.5), None),
    ],
)
def test_unsupported_config_is_a_clear_error(change, message):
    hf = _tiny_hf_config(**change)
    if "partial_rotary_factor" in change:
        hf["rope_parameters"] = {"rope_theta": 1e4, "partial_rotary_factor": 0.5}
        message = "partial_rotary_factor"
    with pytest.raises(UnsupportedCheckpointError, match=message.replace("[", r"\[")):
        config_from_hf(hf)


def test_config_round_trip_keeps_every_field():
    config = get_config(
        "llama_tiny",
        vocab_size=300,
        num_kv_heads=2,
        tie_embeddings=True,
        rope_theta=5e5,
        rms_norm_eps=1e-5,
        rope_scaling=(("rope_type", "linear"), ("factor", 2.0)),
    )
    assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config


def test_missing_and_mis_shaped_tensors_are_errors(tmp_path):
    model = Llama(get_config("llama_tiny", vocab_size=40, num_layers=1), rngs=nnx.Rngs(0))
    save_hf(model, str(tmp_path))
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UnsupportedCheckpointError, match="gate_proj.weight.*shape"):
        load_hf(str(tmp_path))
    hf["intermediate_size"] = 344
    hf["num_hidden_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UnsupportedCheckpointError, match="no tensor 'model.layers.1"):
        load_hf(str(tmp_path))
    with pytest.raises(UnsupportedCheckpointError, match="no config.json"):
        load_hf(str(tmp_path / "nowhere"))
