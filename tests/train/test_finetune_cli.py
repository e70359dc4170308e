"""``lowrank-jax finetune`` / ``generate`` end to end on a tiny checkpoint written here (no
transformers needed): PEFT export and reload, merged and full checkpoints with the logits of the
trained model, QLoRA, GGUF, and the one-line errors. The PEFT parity test needs the `compare`
extra (transformers, torch, peft) and skips without it."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.data.evaluation import normalize_answer
from lowrank_jax.models import Llama, load_hf, save_hf
from lowrank_jax.train.checkpoint import CheckpointError
from lowrank_jax.train.cli import main
from lowrank_jax.train.finetune import FinetuneConfig, finetune
from lowrank_jax.train.finetune_export import load_with_adapter
from tests.data.tiny_tokenizer import CHATML, write_checkpoint_tokenizer
from tests.models.families import randomize, tiny_config

forward = nnx.jit(lambda model, tokens: model(tokens))
QUIET = dict(log=lambda _: None)


def _problems(count=24):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(count):
        a, b = (int(x) for x in rng.integers(1, 50, 2))
        rows.append({"prompt": f"What is {a} + {b}?", "response": str(a + b)})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LLaMA checkpoint directory with a chat-template tokenizer, and its data file."""
    root = tmp_path_factory.mktemp("ckpt")
    tokenizer_dir = write_checkpoint_tokenizer(root / "hf")
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    config = tiny_config("llama_bias", qkv_bias=False, o_bias=False, mlp_bias=False,
                         vocab_size=size)  # fmt: skip
    save_hf(randomize(Llama(config, rngs=nnx.Rngs(0))), str(root / "hf"))
    return str(root / "hf"), _write_jsonl(root / "train.jsonl", _problems())


def _tokens(tokenizer):
    return jnp.asarray(tokenizer.encode("What is 12 + 7? It is 19.")[None, :])


def _lora_config(checkpoint, out, **overrides):
    model, data = checkpoint
    settings = dict(method="lora", rank=4, alpha=8.0, lr=1e-2, steps=6, batch_size=2,
                    max_seq_len=64, eval_every=3, eval_generate=2, eval_max_new_tokens=4,
                    merge=True, log_every=1)  # fmt: skip
    return FinetuneConfig(model=model, data=data, out=out, **{**settings, **overrides})


@pytest.fixture(scope="module")
def lora_run(checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora") / "run")
    return out, finetune(_lora_config(checkpoint, out), **QUIET)


def test_lora_run_writes_metrics_and_summary(lora_run):
    out, result = lora_run
    records = _records(out)
    assert records[0]["records"] == 24 and records[0]["val_examples"] == 2
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    evals = [r for r in records if "val_loss" in r and not r.get("summary")]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(len(r["generations"]) == 2 and 0 <= r["exact_match"] <= 1 for r in evals)
    assert all(r["val_ppl"] == pytest.approx(np.exp(r["val_loss"])) for r in evals)
    for r in evals:
        hits = [normalize_answer(g["output"]) == normalize_answer(g["answer"])
                for g in r["generations"]]  # fmt: skip
        assert r["exact_match"] == np.mean(hits)
    summary = records[-1]
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["val_loss"] == evals[-1]["val_loss"]
    assert summary["val_loss_before"] == evals[0]["val_loss"] > summary["val_loss"]
    assert summary["exact_match_before"] == evals[0]["exact_match"]
    # rank 4 on 7 matrices of 2 layers: A (in x 4) + B (4 x out) each.
    model = result.model
    expected = sum(
        4 * (layer.kernel.shape[0] + layer.kernel.shape[1])
        for block in (model.layers[0], model.layers[1])
        for layer in (block.attn.q_proj.base, block.attn.k_proj.base, block.attn.v_proj.base,
                      block.attn.o_proj.base, block.mlp.gate_proj.base, block.mlp.up_proj.base,
                      block.mlp.down_proj.base)
    )  # fmt: skip
    assert summary["trainable_params"] == expected
    # AdamW: two moments of every trainable value, float32, plus its step count.
    assert 8 * expected <= summary["optimizer_state_bytes"] <= 8 * expected + 64
    assert set(summary["saved"]) == {"peft_adapter", "merged"}


def test_a_stopped_run_resumes_to_the_same_result(lora_run, checkpoint, tmp_path):
    full_out, full = lora_run
    out = str(tmp_path / "resumed")
    stopped = finetune(_lora_config(checkpoint, out, stop_at=4), **QUIET)
    assert stopped.summary == {"stopped_at": 4}
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["4"]
    assert not os.path.exists(os.path.join(out, "adapter"))
    with pytest.raises(CheckpointError, match="other settings.*lr=0.01, now 0.02"):
        finetune(_lora_config(checkpoint, out, resume=True, lr=2e-2), **QUIET)
    resumed = finetune(_lora_config(checkpoint, out, resume=True), **QUIET)
    tokens = _tokens(full.tokenizer)
    np.testing.assert_array_equal(
        np.asarray(forward(resumed.model, tokens)), np.asarray(forward(full.model, tokens))
    )
    ignore = ("seconds", "saved")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ignore} for r in rows]
    assert strip(_records(out)) == strip(_records(full_out))


def test_peft_export_reloads_with_the_trained_logits(lora_run, checkpoint):
    out, result = lora_run
    tokens = _tokens(result.tokenizer)
    trained = np.asarray(forward(result.model, tokens))
    base, _ = load_with_adapter(checkpoint[0])
    assert np.abs(np.asarray(forward(base, tokens)) - trained).max() > 1e-3  # it did train
    reloaded, _ = load_with_adapter(checkpoint[0], os.path.join(out, "adapter"))
    np.testing.assert_allclose(np.asarray(forward(reloaded, tokens)), trained, atol=1e-5)
    config = json.loads(open(os.path.join(out, "adapter", "adapter_config.json")).read())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert "model.layers.1.self_attn.q_proj" in config["target_modules"]


def test_merged_checkpoint_has_the_adapted_logits(lora_run):
    out, result = lora_run
    tokens = _tokens(result.tokenizer)
    merged = load_hf(os.path.join(out, "merged"))
    np.testing.assert_allclose(
        np.asarray(forward(merged, tokens)), np.asarray(forward(result.model, tokens)), atol=1e-5
    )
    assert os.path.exists(os.path.join(out, "merged", "tokenizer.json"))


@pytest.mark.parametrize("method", ["pissa", "vera"])
def test_other_adapters_reload_with_the_trained_logits(checkpoint, tmp_path, method):
    # PiSSA trains on a residual base: exported as a plain LoRA of rank 2r on the original
    # weights. VeRA has no PEFT LoRA form: reparam.save's format, which --adapter also reads.
    # Both with adapter dropout in training (off in the returned and the reloaded model).
    model, data = checkpoint
    out = str(tmp_path / method)
    cfg = FinetuneConfig(model=model, data=data, out=out, method=method, rank=4, lr=1e-2,
                         steps=3, batch_size=2, max_seq_len=64,
                         options={"dropout": 0.1})  # fmt: skip
    result = finetune(cfg, **QUIET)
    tokens = _tokens(result.tokenizer)
    kind = "peft_adapter" if method == "pissa" else "adapter"
    assert result.summary["saved"] == {kind: os.path.join(out, "adapter")}
    reloaded, _ = load_with_adapter(model, os.path.join(out, "adapter"))
    np.testing.assert_allclose(
        np.asarray(forward(reloaded, tokens)), np.asarray(forward(result.model, tokens)), atol=1e-5
    )


def test_full_parameter_galore_writes_a_reloadable_checkpoint(checkpoint, tmp_path):
    model, data = checkpoint
    out = str(tmp_path / "galore")
    cfg = FinetuneConfig(model=model, data=data, out=out, method="galore", rank=4,
                         options={"update_proj_gap": 2}, steps=4, batch_size=2, max_seq_len=64,
                         lr=1e-2)  # fmt: skip
    result = finetune(cfg, **QUIET)
    summary = _records(out)[-1]
    assert summary["saved"] == {"model": os.path.join(out, "model")}
    assert summary["val_loss"] < summary["val_loss_before"]
    tokens = _tokens(result.tokenizer)
    reloaded = load_hf(os.path.join(out, "model"))
    np.testing.assert_allclose(
        np.asarray(forward(reloaded, tokens)), np.asarray(forward(result.model, tokens)), atol=1e-5
    )
    # Every weight trains (the count is the model's), GaLore's state is below AdamW's 2x.
    params = nnx.state(result.model, nnx.Param)
    total = sum(np.size(x) for x in jax.tree.leaves(params))
    assert summary["trainable_params"] == total
    assert summary["optimizer_state_bytes"] < 8 * total


def test_qlora_nf4_trains_and_the_loss_falls(checkpoint, tmp_path):
    model, data = checkpoint
    out = str(tmp_path / "qlora")
    # The head is adapted too: this random model's frozen head bounds its logits too tightly
    # for the answer tokens to become likely otherwise.
    targets = r"(q|k|v|o|gate|up|down)_proj/kernel|lm_head/kernel"
    cfg = FinetuneConfig(model=model, data=data, out=out, method="lora", rank=4, lr=3e-2,
                         steps=12, batch_size=4, max_seq_len=64, quantize_base="nf4",
                         targets=targets, log_every=1)  # fmt: skip
    result = finetune(cfg, **QUIET)
    losses = [r["loss"] for r in _records(out) if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.5
    assert result.summary["val_loss"] < losses[0] - 1.5
    for kernel in (
        result.model.layers[0].attn.q_proj.base.kernel,
        result.model.lm_head.base.kernel,
    ):
        assert type(kernel).__name__ == "QuantizedKernel"
    config = json.loads(open(os.path.join(out, "adapter", "adapter_config.json")).read())
    assert "lm_head" in config["target_modules"]


def test_loftq_iters_start_the_quantized_model_nearer_the_float_one(checkpoint, tmp_path):
    """--loftq-iters: the adapters start from the NF4 error, so the effective weights (base +
    adapter, merged) are nearer the float checkpoint's than plain QLoRA's (B = 0)."""
    from lowrank_jax import reparam

    model, data = checkpoint
    common = dict(model=model, data=data, method="lora", rank=8, lr=1e-12, steps=1,
                  batch_size=4, max_seq_len=64)  # fmt: skip
    kernels = {}
    for name, extra in (("float", {}), ("qlora", {"quantize_base": "nf4"}),
                        ("loftq", {"quantize_base": "nf4", "loftq_iters": 3})):  # fmt: skip
        cfg = FinetuneConfig(out=str(tmp_path / name), **common, **extra)
        merged = reparam.unwrap(nnx.clone(finetune(cfg, **QUIET).model), merge=True)
        kernels[name] = np.asarray(merged.layers[0].mlp.up_proj.kernel[...])
    error = {k: np.linalg.norm(kernels[k] - kernels["float"]) for k in ("qlora", "loftq")}
    assert 0 < error["loftq"] < 0.8 * error["qlora"], error


def test_gguf_checkpoint_fine_tunes(checkpoint, tmp_path):
    pytest.importorskip("gguf", reason="needs the gguf package (the `finetune` extra)")
    from tests.models.gguf_writer import convert

    model, data = checkpoint
    path = convert(
        model,
        tmp_path / "m.gguf",
        tokenizer_json=os.path.join(model, "tokenizer.json"),
        chat_template=CHATML,
    )
    out = str(tmp_path / "run")
    argv = ["finetune", "--model", str(path), "--data", data, "--out", out, "--rank", "2",
            "--steps", "2", "--batch-size", "2", "--max-seq-len", "64"]  # fmt: skip
    assert main(argv) == 0
    summary = _records(out)[-1]
    assert np.isfinite(summary["val_loss"]) and "peft_adapter" in summary["saved"]


def test_generate_prints_the_reply(lora_run, checkpoint, capsys):
    from lowrank_jax.generate import generate

    out, result = lora_run
    prompt = "What is 3 + 4?"
    argv = ["generate", "--model", checkpoint[0], "--prompt", prompt, "--max-new-tokens", "6"]
    assert main([*argv, "--adapter", os.path.join(out, "adapter")]) == 0
    printed = capsys.readouterr().out
    assert printed == generate(result.model, result.tokenizer, prompt, max_new_tokens=6) + "\n"
    assert main(argv) == 0  # the base model alone
    base, tokenizer = load_with_adapter(checkpoint[0])
    assert capsys.readouterr().out == generate(base, tokenizer, prompt, max_new_tokens=6) + "\n"


def _error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowrank-jax: error: ") and "\n" not in err
    return err


def test_bad_input_is_one_line_and_status_2(checkpoint, tmp_path, capsys):
    model, data = checkpoint
    base = ["finetune", "--model", model, "--out", str(tmp_path / "out"), "--steps", "1"]
    err = _error([*base, "--data", data, "--method", "nope"], capsys)
    assert "'nope'" in err and "lora" in err and "galore" in err
    rows = _problems(4)
    del rows[2]["response"]
    bad = _write_jsonl(tmp_path / "bad.jsonl", rows)
    assert "bad.jsonl:3: missing field 'response'" in _error([*base, "--data", bad], capsys)
    err = _error([*base, "--data", data, "--method", "galore", "--quantize-base", "nf4"], capsys)
    assert "--quantize-base" in err and "adapter methods" in err
    err = _error([*base, "--data", data, "--loftq-iters", "2"], capsys)
    assert "--loftq-iters" in err and "--quantize-base nf4" in err
    err = _error([*base, "--data", data, "--method", "pissa", "--quantize-base", "nf4",
                  "--loftq-iters", "2"], capsys)  # fmt: skip
    assert "--loftq-iters" in err and "'pissa'" in err
    err = _error([*base, "--data", data, "--method", "adamw", "--merge"], capsys)
    assert "--merge" in err
    untokenized = tmp_path / "bare"
    untokenized.mkdir()
    for name in ("config.json", "model.safetensors"):
        (untokenized / name).write_bytes(open(os.path.join(model, name), "rb").read())
    err = _error([*base, "--data", data, "--model", str(untokenized)], capsys)
    assert "no tokenizer.json" in err and "--tokenizer DIR" in err
    assert main([*base, "--data", data, "--model", str(untokenized), "--tokenizer", model]) == 0
    generate = ["generate", "--model", model, "--prompt", "hi"]
    assert "--top-p" in _error([*generate, "--top-p", "0"], capsys)
    err = _error([*generate, "--adapter", str(tmp_path / "none")], capsys)
    assert "--adapter" in err and "no adapter_config.json" in err


def test_too_long_records_are_truncated_or_dropped(checkpoint, tmp_path, capsys):
    model, data = checkpoint
    rows = _problems(6)
    rows[1]["response"] = " ".join(["19"] * 40)  # the response is cut, the record is kept
    rows[3]["prompt"] = "What is " + " + ".join(["1"] * 40) + "?"  # no response token fits
    long = _write_jsonl(tmp_path / "long.jsonl", rows)
    out = str(tmp_path / "out")
    argv = ["finetune", "--model", model, "--data", long, "--out", out, "--steps", "1",
            "--max-seq-len", "64", "--val-fraction", "0.2", "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    info = _records(out)[0]
    assert (info["truncated"], info["dropped"]) == (1, 1)
    assert info["train_examples"] + info["val_examples"] == 5
    only_long = _write_jsonl(tmp_path / "only.jsonl", [rows[3], rows[3]])
    argv[argv.index(long)] = only_long
    assert "no example fits --max-seq-len 64" in _error(argv, capsys)


def test_peft_loads_the_exported_adapter(lora_run, checkpoint):
    torch = pytest.importorskip("torch", reason="needs torch (the `compare` extra)")
    transformers = pytest.importorskip("transformers", reason="needs transformers (`compare`)")
    peft = pytest.importorskip("peft", reason="needs peft (the `compare` extra)")
    out, result = lora_run
    tokens = _tokens(result.tokenizer)
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    with torch.no_grad():
        theirs = adapted(torch.as_tensor(np.asarray(tokens))).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(forward(result.model, tokens)), atol=1e-4)


@pytest.mark.parametrize("name", ["loraplus", "lorafa", "allora", "ggpo"])
def test_lora_side_optimizers_train_the_adapters(checkpoint, tmp_path, name):
    """``--adapter-optimizer``: each LoRA-side rule trains (the loss falls); LoRA-FA leaves
    every ``A`` as initialised and moves only ``B``."""
    from lowrank_jax import reparam

    out = str(tmp_path / name)
    cfg = _lora_config(checkpoint, out, adapter_optimizer=name, steps=8, eval_generate=0,
                       merge=False, lr=2e-2)  # fmt: skip
    result = finetune(cfg, **QUIET)
    losses = [r["loss"] for r in _records(out) if "loss" in r and not r.get("summary")]
    assert losses[-1] < losses[0], losses
    trained = reparam.adapters_of(result.model).trainable
    again = finetune(dataclasses.replace(cfg, out=str(tmp_path / "init"), steps=1, lr=1e-12),
                     **QUIET)  # fmt: skip
    initial = reparam.adapters_of(again.model).trainable
    for path, arrays in trained.items():
        moved_a = not np.allclose(arrays["A"], initial[path]["A"], atol=1e-9)
        moved_b = not np.allclose(arrays["B"], initial[path]["B"], atol=1e-9)
        assert moved_b and moved_a == (name != "lorafa"), (path, moved_a, moved_b)


def test_adapter_optimizer_errors(checkpoint, tmp_path, capsys):
    model, data = checkpoint
    base = ["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "o"),
            "--steps", "1"]  # fmt: skip
    assert "--adapter-optimizer must be one of adamw, loraplus" in _error(
        [*base, "--adapter-optimizer", "lion"], capsys
    )
    err = _error([*base, "--method", "dora", "--adapter-optimizer", "lorafa"], capsys)
    assert "goes with --method lora" in err
    err = _error([*base, "--method", "galore", "--adapter-optimizer", "loraplus"], capsys)
    assert "--adapter-optimizer trains adapters" in err
    err = _error([*base, "--adapter-optimizer", "ggpo", "--quantize-base", "nf4"], capsys)
    assert "ggpo perturbs the frozen base weights" in err


def test_the_summary_has_the_compiled_steps_memory(lora_run):
    """The run compiles its step once and reports XLA's analysis of it (nothing allocated)."""
    _, result = lora_run
    summary = result.summary
    assert summary["skipped_steps"] == 0
    assert 0 < summary["step_temp_bytes"] < summary["step_peak_bytes"]
    # the peak holds the base weights, the adapters and AdamW's two moments of them
    assert summary["step_peak_bytes"] > 3 * 4 * summary["trainable_params"]


def test_accumulated_microbatches_train_like_the_whole_batch(checkpoint, tmp_path):
    """--accum-steps 2 with 2 rows per step: the same adapters as one 2-row step (the loss is
    the mean over all the batch's response tokens either way)."""
    runs = [
        finetune(_lora_config(checkpoint, str(tmp_path / f"a{k}"), accum_steps=k, steps=3,
                              eval_generate=0, merge=False), **QUIET)  # fmt: skip
        for k in (1, 2)
    ]
    tokens = _tokens(runs[0].tokenizer)
    logits = [np.asarray(forward(run.model, tokens)) for run in runs]
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    losses = [[r["loss"] for r in _records(str(tmp_path / f"a{k}")) if "loss" in r] for k in (1, 2)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    with pytest.raises(Exception, match="--accum-steps 3 must divide --batch-size 2"):
        _lora_config(checkpoint, str(tmp_path / "bad"), accum_steps=3).validate()


def test_a_diverging_run_skips_non_finite_steps_then_stops(checkpoint, tmp_path):
    """The step's guard skips a step whose loss or gradients are not finite (nothing changes);
    a run that keeps producing them stops with one line naming --lr."""
    from lowrank_jax.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"steps in a row .* skipped; lower --lr"):
        finetune(_lora_config(checkpoint, str(tmp_path / "nan"), method="adamw", lr=1e30,
                              alpha=None, merge=False, eval_generate=0, steps=8, log_every=2),
                 **QUIET)  # fmt: skip


def test_layerwise_full_parameter_fine_tuning(checkpoint, tmp_path):
    """--layerwise: the model is loaded with stacked layers and GaLore updates each layer in
    the backward pass; it trains, and its checkpoint reloads with the trained logits."""
    model, data = checkpoint
    out = str(tmp_path / "lw")
    cfg = FinetuneConfig(model=model, data=data, out=out, method="galore", rank=4,
                         options={"update_proj_gap": 2}, steps=4, batch_size=2, max_seq_len=64,
                         lr=1e-2, layerwise=True)  # fmt: skip
    result = finetune(cfg, **QUIET)
    summary = _records(out)[-1]
    assert result.model.config.scan_layers
    assert summary["val_loss"] < summary["val_loss_before"]
    tokens = _tokens(result.tokenizer)
    reloaded = load_hf(os.path.join(out, "model"))
    np.testing.assert_allclose(
        np.asarray(forward(reloaded, tokens)), np.asarray(forward(result.model, tokens)), atol=1e-5
    )
    from lowrank_jax.train.config import ConfigError

    for bad, match in (({"method": "lora"}, "--layerwise updates every weight"),
                       ({"accum_steps": 3}, "--accum-steps 3 must divide --batch-size 2"),
                       ):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            dataclasses.replace(cfg, **bad).validate()


def test_layerwise_accumulation_trains_like_the_whole_batch(checkpoint, tmp_path):
    """--layerwise --accum-steps 2: the microbatches (one packed row each, with different
    numbers of response tokens) pass through the stacked layers one layer at a time, and the
    run follows the one-batch layer-wise run (the loss is the mean over all the batch's
    response tokens either way)."""
    model, data = checkpoint
    runs = []
    for k in (1, 2):
        out = str(tmp_path / f"lw{k}")
        cfg = FinetuneConfig(model=model, data=data, out=out, method="adamw", steps=3,
                             batch_size=2, max_seq_len=64, lr=1e-3, layerwise=True,
                             accum_steps=k, eval_every=3, eval_generate=0, log_every=1)  # fmt: skip
        runs.append((finetune(cfg, **QUIET), [r["loss"] for r in _records(out) if "loss" in r]))
    (one, want), (accumulated, got) = runs
    assert len(got) == 3
    np.testing.assert_allclose(got, want, rtol=1e-5)
    tokens = _tokens(one.tokenizer)
    logits = [np.asarray(forward(run.model, tokens)) for run in (one, accumulated)]
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_ggpo_noise_perturbs_only_the_adapted_base_weights(checkpoint):
    """LoRA-GGPO in the fine-tuning forward: each adapted layer's base kernel gets noise of
    per-output-unit variance sigma^2/n (||W_j||^2 + beta ||grad W_j||^2) (from the optimizer's
    state), fresh per step; nothing else changes."""
    from lowrank_jax import reparam
    from lowrank_jax.models.pretrained import load_pretrained
    from lowrank_jax.train import finetune as ft

    model, _ = load_pretrained(checkpoint[0], scan_layers=False)
    cfg = _lora_config(checkpoint, "unused", adapter_optimizer="ggpo")
    wrapped = reparam.wrap(model, ft._adapter_factory(cfg), key=jax.random.key(0),
                           rngs=nnx.Rngs(dropout=0))  # fmt: skip
    tx = ft._adapter_optimizer(cfg, 1e-3, wrapped)
    _, adapters, _, frozen = nnx.split(wrapped, nnx.LoRAParam, nnx.RngState, ...)
    state = tx.init(nnx.to_pure_dict(adapters))
    before = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(frozen))
    at = lambda t: ft._ggpo_noise_state(state._replace(count=jnp.int32(t)))
    noisy = [jax.tree_util.tree_leaves_with_path(ft._ggpo_perturb(frozen, at(t))) for t in (0, 1)]
    sites = {site.rsplit("/", 1)[0] + "/base/kernel": site for site in state.weight_norms}
    assert len(sites) == 14  # 7 projections x 2 layers
    seen = 0
    for (path, old), (_, one), (_, two) in zip(before, *noisy, strict=True):
        path = "/".join(str(getattr(k, "key", k)) for k in path)
        if path not in sites:
            np.testing.assert_array_equal(np.asarray(one), np.asarray(old), err_msg=path)
            continue
        seen += 1
        noise = np.asarray(one, np.float64) - np.asarray(old, np.float64)
        n = old.shape[0]
        variance = ft.GGPO_SIGMA**2 / n * np.asarray(state.weight_norms[sites[path]])
        np.testing.assert_allclose(noise.var(axis=0).mean(), variance.mean(), rtol=0.3)
        assert not np.allclose(np.asarray(two), np.asarray(one))  # fresh noise each step
    assert seen == len(sites)


def test_dylora_draws_a_rank_every_step(checkpoint, tmp_path):
    """--method dylora trains the nested truncation at a rank drawn each step (inside the one
    compiled step, from the step's key), as the reference does: in the default frozen mode only
    the drawn component gets a gradient, so after a few steps several rows of B (zero at init)
    have moved, not just the last one (r_max). Evaluation and the export are at r_max."""
    from lowrank_jax import reparam

    model, data = checkpoint
    out = str(tmp_path / "dylora")
    cfg = FinetuneConfig(model=model, data=data, out=out, method="dylora", rank=4, lr=1e-2,
                         steps=6, batch_size=2, max_seq_len=64)  # fmt: skip
    result = finetune(cfg, **QUIET)
    adapters = reparam.adapters_of(result.model)
    assert len(adapters.sites) == 14
    for path, arrays in adapters.trainable.items():
        moved = np.flatnonzero(np.any(np.asarray(arrays["B"]) != 0, axis=-1))
        assert len(moved) > 1, (path, moved)
        assert int(adapters.frozen[path]["b"]) == 4, path  # the model it returns: at r_max
    summary = _records(out)[-1]
    assert summary["val_loss"] < summary["val_loss_before"]
    # the saved adapter is at r_max too: it reloads with the returned model's logits
    reloaded, _ = load_with_adapter(model, os.path.join(out, "adapter"))
    tokens = _tokens(result.tokenizer)
    np.testing.assert_allclose(
        np.asarray(forward(reloaded, tokens)), np.asarray(forward(result.model, tokens)), atol=1e-5
    )


@pytest.mark.parametrize(
    "method, api",
    [("sora", "reparam.sora_optimizer"), ("adalora", "reparam.AdaLoRASchedule"),
     ("increlora", "reparam.IncreLoRASchedule")],
)  # fmt: skip
def test_adapters_with_a_schedule_finetune_does_not_run_are_refused(
    checkpoint, tmp_path, capsys, method, api
):
    """SoRA, AdaLoRA and IncreLoRA need a per-step schedule of their own: refused with one
    line naming the method and the APIs that train it, never trained without it."""
    model, data = checkpoint
    err = _error(["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "o"),
                  "--steps", "1", "--method", method], capsys)  # fmt: skip
    assert f"--method {method}: finetune does not run" in err and api in err
    assert f"experiments/finetune.py --methods {method}" in err
    assert not os.path.exists(tmp_path / "o")


def test_owlore_without_probs_calibrates_them_on_training_rows(
    checkpoint, tmp_path, capsys, monkeypatch
):
    from lowrank_jax.models import owlore_probabilities
    from lowrank_jax.models.pretrained import load_pretrained
    from lowrank_jax.train.config import ConfigError
    from lowrank_jax.train.finetune import _pack

    model, data = checkpoint
    out = str(tmp_path / "owlore")
    argv = ["finetune", "--model", model, "--data", data, "--out", out, "--method", "owlore",
            "--rank", "4", "--steps", "2", "--batch-size", "2", "--max-seq-len", "64",
            "--calibration-rows", "3", "--opt", "n_active=1", "--opt", "interval=1"]  # fmt: skip
    assert main(argv) == 0
    assert "owlore: layer probabilities from 3 calibration rows (m = 5)" in capsys.readouterr().out
    records = _records(out)
    calibration = next(r["owlore"] for r in records if "owlore" in r and "summary" not in r)
    assert records[-1]["owlore"] == calibration
    assert calibration["calibration_rows"] == 3 and calibration["m"] == 5.0
    # the library's probabilities of the pretrained model on the first three training rows
    base, tokenizer = load_pretrained(model)
    cfg = FinetuneConfig(model=model, data=data, out=out, max_seq_len=64)
    batch = _pack(cfg, tokenizer)[0].batch(np.arange(3))
    segments = jnp.asarray(batch["segment_ids"])
    probs, scores = owlore_probabilities(
        base, jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), segments,
        mask=segments > 0,
    )  # fmt: skip
    assert len(probs) == len(base.layers) and min(probs) >= 0
    np.testing.assert_allclose(calibration["probs"], probs, rtol=1e-9)
    np.testing.assert_allclose(calibration["outlier_scores"], scores, rtol=1e-9)
    # explicit probabilities are used as given: nothing calibrated (the run stops once the
    # optimizer is built)
    from lowrank_jax.train import finetune as module

    built = []

    class Built(Exception):
        pass

    def optimizer(cfg, schedule, probs=None):
        built.append((cfg.options, probs))
        raise Built

    def calibration(*args):
        raise AssertionError("calibrated despite the given probs")

    monkeypatch.setattr(module, "_optimizer", optimizer)
    monkeypatch.setattr(module, "_owlore_calibration", calibration)
    cfg = FinetuneConfig(model=model, data=data, out=str(tmp_path / "given"), method="owlore",
                         max_seq_len=64, options={"probs": [0.25, 0.75]})  # fmt: skip
    with pytest.raises(Built):
        finetune(cfg, **QUIET)
    assert built == [({"probs": [0.25, 0.75]}, None)]
    with pytest.raises(ConfigError, match="--calibration-rows must be at least 1"):
        FinetuneConfig(model=model, data=data, out=out, calibration_rows=0).validate()
