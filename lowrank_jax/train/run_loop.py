"""The step loop of a run (metrics, evaluation, checkpoints, skipped steps), its summary and its
report.

A step whose loss or gradients are not finite is skipped by the train step
(:func:`~lowrank_jax.train.step.make_train_step`: parameters and optimizer state unchanged);
the loop writes a metrics line for it (``"skipped": true``, a running ``skipped_steps`` count),
warns, and stops with :class:`TrainError` after more than ``--max-skipped-steps`` in a row.
With the guard off (``--no-skip-nonfinite``) a non-finite step stops the run at once, before
its state is saved.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from lowrank_jax import memory
from lowrank_jax.data import BatchIterator, Dataset, IteratorState
from lowrank_jax.train.config import RunConfig
from lowrank_jax.train.metrics import MetricsWriter, peak_memory, progress_bar
from lowrank_jax.train.step import TrainState

__all__ = ["TrainError", "evaluate", "report", "run_steps", "summarize"]


class TrainError(RuntimeError):
    """A run that cannot start or go on as asked (another run's checkpoints in ``--out``, too
    many non-finite steps in a row, ...)."""


class _NoMetrics:
    """What processes other than process 0 write metrics to."""

    resumed_records: list = []

    def write(self, record: dict) -> None:
        del record

    def close(self) -> None:
        pass


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def evaluate(
    eval_step: Callable, params: Any, val: np.ndarray, cfg: RunConfig, place: Callable
) -> float:
    """The trainer's validation loss: the mean of ``eval_step(params, batch)`` over the first
    ``eval_batches * batch_size`` held-out blocks ``val``, in batches of ``batch_size`` placed
    by ``place`` (each batch weighted by its rows)."""
    blocks = val[: cfg.eval_batches * cfg.batch_size]
    total, count = 0.0, 0
    for start in range(0, len(blocks), cfg.batch_size):
        batch = blocks[start : start + cfg.batch_size]
        total += float(eval_step(params, place(batch))) * len(batch)
        count += len(batch)
    return total / count


def run_steps(
    cfg: RunConfig,
    *,
    train_step: Callable,
    eval_step: Callable,
    state: TrainState,
    position: IteratorState,
    dataset: Dataset,
    place: Callable[[np.ndarray], jax.Array],
    save: Callable[[int, TrainState, IteratorState], str],
    saved: str | None,
    primary: bool,
    warn: Callable[[str], None],
    log: Callable[[str], None] = print,
) -> dict:
    """Runs the steps from ``state.step`` to ``--stop-at`` or ``--steps``; each evaluation's
    line goes to ``log`` (around the progress bar, which it leaves intact).

    Returns:
      ``state``, ``end`` (the last step), ``loss``, ``val_loss``, ``timed_steps`` and
      ``timed_seconds`` (each process's first step excluded), ``skipped_steps`` and ``saved``
      (the last checkpoint's directory).

    Raises:
      TrainError: more than ``cfg.max_skipped_steps`` non-finite steps in a row.
    """
    start = int(state.step)
    end = cfg.stop_at or cfg.steps
    batches = BatchIterator(dataset.train, cfg.batch_size, cfg.seed, position)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    metrics = MetricsWriter(metrics_path, resume_step=start) if primary else _NoMetrics()
    skipped_total = max([r.get("skipped_steps", 0) for r in metrics.resumed_records] or [0])
    in_a_row = 0
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = progress_bar(cfg.steps, start, cfg.progress and primary)
    timed_steps, timed_seconds = 0, 0.0
    loss, val_loss = float("nan"), None
    try:
        for step in range(start + 1, end + 1):
            batch = place(next(batches))
            began = time.perf_counter()
            state, out = train_step(state, batch)
            loss = float(out["loss"])
            seconds = time.perf_counter() - began
            if step > start + 1:  # the first step of a process is not representative
                timed_steps, timed_seconds = timed_steps + 1, timed_seconds + seconds
            skipped = bool(out["skipped"])
            if not cfg.skip_nonfinite and not math.isfinite(loss + float(out["grad_norm"])):
                raise TrainError(
                    f"step {step}: the loss or a gradient is not finite (loss {loss}) and the "
                    "step guard is off (--no-skip-nonfinite), so the parameters are not either; "
                    f"nothing was saved from this step. The last checkpoint is {saved}: resume "
                    "from it (--resume) with a lower --lr or --grad-clip, or with the guard on"
                )
            in_a_row = in_a_row + 1 if skipped else 0
            skipped_total += skipped
            rate = tokens_per_step / seconds
            if skipped or step % cfg.log_every == 0 or step == end:
                record = {
                    "step": step,
                    "loss": _finite_or_none(loss),
                    "grad_norm": _finite_or_none(float(out["grad_norm"])),
                    "lr": float(out["lr"]),
                    "tokens": step * tokens_per_step,
                    "tokens_per_s": rate,
                    "epoch": round(batches.epoch_fraction, 4),
                    "skipped_steps": skipped_total,
                }
                metrics.write({**record, "skipped": True} if skipped else record)
            if skipped:
                warn(
                    f"step {step}: the loss, a gradient or an update is not finite (loss "
                    f"{loss}); skipped it, parameters and optimizer state unchanged "
                    f"({in_a_row} in a row)"
                )
                if in_a_row > cfg.max_skipped_steps:
                    raise TrainError(
                        f"{in_a_row} steps in a row (steps {step - in_a_row + 1}-{step}) had a "
                        f"non-finite loss, gradient or update (--max-skipped-steps "
                        f"{cfg.max_skipped_steps}); lower --lr or --grad-clip, or check the data; "
                        f"the last checkpoint is {saved}"
                    )
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = evaluate(eval_step, state.params, dataset.val, cfg, place)
                ppl = math.exp(min(val_loss, 700))
                metrics.write({"step": step, "val_loss": val_loss, "val_ppl": ppl})
                if primary:
                    with bar.external_write_mode():
                        log(f"step {step}: val_loss {val_loss:.4f}, val_ppl {ppl:.2f}")
            if step % cfg.checkpoint_every == 0 or step == end:
                saved = save(step, state, batches.state)
    except BaseException:
        metrics.close()
        raise
    finally:
        bar.close()
    return {
        "state": state,
        "end": end,
        "loss": loss,
        "val_loss": val_loss,
        "timed_steps": timed_steps,
        "timed_seconds": timed_seconds,
        "skipped_steps": skipped_total,
        "saved": saved,
        "metrics": metrics,
    }


def summarize(
    cfg: RunConfig, result: dict, tx: optax.GradientTransformation, data_name: str, primary: bool
) -> dict:
    """The summary line (written to ``metrics.jsonl``, which it closes) of a finished run."""
    memory_bytes, memory_source = peak_memory()
    params = result["state"].params
    val_loss = result["val_loss"]
    timed_steps, timed_seconds = result["timed_steps"], result["timed_seconds"]
    tokens_per_step = cfg.batch_size * cfg.seq_len
    summary = {
        "summary": True,
        "step": result["end"],
        "loss": _finite_or_none(result["loss"]),
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 700)) if val_loss is not None else None,
        # Excludes each process's first step.
        "tokens_per_s": tokens_per_step * timed_steps / timed_seconds if timed_steps else None,
        "peak_memory_bytes": memory_bytes,
        "peak_memory_source": memory_source,
        "optimizer": cfg.optimizer,
        "opt_state_bytes": memory.state_bytes(tx, params),
        "adamw_state_bytes": memory.state_bytes(optax.adamw(1e-3), params),
        "param_count": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "model": cfg.model,
        "data": data_name,
        "skipped_steps": result["skipped_steps"],
        "checkpoint": result["saved"],
    }
    result["metrics"].write(summary)
    result["metrics"].close()
    return summary


def report(cfg: RunConfig, s: dict, rank: int | None, log: Callable[[str], None]) -> None:
    """The human-readable lines of a finished run."""
    method = f"{cfg.optimizer} (rank {rank})" if rank else cfg.optimizer
    log(
        f"trained {cfg.model} ({s['param_count'] / 1e6:.2f}M params) with {method} on "
        f"{s['data']} for {s['step']} of {cfg.steps} steps"
    )
    if s["val_ppl"] is not None:
        log(f"validation loss {s['val_loss']:.4f}, perplexity {s['val_ppl']:.2f}")
    ratio = s["opt_state_bytes"] / s["adamw_state_bytes"]
    log(
        f"optimizer state {memory.human(s['opt_state_bytes'])} "
        f"(AdamW: {memory.human(s['adamw_state_bytes'])}, {ratio:.0%})"
    )
    if s["skipped_steps"]:
        log(f"skipped {s['skipped_steps']} steps with a non-finite loss, gradient or update")
    if s["tokens_per_s"]:
        log(f"throughput {s['tokens_per_s']:,.0f} tokens/s")
    log(f"peak memory {memory.human(s['peak_memory_bytes'])} ({s['peak_memory_source']})")
    log(f"checkpoint: {s['checkpoint']}")
    log(f"metrics: {os.path.join(cfg.out, 'metrics.jsonl')}")
