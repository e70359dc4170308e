"""What a resumed run must agree on with its checkpoint, and how its learning rate continues.

Every checkpoint carries the run's *settings fingerprint*: the identity fields of
:class:`~lowrank_jax.train.config.RunConfig` (``metadata["identity"]``), the vocabulary size
and the learning-rate plan (:class:`SchedulePlan`'s segments). A run resumes a checkpoint only
when they agree. The one setting that may change is ``--steps``, and only with ``--extend``:
the plan then gains a segment that continues the cosine from the learning rate reached at the
checkpoint down to the minimum at the new last step
(:func:`~lowrank_jax.train.step.extended_schedule`), so the schedule is never silently
re-planned.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from lowrank_jax.train.checkpoint import CheckpointError
from lowrank_jax.train.config import RunConfig, flag_name
from lowrank_jax.train.step import extended_schedule

__all__ = ["SchedulePlan", "fingerprint", "fresh_plan", "resumed_plan"]


class SchedulePlan(NamedTuple):
    """The learning-rate plan: warmup + cosine over ``segments[0]``, then its extensions.

    Attributes:
      peak_lr: the peak learning rate.
      warmup_steps: warmup of the first plan (``--warmup``, else 10% of its steps).
      min_ratio: the minimum as a fraction of the peak.
      segments: ``((0, N_0), (k_1, N_1), ...)``: the first plan and each ``--extend``.
    """

    peak_lr: float
    warmup_steps: int
    min_ratio: float
    segments: tuple[tuple[int, int], ...]

    def schedule(self) -> optax.Schedule:
        """The optax schedule (see :func:`~lowrank_jax.train.step.extended_schedule`)."""
        return extended_schedule(self.peak_lr, self.segments, self.warmup_steps, self.min_ratio)


def _plan(cfg: RunConfig, default_lr: float, segments: tuple) -> SchedulePlan:
    peak = cfg.lr if cfg.lr is not None else default_lr
    warmup = cfg.warmup if cfg.warmup is not None else segments[0][1] // 10
    return SchedulePlan(peak, warmup, cfg.min_lr_ratio, segments)


def fresh_plan(cfg: RunConfig, default_lr: float) -> SchedulePlan:
    """The plan of a run that starts at step 0: one segment of ``cfg.steps``."""
    return _plan(cfg, default_lr, ((0, cfg.steps),))


def fingerprint(cfg: RunConfig, vocab_size: int, plan: SchedulePlan) -> dict[str, Any]:
    """The settings saved with every checkpoint: identity fields, vocabulary, schedule plan."""
    return {
        **cfg.identity(),
        "vocab_size": vocab_size,
        "schedule": [list(segment) for segment in plan.segments],
    }


def resumed_plan(
    cfg: RunConfig,
    now: dict[str, Any],
    saved: dict[str, Any],
    step: int,
    where: str,
    default_lr: float,
) -> SchedulePlan:
    """The plan to continue the checkpoint of ``step`` with, after checking its settings.

    Args:
      cfg: this run's settings.
      now: this run's :func:`fingerprint` (its ``schedule`` is not compared).
      saved: the fingerprint saved with the checkpoint.
      step: the checkpoint's step.
      where: the checkpoint's directory, for messages.
      default_lr: the optimizer's default peak learning rate.

    Raises:
      CheckpointError: a setting differs (named with its flag), or ``--steps`` changed without
        ``--extend``, or ``--extend`` asks for no step after the checkpoint.
    """
    different = [
        key
        for key in sorted(set(saved) | set(now))
        if key not in ("steps", "schedule") and saved.get(key) != now.get(key)
    ]
    if different:
        values = ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in different)
        flags = [flag_name(k) for k in different if k in RunConfig.field_names()]
        raise CheckpointError(
            f"checkpoint {where} was written by an incompatible run: {values}; resume with the "
            f"checkpoint's {' '.join(flags) or 'settings'}, or start a new run in another --out"
        )
    saved_steps = saved.get("steps")
    segments = tuple(tuple(int(x) for x in s) for s in saved.get("schedule", [[0, saved_steps]]))
    if cfg.steps != saved_steps:
        if not cfg.extend:
            raise CheckpointError(
                f"checkpoint {where} belongs to a run of --steps {saved_steps} (now "
                f"{cfg.steps}): pass --extend to train on to step {cfg.steps} (the learning rate "
                f"continues its cosine from its value at step {step} down to the minimum at "
                f"step {cfg.steps}), or resume with --steps {saved_steps}"
            )
        if cfg.steps <= step:
            raise CheckpointError(
                f"--extend --steps {cfg.steps}: checkpoint {where} is already at step {step}; "
                "give more steps"
            )
        segments += ((step, cfg.steps),)
    return _plan(cfg, default_lr, segments)
