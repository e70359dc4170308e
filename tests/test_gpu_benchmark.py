"""benchmarks/gpu.py at tiny size on the CPU: every section runs and reports what it can."""

import importlib.util
import json
import pathlib

import pytest

PATH = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("benchmark_gpu", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_covers_every_section(gpu, tmp_path):
    out = tmp_path / "gpu.json"
    # two methods, one layer and AdamW in the capped child: compile time is the cost here
    argv = ["--tiny", "--methods", "AdamW,GaLore,no_such_method", "--num-layers", "1"]
    argv += ["--cap-method", "adamw"]
    results = gpu.main([*argv, "--out", str(out)])
    assert json.loads(out.read_text())["cap"]["largest"] == "llama_tiny"
    assert results["device"]["platform"] == "cpu"
    assert any(n.startswith("no_such_method: skipped") for n in results["notes"])

    rows = results["train"]["llama_tiny"]
    assert set(rows) == {"AdamW", "GaLore"} and all(r["ok"] for r in rows.values())
    assert rows["AdamW"]["ratio_vs_adamw"] == 1.0 and rows["GaLore"]["ratio_vs_adamw"] > 0
    for row in rows.values():  # CPU: no absolute throughput, no allocator peak
        assert "tokens_per_s" not in row and row["peak_bytes"] is None

    kernels = results["kernels"]["llama_tiny"]
    assert kernels["ok"], kernels
    assert set(kernels["methods"]) == set(gpu.KERNEL_METHODS)
    for row in kernels["methods"].values():
        assert row["reference"]["kernels_pallas_calls"] == 0
        assert row["reference"]["optimizer_pallas_calls"] == 0
        assert row["interpret"]["kernels_pallas_calls"] > 0  # the kernels ran (interpreted)
        assert row["interpret"]["optimizer_step_s"] > 0

    cap = results["cap"]  # one subprocess with the memory fraction set
    assert cap["configs"]["llama_tiny"]["ok"] and cap["mem_fraction"] == "1.0000"
    assert "not enforced" in cap["note"]


def test_cap_search_sets_the_fraction_and_stops_at_the_first_failure(gpu):
    args = gpu.parse(["--cap-gb", "24"])
    seen = []

    def run_capped(spec, env):
        seen.append((spec["model"], env["XLA_PYTHON_CLIENT_MEM_FRACTION"]))
        fits = spec["model"] in ("llama_60m", "llama_130m")
        return {"ok": fits, "oom": not fits, "peak_bytes": 1 << 30 if fits else None}

    cap = gpu.cap_section(args, run_capped, 80 * 10**9, list(gpu.CAP_CONFIGS))
    assert cap["largest"] == "llama_130m"
    assert seen == [("llama_60m", "0.3000"), ("llama_130m", "0.3000"), ("llama_350m", "0.3000")]
    assert "note" not in cap


def test_a_failed_measurement_is_reported_and_out_of_memory_flagged(gpu, monkeypatch):
    def oom(spec):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3 GiB")

    monkeypatch.setattr(gpu, "measure_training", oom)
    result = gpu.run_spec({"kind": "train"})
    assert result == {"ok": False, "oom": True, "error": result["error"]}
    assert result["error"].startswith("RuntimeError: RESOURCE_EXHAUSTED")
