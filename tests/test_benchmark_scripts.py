"""The layer-wise and TPU-compile benchmarks at tiny size (the README's tables come from them at
full size)."""

import importlib.util
import json
import math
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


VS_TORCH_TINY = ["--model", "llama_tiny", "--vocab-size", "259", "--batch-size", "2",
                 "--seq-len", "16", "--warmup", "1", "--steps", "1", "--rounds", "1"]  # fmt: skip


def test_vs_torch_benchmark_reports_our_side_alone(tmp_path):
    out = tmp_path / "vs.json"
    result = _load("vs_torch").main(
        [*VS_TORCH_TINY, "--methods", "lora", "--no-torch", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == result
    assert result["torch"] is None and list(result["results"]) == ["lora"]
    for row in result["results"].values():
        assert row["torch"] is None and row["torch_skipped"] == "--no-torch"
        assert row["ours"]["tokens_per_s"]["best"] > 0
        assert abs(row["ours"]["first_loss"] - math.log(259)) < 0.5  # random init: ~ln(vocab)


_PEER = ("torch", "transformers")


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in _PEER),
    reason="torch or transformers is not installed: the PyTorch half of "
    "benchmarks/vs_torch.py cannot run (our half is tested above)",
)
def test_vs_torch_benchmark_against_the_torch_stack(tmp_path):
    result = _load("vs_torch").main(
        [*VS_TORCH_TINY, "--methods", "adamw", "--out", str(tmp_path / "vs.json")]
    )
    assert result["torch"]["torch"]
    for method, row in result["results"].items():
        assert row["torch"]["name"] == _load("vs_torch").PEER_NAMES[method]
        # same shape, same batch: both sides start at the loss of a uniform guess
        assert abs(row["torch"]["first_loss"] - row["ours"]["first_loss"]) < 0.5
        ours, theirs = row["ours"]["tokens_per_s"], row["torch"]["tokens_per_s"]
        assert row["ratio_ours_vs_torch"]["median"] == pytest.approx(
            ours["median"] / theirs["median"]
        )


def test_lora_step_benchmark_times_the_three_programs(tmp_path):
    """The LoRA-overhead benchmark (issue 11's adapter-path target) at tiny size: the base
    forward + backward, LoRA's, and the fine-tuning step, as ratios to the first."""
    out = tmp_path / "lora.json"
    record = _load("lora_step").main(
        ["--tiny", "--batch-size", "2", "--seq-len", "8", "--rounds", "2", "--steps", "1",
         "--out", str(out)]
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert results.keys() == {"base_fwd_bwd", "lora_fwd_bwd", "lora_step"}
    assert results["base_fwd_bwd"]["tokens_per_s_vs_base_fwd_bwd"] == 1.0
    assert all(len(r["seconds"]) == 2 and r["tokens_per_s"] > 0 for r in results.values())
    assert record["command"].startswith("python benchmarks/lora_step.py --tiny")


def test_svd_basis_benchmark_times_both_routes_and_checks_them_against_float64(tmp_path):
    out = tmp_path / "svd.json"
    result = _load("svd_basis").main(
        ["--model", "llama_tiny", "--repeats", "2", "--accuracy-steps", "0",
         "--run-dir", str(tmp_path / "run"), "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text()) == result
    rows = result["timing"]["shapes"]
    assert set(rows) == {"128x128", "128x344", "344x128"}
    assert {r["side"] for r in rows.values()} == {"in", "out"}
    assert all(r["svd_ms"] > 0 and r["gram_ms"] > 0 for r in rows.values())
    assert set(result["whole_refresh"]["ratio_to_svd"]) == {"gram", "svd", "randomized", "random"}
    # the default job's gradients at step 0, against a float64 SVD: LAPACK's float32 basis is
    # right, the Gram matrix's loses the vectors of small singular values (why svd stays)
    (first,) = result["accuracy"]["checkpoints"]
    assert first["step"] == 0
    assert first["svd_top16"]["max"] < 1e-2 and first["svd_top48"]["median"] < 1e-2
    assert first["gram_top64"]["median"] > 0.1 > 10 * first["svd_top64"]["median"]
