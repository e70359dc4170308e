"""Sharded and multi-process training: ``--mesh`` runs equal the one-device run, checkpoints
restore onto another mesh, and two processes (``jax.distributed``) equal one."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from lowrank_jax.train import RunConfig, train
from lowrank_jax.train.config import ConfigError

pytestmark = pytest.mark.usefixtures("eight_devices")

TINY = dict(
    model="llama_tiny",
    steps=4,
    batch_size=4,
    seq_len=16,
    eval_every=2,
    eval_batches=1,
    checkpoint_every=2,
    progress=False,
    update_proj_gap=2,
    # GaLore with a seeded random basis: the SVD of a real gradient at this size has nearly
    # tied singular values, so float32 round-off differences between meshes (the order of
    # the reductions) rotate its basis, and Adam in the rotated coordinates amplifies that:
    # with basis="svd" the losses agree to ~3e-3, with AdamW or a random basis to 1e-7.
    optimizer_options={"basis": "random"},
)


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(out):
    return [r["loss"] for r in _records(out) if "loss" in r and not r.get("summary")]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one"))
    train(RunConfig(out=out, **TINY), log=lambda _: None)
    return _losses(out)


@pytest.mark.parametrize("mesh", ["4x2"])
def test_mesh_run_equals_one_device(one_device, tmp_path, mesh):
    out = str(tmp_path / "mesh")
    summary = train(RunConfig(out=out, mesh=mesh, **TINY), log=lambda _: None)
    np.testing.assert_allclose(_losses(out), one_device, rtol=2e-5)
    assert summary["val_loss"] is not None and np.isfinite(summary["val_loss"])


def test_resume_on_another_mesh(one_device, tmp_path):
    """Saved on a 4x2 mesh at step 2, restored onto 2x4 (orbax reshards on restore)."""
    out = str(tmp_path / "resharded")
    train(RunConfig(out=out, mesh="4x2", stop_at=2, **TINY), log=lambda _: None)
    lines = []
    train(RunConfig(out=out, mesh="2x4", resume=True, **TINY), log=lines.append)
    assert any("resuming from" in line for line in lines)
    np.testing.assert_allclose(_losses(out), one_device, rtol=2e-5)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(mesh="3x2"), "fsdp=3 x tensor=2"),
        (dict(mesh="8x1", batch_size=4), "divisible by the mesh's fsdp size 8"),
        (dict(mesh="4by2"), "--mesh must be 'auto' or FSDPxTP"),
        (dict(num_processes=2), "--num-processes and --process-id go together"),
    ],
)
def test_mesh_errors(tmp_path, changes, message):
    cfg = {**TINY, **changes}
    with pytest.raises(ConfigError, match=message):
        train(RunConfig(out=str(tmp_path / "bad"), **cfg), log=lambda _: None)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(one_device, tmp_path, compilation_cache):
    """Two CPU processes on localhost (2 devices each, a 4x1 mesh) via jax.distributed."""
    out = tmp_path / "two"
    flags = [
        "--model", "llama_tiny", "--steps", "4", "--batch-size", "4", "--seq-len", "16",
        "--eval-every", "2", "--eval-batches", "1", "--checkpoint-every", "2",
        "--update-proj-gap", "2", "--opt", "basis=random", "--no-progress",
        "--mesh", "4x1", "--out", str(out),
        "--coordinator", f"localhost:{_free_port()}", "--num-processes", "2",
    ]  # fmt: skip
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COMPILATION_CACHE_DIR=compilation_cache,
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lowrank_jax.train.cli",
                "train",
                *flags,
                "--process-id",
                str(i),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    assert "validation loss" in results[0][0]  # process 0 reports, process 1 does not
    assert "val_loss" not in results[1][0] and "validation" not in results[1][0]
    np.testing.assert_allclose(_losses(str(out)), one_device, rtol=2e-5)
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "4"]
