"""Smoke run of ``experiments/qlora.py`` at a tiny size: the JSON and table it writes, the
base-weight bytes (NF4 under 0.3x bfloat16), the compiled step's memory and the losses."""

import json

from lowrank_jax.models import get_config
from lowrank_jax.reparam import QuantConfig


def test_qlora_experiment_tiny(tmp_path, capsys):
    from experiments import qlora

    out = tmp_path / "qlora.json"
    methods = ["lora", "qlora", "qdora", "loftq"]
    result = qlora.main(["--tiny", "--pretrained", str(tmp_path / "pre"), "--out", str(out),
                         "--methods", *methods])
    assert "pre-training llama_tiny" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    rows = saved["methods"]
    assert list(rows) == methods
    size = qlora.SIZES["tiny"]

    cfg = get_config("llama_tiny")
    h, m = cfg.hidden_size, cfg.intermediate_size
    shapes = [(h, h)] * 4 + [(h, m)] * 2 + [(m, h)]
    elements = cfg.num_layers * sum(i * o for i, o in shapes)
    nf4 = cfg.num_layers * sum(QuantConfig().storage_bytes(s) for s in shapes)
    lora_params = cfg.num_layers * sum(size["rank"] * (i + o) for i, o in shapes)
    for name, row in rows.items():
        b = row["base_bytes"]
        assert b["float32"] == 4 * elements and b["bfloat16"] == 2 * elements
        assert b["stored"] == (4 * elements if name == "lora" else nf4)
        extra = cfg.num_layers * sum(o for _, o in shapes) if name == "qdora" else 0
        assert row["trainable_params"] == lora_params + extra
        assert len(row["losses"]) == size["steps"]
        assert row["step_temp_bytes"] > 0 and row["seconds"] > 0
    for name in ("qlora", "qdora", "loftq"):
        assert rows[name]["base_bytes"]["stored"] <= 0.3 * rows[name]["base_bytes"]["bfloat16"]
        # The frozen base shrinks the step's arguments by the float32 kernels it replaces.
        saved_bytes = 4 * elements - nf4
        assert rows[name]["step_argument_bytes"] < rows["lora"]["step_argument_bytes"] - (
            0.9 * saved_bytes
        )
        # One dequantized kernel at a time: with the memory-minimising scheduler the temp grows
        # by less than two of the largest float32 kernels (the whole base is 4 * elements).
        extra = (rows[name]["step_temp_bytes_memory_scheduler"]
                 - rows["lora"]["step_temp_bytes_memory_scheduler"])
        assert extra < 2 * 4 * h * m

    # Every method starts near the pretrained model (LoRA/DoRA are no-ops at init; the NF4
    # base moves the loss a little, LoftQ's factors absorb part of that) and the tiny
    # fine-tuning keeps QLoRA's loss within a few percent of LoRA's.
    base = saved["pretrained"]["domain_val_loss"]
    assert abs(rows["lora"]["val_loss_before"] - base) < 1e-3
    for name in ("qlora", "qdora", "loftq"):
        assert abs(rows[name]["val_loss_before"] - base) < 0.05 * base
        assert abs(rows[name]["val_loss_vs_lora"] - 1) < 0.03
    lines = saved["table"].splitlines()
    assert len(lines) == 3 + len(methods) and all(line.count("|") == 8 for line in lines)
