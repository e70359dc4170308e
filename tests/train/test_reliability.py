"""Issue 12's rows for the trainer, each reproduced: a resumed run never changes silently, a
corrupt checkpoint is never trained on, non-finite steps are skipped and counted, and bad
settings, data and output folders are one line each."""

import gc
import os
import shutil

import numpy as np
import pytest

from lowrank_jax.train import RunConfig, TrainError, run_loop, train
from lowrank_jax.train.checkpoint import Checkpointer
from lowrank_jax.train.cli import main
from tests.train.runs import TINY, losses, lrs, records, tiny_flags


def _copy(full_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(full_run[0], out)
    return out


def _cli(capfd, *args):
    code = main(["train", *args])
    return code, capfd.readouterr().err.strip()


def _largest_array_file(step_dir):
    files = [
        os.path.join(folder, name)
        for folder, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
    ]
    return max(files, key=os.path.getsize)


def test_changed_steps_on_resume_is_an_identity_error(full_run, tmp_path, capfd):
    out = _copy(full_run, tmp_path)
    code, err = _cli(capfd, *tiny_flags(steps=8), "--out", out, "--resume")
    assert code == 2 and "\n" not in err
    assert "a run of --steps 6 (now 8): pass --extend to train on to step 8" in err
    assert max(losses(out)) == 6  # nothing trained


def test_extend_holds_the_minimum_after_a_finished_run(full_run, tmp_path):
    """The issue's row: --steps raised on --resume re-planned the cosine (lr jumped 6x)."""
    out = _copy(full_run, tmp_path)
    lines = []
    summary = train(
        RunConfig(out=out, resume=True, extend=True, **{**TINY, "steps": 9}), log=lines.append
    )
    rates = lrs(out)
    assert [rates[s] for s in range(1, 7)] == [lrs(full_run[0])[s] for s in range(1, 7)]
    np.testing.assert_allclose([rates[s] for s in (7, 8, 9)], 1e-3, rtol=1e-6)  # 0.01 * 0.1
    assert summary["step"] == 9 and all(np.isfinite(losses(out)[s]) for s in (7, 8, 9))
    saved = Checkpointer(os.path.join(out, "checkpoints")).read_meta(9)
    assert saved["steps"] == 9 and saved["schedule"] == [[0, 6], [6, 9]]
    # The extended run resumes as itself, without --extend.
    with pytest.raises(TrainError, match="already at step 9"):
        train(RunConfig(out=out, resume=True, **{**TINY, "steps": 9}), log=lines.append)


def test_bit_flip_in_the_latest_checkpoint_falls_back(full_run, tmp_path, capfd):
    """The issue's row: one flipped bit in an array file resumed onto garbage (loss = ln V)."""
    out = _copy(full_run, tmp_path)
    target = _largest_array_file(os.path.join(out, "checkpoints", "6"))
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    code, err = _cli(capfd, *tiny_flags(), "--out", out, "--resume")
    assert code == 0, err
    assert f"{target} fails its CRC-32 check" in err and "resuming from step 3" in err
    assert os.path.isdir(os.path.join(out, "checkpoints", "6.corrupt"))
    assert losses(out) == losses(full_run[0])  # steps 4-6 trained again, bitwise the same


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("listing", ["kept", "removed"])
def test_truncated_array_file_is_one_line(full_run, tmp_path, capfd, listing):
    """The issue's row: a garbled TensorStore repr and ~35 lines of asyncio tracebacks."""
    out = _copy(full_run, tmp_path)
    shutil.rmtree(os.path.join(out, "checkpoints", "3"))  # no older checkpoint to fall back to
    step_dir = os.path.join(out, "checkpoints", "6")
    target = _largest_array_file(step_dir)
    os.truncate(target, os.path.getsize(target) // 3)
    if listing == "removed":  # as if killed before files.json: orbax meets the short file
        os.remove(os.path.join(step_dir, "files.json"))
    code, err = _cli(capfd, *tiny_flags(), "--out", out, "--resume")
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith(f"lowrank-jax: error: checkpoint {step_dir} cannot be restored")
    assert f"delete {step_dir} to start the run over" in err
    if listing == "kept":
        assert f"{target} has " in err
    else:  # orbax's own error, reduced to its root cause: the array and the file
        assert "OUT_OF_RANGE: Error reading" in err
    for noise in ("Traceback", "asyncio", "'driver'", "TensorStore", "Future exception"):
        assert noise not in err
    gc.collect()  # orbax's abandoned reads are finalised quietly (an unraisable would fail)


class _Poisoned(run_loop.BatchIterator):
    """Batches number ``BAD`` get an out-of-vocabulary token (NaN logits)."""

    BAD: set = set()

    def __next__(self):
        batch = super().__next__().copy()
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls in self.BAD:
            batch[0, 0] = 10**6
        return batch


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_when_they_persist(
    tmp_path, monkeypatch
):
    """The issue's row: NaN/inf in one gradient poisoned every later update. Batch 2 is bad
    (skipped, the run goes on), then batches 4 to 6 (the third in a row stops the run)."""
    monkeypatch.setattr(run_loop, "BatchIterator", _Poisoned)
    monkeypatch.setattr(_Poisoned, "BAD", {2, 4, 5, 6})
    out, warnings = str(tmp_path / "nan"), []
    cfg = RunConfig(out=out, max_skipped_steps=2, **TINY)
    with pytest.raises(TrainError) as err:
        train(cfg, log=lambda _: None, warn=warnings.append)
    text = str(err.value)
    assert text.startswith("3 steps in a row (steps 4-6) had a non-finite loss")
    assert "--max-skipped-steps 2" in text and "\n" not in text
    assert text.endswith(f"the last checkpoint is {os.path.join(out, 'checkpoints', '3')}")
    lines = {r["step"]: r for r in records(out) if "loss" in r and not r.get("summary")}
    assert lines[2]["skipped"] is True and lines[2]["loss"] is None
    assert [lines[s]["skipped_steps"] for s in range(1, 7)] == [0, 1, 1, 2, 3, 4]
    assert "skipped" not in lines[3] and np.isfinite(lines[3]["loss"])  # trained on after one
    evals = [r["val_loss"] for r in records(out) if "val_loss" in r]
    assert len(evals) == 1 and np.isfinite(evals[0])  # step 3's evaluation
    assert [w.split(":")[0] for w in warnings] == ["step 2", "step 4", "step 5", "step 6"]
    assert warnings[0].startswith("step 2: the loss, a gradient or an update is not finite")


def test_a_sequence_far_too_long_for_memory_is_refused_before_allocating(tmp_path, capfd):
    """The issue's row: --seq-len 100000 died with a RESOURCE_EXHAUSTED traceback (2 TB)."""
    out = str(tmp_path / "long")
    code, err = _cli(
        capfd, "--model", "llama_tiny", "--seq-len", "100000", "--batch-size", "2",
        "--steps", "2", "--out", out, "--no-progress",
    )  # fmt: skip
    last = err.splitlines()[-1]  # XLA may log its own warnings about the huge constants first
    assert code == 2 and last.startswith("lowrank-jax: error: --batch-size 2 x --seq-len 100000")
    assert "needs about" in last and "lower --seq-len or --batch-size" in last
    assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err
    assert os.listdir(os.path.join(out, "checkpoints")) == []


def test_out_that_is_a_file_or_not_writable(tmp_path, capfd, monkeypatch):
    (tmp_path / "taken").write_text("a file")
    code, err = _cli(capfd, *tiny_flags(), "--out", str(tmp_path / "taken"))
    assert code == 2 and err == (
        f"lowrank-jax: error: --out {tmp_path / 'taken'} is a file, not a directory; "
        "choose another --out"
    )
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    root = os.geteuid() == 0
    if root:  # root writes anywhere: make creating the folder fail as on a read-only mount
        def refuse(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", path)

        monkeypatch.setattr(os, "makedirs", refuse)
    try:
        code, err = _cli(capfd, *tiny_flags(), "--out", str(locked / "run"))
    finally:
        locked.chmod(0o755)
    assert code == 2 and err.count("\n") == 0
    if root:
        assert f"--out {locked / 'run'}: cannot create it (Permission denied)" in err
    else:
        assert f"--out {locked / 'run'}: {locked} is not writable" in err


def test_config_file_values_are_typed_and_checked_before_out_is_written(tmp_path, capfd):
    """The issue's row: YAML's `lr: 1e-3` is a string to PyYAML; the crash came after --out."""
    good = tmp_path / "good.yaml"
    good.write_text("lr: 1e-3\nweight_decay: 1e-2\nmin_lr_ratio: 5e-2\nwarmup: 2\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("weight_decay: tiny\n")
    out = tmp_path / "never"
    code, err = _cli(capfd, "--config", str(bad), *tiny_flags(), "--out", str(out))
    assert code == 2 and err == (
        f"lowrank-jax: error: --config {bad}: weight_decay must be a number, got 'tiny' (str)"
    )
    assert not out.exists()
    from lowrank_jax.train.cli import _config, build_parser

    cfg = _config(build_parser().parse_args(["train", "--config", str(good)]))
    assert (cfg.lr, cfg.weight_decay, cfg.min_lr_ratio, cfg.warmup) == (1e-3, 1e-2, 5e-2, 2)


def test_a_setting_given_twice_is_an_error_naming_both(tmp_path, capfd):
    """The issue's row: `--rank 16 --opt rank=4` trained at rank 4; config.json said 16."""
    out = tmp_path / "never"
    code, err = _cli(capfd, *tiny_flags(), "--rank", "16", "--opt", "rank=4", "--out", str(out))
    assert code == 2 and err == (
        "lowrank-jax: error: --opt rank=4 sets what --rank sets (now 16): give the setting "
        "once, as --rank"
    )
    config = tmp_path / "run.toml"
    config.write_text("rank = 16\n[optimizer_options]\nscale = 0.5\n")
    code, err = _cli(capfd, "--config", str(config), *tiny_flags(), "--out", str(out))
    assert code == 2 and "--opt scale=0.5 sets what --galore-scale sets" in err
    assert not out.exists()


def test_data_folder_without_text_files_and_binary_data(tmp_path, capfd):
    """The issue's rows: a folder of .py files said "no such file"; NUL bytes trained."""
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "a.py").write_text("print('hello')\n" * 50)
    code, err = _cli(capfd, *tiny_flags(), "--data", str(code_dir), "--out", str(tmp_path / "r"))
    assert code == 2 and err.count("\n") == 0
    assert "the directory has no *.txt files" in err and f"'{code_dir}/**/*.py'" in err
    nul = tmp_path / "zeros.txt"
    nul.write_bytes(b"\x00" * 4096)
    code, err = _cli(capfd, *tiny_flags(), "--data", str(nul), "--out", str(tmp_path / "r"))
    assert code == 2 and err == (
        f"lowrank-jax: error: --data: {nul} is not a text file (a NUL byte at offset 0: binary "
        "data); remove it or narrow --data to text files"
    )


def test_without_the_guard_a_nonfinite_step_stops_the_run_before_saving(tmp_path, monkeypatch):
    """``--no-skip-nonfinite`` (GaLore's leaner ordinary step): batch 5 is bad; the run stops
    at step 5 naming the step-3 checkpoint, which is intact, and no later one is written."""
    monkeypatch.setattr(run_loop, "BatchIterator", _Poisoned)
    monkeypatch.setattr(_Poisoned, "BAD", {5})
    out = str(tmp_path / "unguarded")
    with pytest.raises(TrainError) as err:
        train(RunConfig(out=out, skip_nonfinite=False, **TINY), log=lambda _: None)
    text = str(err.value)
    assert text.startswith("step 5: the loss or a gradient is not finite") and "\n" not in text
    assert "--no-skip-nonfinite" in text
    assert f"The last checkpoint is {os.path.join(out, 'checkpoints', '3')}" in text
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["3"]
    lines = {r["step"]: r for r in records(out) if "loss" in r and not r.get("summary")}
    assert sorted(lines) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in lines.values())
