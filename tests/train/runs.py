"""What the trainer tests share: the tiny run settings and readers of ``metrics.jsonl``.

Every test that trains uses ``TINY`` (changing only what it tests), so the compiled steps are
cache hits of each other (see ``conftest.py``)."""

import json
import os

TINY = dict(
    model="llama_tiny",
    steps=6,
    batch_size=2,
    seq_len=16,
    eval_every=3,
    eval_batches=2,
    checkpoint_every=3,
    progress=False,
    update_proj_gap=4,
)


def tiny_flags(**changes):
    """``TINY`` (with ``changes``) as ``lowrank-jax train`` flags."""
    flags = []
    for key, value in {**TINY, **changes}.items():
        if key != "progress":
            flags.append(f"--{key.replace('_', '-')}={value}")
    return flags + ["--no-progress"]


def records(out):
    """Every line of ``out/metrics.jsonl``."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    """``{step: loss}`` of the training lines."""
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r and not r.get("summary")}


def lrs(out):
    """``{step: lr}`` of the training lines."""
    return {r["step"]: r["lr"] for r in records(out) if "lr" in r and not r.get("summary")}
