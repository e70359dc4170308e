"""Smoke run of ``experiments/finetune.py`` at a tiny size: the JSON and table it writes, the
parameter and optimizer-state accounting, and that every method's loss goes down."""

import json

from lowrank_jax.models import get_config


def test_finetune_experiment_tiny(tmp_path, capsys):
    from experiments import finetune

    out = tmp_path / "finetune.json"
    pretrained = tmp_path / "pretrained"
    result = finetune.main(["--tiny", "--pretrained", str(pretrained), "--out", str(out)])
    assert "pre-training llama_tiny" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["python"] and len(saved["domain"]["sha256"]) == 64
    assert saved["domain"]["modules"] == list(finetune.PYTHON_MODULES)
    assert saved["pretrained"]["model"] == "llama_tiny"
    assert saved["pretrained"]["steps"] == finetune.SIZES["tiny"]["pretrain_steps"]

    rows = saved["methods"]
    assert list(rows) == list(finetune.METHODS)
    for name, row in rows.items():
        assert row["lr"] == finetune.LEARNING_RATES["tiny"][name]
        assert len(row["losses"]) == finetune.SIZES["tiny"]["steps"]
        assert row["train_loss_last"] < row["train_loss_first"], name
        assert row["val_loss_after"] < row["val_loss_before"], name
        assert row["kjv_val_loss_after"] > 0 and row["seconds"] > 0

    # Every method starts from the pretrained model (LoRA/DoRA are no-ops at init, PiSSA's
    # residual base plus its adapter equals the weight).
    base = saved["pretrained"]["domain_val_loss"]
    for row in rows.values():
        assert abs(row["val_loss_before"] - base) < 1e-3

    # Trainable parameters: everything for full/GaLore, r(in + out) per matrix for LoRA/PiSSA,
    # plus one magnitude per output column for DoRA.
    cfg = get_config("llama_tiny")
    rank = finetune.SIZES["tiny"]["rank"]
    h, m = cfg.hidden_size, cfg.intermediate_size
    shapes = [(h, h)] * 4 + [(h, m)] * 2 + [(m, h)]
    lora = cfg.num_layers * sum(rank * (i + o) for i, o in shapes)
    columns = cfg.num_layers * sum(o for _, o in shapes)
    total = saved["pretrained"]["params"]
    assert rows["full"]["trainable_params"] == rows["galore"]["trainable_params"] == total
    assert rows["lora"]["trainable_params"] == rows["pissa"]["trainable_params"] == lora
    assert rows["dora"]["trainable_params"] == lora + columns

    # Optimizer state: AdamW keeps two float32 moments per trainable parameter (plus counters);
    # GaLore's low-rank moments and projectors are smaller than full AdamW's.
    for name in ("full", "lora", "dora", "pissa"):
        moments = 8 * rows[name]["trainable_params"]
        assert moments <= rows[name]["opt_state_bytes"] < moments + 64, name
    assert rows["galore"]["opt_state_bytes"] < rows["full"]["opt_state_bytes"] / 4
    assert rows["full"]["time_ratio"] == 1.0

    lines = saved["table"].splitlines()
    assert len(lines) == 3 + len(finetune.METHODS)
    assert all(line.count("|") == 8 for line in lines)
    assert lines[2].startswith("| pretrained")


def test_finetune_experiment_runs_the_lora_family(tmp_path):
    """``--methods`` takes the rest of the family (:data:`FAMILY`), at LoRA's learning rate:
    each row trains (the held-out loss falls) and counts its own trainable arrays."""
    from experiments import finetune

    out = tmp_path / "family.json"
    saved = finetune.main(["--tiny", "--pretrained", str(tmp_path / "pre"), "--out", str(out),
                           "--methods", "lora", "wegeft", "loldu"])  # fmt: skip
    rows = saved["methods"]
    assert list(rows) == ["lora", "wegeft", "loldu"]
    for name, row in rows.items():
        assert row["lr"] == finetune.LEARNING_RATES["tiny"]["lora"], name
        assert row["val_loss_after"] < row["val_loss_before"], name
    # LoLDU trains a diagonal and a scale per matrix: far fewer values than LoRA's factors
    assert 0 < rows["loldu"]["trainable_params"] < rows["lora"]["trainable_params"] / 50
    assert json.loads(out.read_text())["methods"].keys() == rows.keys()
