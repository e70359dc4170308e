"""The layer-wise and TPU-compile benchmarks at tiny size (the README's tables come from them at
full size)."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layerwise_step_benchmark_reports_time_and_memory(tmp_path):
    out = tmp_path / "lw.json"
    result = _load("layerwise_step").main(
        ["--model", "llama_tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "1",
         "--rounds", "2", "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text())["results"].keys() == {"adamw", "galore"}
    for row in result["results"].values():
        assert row["time_ratio_layerwise_vs_ordinary"] > 0
        assert row["layerwise_temp_bytes"] < row["ordinary_temp_bytes"]


@pytest.mark.parametrize("target", ["cpu"])
def test_step_memory_benchmark_on_the_cpu(tmp_path, target):
    out = tmp_path / "rows.json"
    rows = _load("tpu_compile").main(
        ["--models", "llama_tiny", "--optimizers", "sgd,galore_randomized", "--target", target,
         "--modes", "layerwise", "--dtype", "float32", "--seq-len", "16", "--out", str(out)]
    )  # fmt: skip
    assert [(r["optimizer"], r["mode"]) for r in rows] == [
        ("sgd", "layerwise"), ("galore_randomized", "layerwise")
    ]
    assert json.loads(out.read_text()) == rows
    assert all(r["peak_bytes"] > r["param_bytes"] for r in rows)
