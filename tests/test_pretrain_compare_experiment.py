"""Smoke run of ``experiments/pretrain_compare.py`` at its quick size: the JSON, table and figure
it writes, the ratios to AdamW, the compiled step peaks (also re-measured by ``--peaks-only``),
and that every method's loss goes down."""

import json


def test_pretrain_compare_quick(tmp_path):
    from experiments import pretrain_compare

    out = tmp_path / "pretrain_compare.json"
    result = pretrain_compare.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    size = pretrain_compare.SIZES["quick"]
    assert saved["size"] == size and saved["seeds"] == [0]
    assert set(saved["not_run"]) == {"owlore", "sst"}

    rows = saved["methods"]
    assert list(rows) == list(pretrain_compare.QUICK_METHODS)
    for name, row in rows.items():
        assert row["finished"] == 1 and row["skipped_steps"] == 0, name
        assert row["val_loss_std"] == 0.0  # one seed
        (run,) = row["runs"]
        assert run["error"] is None and run["val_loss"] == row["val_loss_mean"]
        steps, val = row["val_curve"]
        assert steps == list(range(size["eval_every"], size["steps"] + 1, size["eval_every"]))
        assert val[-1] == row["val_loss_mean"] and val[-1] < val[0], name
        steps, train = row["train_curve"]
        assert steps == list(range(1, size["steps"] + 1))
        assert sum(train[-5:]) < sum(train[:5]), name
        assert abs(row["val_ppl"] - 2.718281828 ** row["val_loss_mean"]) < 1e-6 * row["val_ppl"]
        assert row["tokens_per_s"] > 0
        # AdamW's state on the same model (the run's AdamW also counts its schedule's step)
        assert 0 <= rows["adamw"]["opt_state_bytes"] - row["adamw_state_bytes"] < 64
        peak = row["step_memory"]
        assert peak["peak_bytes"] == (peak["argument_bytes"] + peak["output_bytes"]
                                      - peak["alias_bytes"] + peak["temp_bytes"])  # fmt: skip
        assert peak["argument_bytes"] > row["opt_state_bytes"] and peak["temp_bytes"] > 0
        assert row["step_peak_ratio"] == peak["peak_bytes"] / rows["adamw"]["step_memory"][
            "peak_bytes"]  # fmt: skip
    assert saved["step_memory_backend"] == "cpu"

    adamw, galore = rows["adamw"], rows["galore"]
    assert adamw["lr"] == 1e-3 and galore["lr"] == 1e-2  # the registered defaults
    assert adamw["state_ratio"] == adamw["throughput_ratio"] == 1.0
    assert galore["state_ratio"] == galore["opt_state_bytes"] / adamw["opt_state_bytes"] < 0.5
    assert galore["throughput_ratio"] == galore["tokens_per_s"] / adamw["tokens_per_s"]
    # the step's arguments differ by the optimizer states (same parameters and batch)
    a, g = adamw["step_memory"], galore["step_memory"]
    saved_state = adamw["opt_state_bytes"] - galore["opt_state_bytes"]
    assert abs(a["argument_bytes"] - g["argument_bytes"] - saved_state) < 64
    assert adamw["step_peak_ratio"] == 1.0 and galore["step_peak_ratio"] < 1.0

    lines = saved["table"].splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == 11 for line in lines)
    assert "step peak" in lines[0]

    # --peaks-only: the peaks of a JSON without them, measured again without training
    for row in saved["methods"].values():
        del row["step_memory"], row["step_peak_ratio"]
    out.write_text(json.dumps(saved))
    again = pretrain_compare.main(["--quick", "--out", str(out), "--peaks-only"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(again))
    assert again["table"] == result["table"]
    assert again["commands"][-1].endswith("--peaks-only")
    first = json.loads(json.dumps(result))["methods"]
    for name, row in again["methods"].items():
        assert row["step_memory"] == first[name]["step_memory"], name
        assert row["val_curve"] == first[name]["val_curve"], name  # untouched


def test_pretrain_compare_variants():
    from experiments.pretrain_compare import GAPS, RANK_DIVISORS, variants

    grid = variants(["adamw", "galore"], [0.5, 1.0, 2.0], None, 256)
    assert [(v.name, v.optimizer, v.lr_multiplier) for v in grid] == [
        ("adamw", "adamw", 1.0),
        ("adamw lr x0.5", "adamw", 0.5),
        ("adamw lr x2", "adamw", 2.0),
        ("galore lr x0.5", "galore", 0.5),
        ("galore", "galore", 1.0),
        ("galore lr x2", "galore", 2.0),
    ]
    ranks = variants(["galore", "lisa"], [1.0], "rank", 256)  # LISA has no rank: left out
    assert [v.rank for v in ranks] == [None] + [256 // d for d in RANK_DIVISORS]
    gaps = variants(["galore"], [1.0], "gap", 256)
    assert [v.update_proj_gap for v in gaps[1:]] == list(GAPS)
    assert gaps[0].name == "adamw"  # the reference is always run
