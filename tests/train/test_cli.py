"""``lowrank-jax train`` end to end at tiny sizes: metrics, exact resume, errors, kill -9."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lowrank_jax.train import RunConfig, TrainError, train
from lowrank_jax.train.cli import main
from tests.train.runs import TINY
from tests.train.runs import losses as _losses
from tests.train.runs import records as _records


def test_metrics_file_and_report(full_run):
    out, summary, lines = full_run
    records = _records(out)
    assert all("step" in r for r in records)
    assert [r["step"] for r in records if "loss" in r and not r.get("summary")] == list(range(1, 7))
    evals = [r for r in records if "val_loss" in r and not r.get("summary")]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(r["val_ppl"] == pytest.approx(np.exp(r["val_loss"])) for r in evals)
    assert records[-1] == summary and summary["summary"] is True
    assert summary["peak_memory_bytes"] > 0 and "RSS" in summary["peak_memory_source"]
    assert summary["tokens_per_s"] > 0
    assert 0 < summary["opt_state_bytes"] < summary["adamw_state_bytes"]
    assert summary["checkpoint"].endswith(os.path.join("checkpoints", "6"))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["3", "6"]
    report = "\n".join(lines)
    assert "perplexity" in report and "AdamW" in report and summary["checkpoint"] in report
    # each evaluation's line goes to ``log`` too (before the report), not straight to stdout
    assert [line for line in lines if line.startswith("step ")] == [
        f"step {r['step']}: val_loss {r['val_loss']:.4f}, val_ppl {r['val_ppl']:.2f}" for r in evals
    ]


def test_train_without_a_log_prints_nothing(tmp_path, capfd):
    train(RunConfig(out=str(tmp_path / "run"), **{**TINY, "steps": 2, "eval_every": 1}),
          log=None)  # fmt: skip
    out, err = capfd.readouterr()
    assert "val_loss" not in out and "val_loss" not in err and "perplexity" not in out


def test_resume_is_bitwise_exact(full_run, tmp_path):
    full_out, full_summary, _ = full_run
    out = str(tmp_path / "interrupted")
    train(RunConfig(out=out, stop_at=3, **TINY), log=lambda _: None)
    assert max(_losses(out)) == 3
    resumed = train(RunConfig(out=out, resume=True, **TINY), log=lambda _: None)
    assert _losses(out) == _losses(full_out)  # float equality, every step
    assert resumed["val_loss"] == full_summary["val_loss"]
    assert [r for r in _records(out) if r.get("summary")] == [_records(out)[-1]]


def test_refuses_to_mix_runs(full_run):
    out, _, _ = full_run
    with pytest.raises(TrainError, match="already has checkpoints.*--resume"):
        train(RunConfig(out=out, **TINY), log=lambda _: None)
    with pytest.raises(TrainError, match="already at step 6; raise --steps"):
        train(RunConfig(out=out, resume=True, **TINY), log=lambda _: None)


def _cli(capsys, *args):
    code = main(["train", *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "llama_3b"], "unknown model 'llama_3b'; choose one of: llama_tiny, llama_20m"),
        (["--optimizer", "lamb"], "unknown optimizer 'lamb'; choose one of: adamw"),
        (["--data", "/no/such/dir/*.txt"], "no such file, directory or matching files"),
        (["--data", "EMPTY"], "the corpus is empty"),
        (["--data", "SMALL", "--seq-len", "4096"], "fewer than one sequence of --seq-len 4096"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--config", "/no/such.toml"], "no such file"),
        (["--layerwise"], "--layerwise walks the stacked layers: add --scan-layers"),
        (["--layerwise", "--scan-layers"], "add --clip-per-layer, or --grad-clip 0"),
        (["--clip-per-layer"], "--clip-per-layer goes with --layerwise"),
        (
            ["--layerwise", "--scan-layers", "--grad-clip", "0", "--optimizer", "lisa",
             "--model", "llama_tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16"],
            "--layerwise: ",
        ),
    ],
)
def test_cli_errors_are_one_line(capsys, tmp_path, flags, message):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "small.txt").write_text("a small corpus of a few words")
    flags = [
        {"EMPTY": str(tmp_path / "empty.txt"), "SMALL": str(tmp_path / "small.txt")}.get(f, f)
        for f in flags
    ]
    code, err = _cli(capsys, "--out", str(tmp_path / "run"), "--no-progress", *flags)
    assert code == 2
    assert err.startswith("lowrank-jax: error: ") and message in err
    assert "\n" not in err and "Traceback" not in err


def _garble_step(root):
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"\x00corrupt")


def test_cli_incompatible_and_corrupt_checkpoints(full_run, capsys, tmp_path):
    out, _, _ = full_run
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", out, str(copy)], check=True)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"]
    code, err = _cli(capsys, *flags, "--out", str(copy), "--resume", "--rank", "4", "--no-progress")
    assert code == 2 and "incompatible run: rank=None (now 4)" in err and "\n" not in err
    # Every checkpoint garbled: one line naming them and what to delete; nothing trained.
    # (One garbled, the run falls back: test_reliability.py's bit-flip test.)
    _garble_step(copy / "checkpoints" / "3")
    _garble_step(copy / "checkpoints" / "6")
    code, err = _cli(capsys, *flags, "--out", str(copy), "--resume", "--no-progress")
    assert code == 2 and "\n" not in err and "checkpoints/6" in err and "checkpoints/3" in err
    assert "no intact checkpoint" in err and f"delete {copy / 'checkpoints'}" in err


def test_kill_during_checkpointing_then_resume(tmp_path, compilation_cache):
    out = tmp_path / "killed"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("In the beginning was the word, and the word was with God. " * 200)
    flags = (
        "--model llama_tiny --steps 12 --batch-size 2 --seq-len 16 --scan-layers "
        "--checkpoint-every 1 --keep-checkpoints 2 --eval-every 1000 --update-proj-gap 1000 "
        "--no-progress"
    )
    cmd = [sys.executable, "-m", "lowrank_jax.train.cli", "train", *flags.split()]
    cmd += ["--data", str(corpus), "--out", str(out)]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=compilation_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    checkpoints = out / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.exists() and any(p.name == "3" for p in checkpoints.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)  # most of a step here is the checkpoint write
    proc.wait()
    proc.stderr.close()
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout
    steps = [r["step"] for r in _records(out) if "loss" in r and not r.get("summary")]
    assert steps == list(range(1, 13))
    assert _records(out)[-1]["summary"] and _records(out)[-1]["step"] == 12
    assert not any("tmp" in p.name for p in checkpoints.iterdir())


def test_optimizer_options_reach_the_optimizer(tmp_path, capsys):
    from lowrank_jax.train.cli import _config, build_parser

    args = build_parser().parse_args(
        ["train", "--opt", "basis=randomized", "--opt", "eps=1e-7", "--opt", "on_refresh=reset"]
    )
    assert _config(args).optimizer_options == {
        "basis": "randomized", "eps": 1e-7, "on_refresh": "reset"
    }
    out = str(tmp_path / "bad")
    assert main(["train", "--model", "llama_tiny", "--steps", "2", "--out", out,
                 "--no-progress", "--opt", "bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bogus" in err and "--opt" in err


def test_layerwise_run_matches_the_ordinary_run(tmp_path):
    """``--layerwise --clip-per-layer`` trains; with clipping off it follows the ordinary run
    to float32 round-off (``tests/train/test_layerwise.py`` checks the step itself)."""
    common = dict(TINY, scan_layers=True, grad_clip=0.0, steps=4, eval_every=4,
                  checkpoint_every=4)  # fmt: skip
    a, b = str(tmp_path / "ordinary"), str(tmp_path / "layerwise")
    train(RunConfig(out=a, **common), log=lambda _: None)
    train(RunConfig(out=b, layerwise=True, **common), log=lambda _: None)
    want, got = _losses(a), _losses(b)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)],
                               rtol=1e-5)  # fmt: skip
    c = str(tmp_path / "clipped")
    clipped = dict(common, grad_clip=1.0, layerwise=True, clip_per_layer=True)
    train(RunConfig(out=c, **clipped), log=lambda _: None)
    assert all(np.isfinite(list(_losses(c).values())))
    # a layer-wise run stopped after its step-2 checkpoint resumes bit for bit
    d = str(tmp_path / "resumed")
    train(RunConfig(out=d, stop_at=2, **dict(clipped, checkpoint_every=2)), log=lambda _: None)
    train(RunConfig(out=d, resume=True, **dict(clipped, checkpoint_every=2)), log=lambda _: None)
    assert _losses(d) == _losses(c)  # float equality, every step
