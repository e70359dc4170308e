"""Orbax checkpoints of a run: parameters, optimizer state (projectors included), data position,
with the run's settings and checksums, verified on restore.

One :class:`Checkpointer` wraps an ``orbax.checkpoint.CheckpointManager`` (V0 API) that keeps
the last ``k`` steps. Each step directory holds two items: ``state`` (``StandardSave`` of the
:class:`~lowrank_jax.train.step.TrainState` and the iterator position) and ``meta`` (JSON: the
settings the state depends on, and a checksum of every saved array). Orbax writes a step into a
temporary directory and renames it when complete, so a process killed during a save leaves no
step that looks finished; saves are synchronous (our buffers are donated to the next step).
After the rename, ``files.json`` records the size and CRC-32 of every file of the step.

Restoring a step checks, in order: the files against ``files.json`` (a truncated or bit-flipped
file is named), the saved settings against the run's (an incompatible run is an error), then
the restored arrays against their checksums. :meth:`Checkpointer.restore_latest` falls back
from a corrupt step to the newest intact one, moving the bad one aside to ``<step>.corrupt``,
so a resumed run never trains on garbage.

Restoring goes against an abstract target from ``jax.eval_shape``, so optax NamedTuple states
(``GaLoreState``, ``ScaleByAdamState``, ``MaskedNode`` leaves) come back with their types.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lowrank_jax.data.packing import IteratorState
from lowrank_jax.train.integrity import (
    FILES,
    tree_checksums,
    verify_file_listing,
    write_file_listing,
)

__all__ = ["CheckpointError", "Checkpointer", "CorruptCheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint that is unreadable, or written by an incompatible run."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files or arrays fail verification (truncated, bit-flipped, partial)."""


def _first_line(err: BaseException) -> str:
    """The first line of the root cause of ``err`` (orbax wraps TensorStore's message in an
    exception whose text is a repr of the whole TensorStore spec), at most 300 characters."""
    seen = [err]
    while (cause := seen[-1].__cause__ or seen[-1].__context__) is not None and cause not in seen:
        seen.append(cause)
    for candidate in reversed(seen):
        text = str(candidate).strip()
        if text and "See full TensorStore details" not in text:
            return text.splitlines()[0][:300]
    text = str(err).strip().split(" See full TensorStore details")[0]
    return text.splitlines()[0][:300] if text else type(err).__name__


class Checkpointer:
    """Saves and restores a run's state under ``directory/<step>/``.

    Args:
      directory: the checkpoint root (created).
      keep: how many of the latest steps to keep.
    """

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=True
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as err:  # noqa: BLE001 -- one line for the CLI
            raise CheckpointError(
                f"cannot open checkpoints in {self.directory}: {_first_line(err)}"
            ) from None

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step, oldest first."""
        return sorted(self._manager.all_steps())

    def path(self, step: int) -> str:
        """Directory of ``step``."""
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, data: IteratorState, meta: dict) -> str:
        """Writes ``state`` (any pytree), the data position, ``meta`` and their checksums.

        Returns:
          The step's directory.
        """
        tree = {"train": state, "data": _data_tree(data)}
        record = {"settings": meta, "checksums": tree_checksums(tree)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(record)
        )
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            write_file_listing(self.path(step))
        return self.path(step)

    def verify_files(self, step: int) -> bool:
        """Checks the step's files against its ``files.json``.

        Returns:
          Whether there was a listing to check against (a step saved by a process killed
          before writing it has none; its arrays are still checked against their checksums
          when restored).

        Raises:
          CorruptCheckpointError: a missing, truncated or altered file (named).
        """
        problem = verify_file_listing(self.path(step))
        if problem:
            raise self._corrupt(step, problem)
        return os.path.exists(os.path.join(self.path(step), FILES))

    def _corrupt(self, step: int, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"checkpoint {self.path(step)} cannot be restored: {why}")

    def _record(self, step: int) -> dict:
        restored, problem = _read_quietly(
            self._manager, step, ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        if problem is not None:
            raise CorruptCheckpointError(
                f"checkpoint {self.path(step)} is unreadable (corrupt or not ours): {problem}"
            )
        record = dict(restored["meta"])
        if not isinstance(record.get("settings"), dict) or "checksums" not in record:
            raise CorruptCheckpointError(
                f"checkpoint {self.path(step)} has no settings and checksums in its meta "
                "(not written by this version of lowrank_jax)"
            )
        return record

    def read_meta(self, step: int) -> dict:
        """The settings saved with ``step``.

        Raises:
          CheckpointError: the step is missing or its ``meta`` is unreadable.
        """
        return dict(self._record(step)["settings"])

    def restore(
        self,
        step: int,
        abstract_state: Any,
        meta: dict | None = None,
        *,
        accept: Callable[[dict, int], None] | None = None,
    ) -> tuple[Any, IteratorState]:
        """The state and data position saved as ``step``, verified and checked against this
        run's settings.

        Args:
          step: which step.
          abstract_state: ``jax.eval_shape`` of the state (its structure, shapes, dtypes and
            NamedTuple types are what is restored); leaves that carry a ``sharding`` are
            restored straight into it, whatever mesh wrote the checkpoint.
          meta: this run's settings; every key saved with the checkpoint must be equal.
          accept: instead of ``meta``: ``accept(saved_settings, step)`` raises
            :class:`CheckpointError` for settings this run cannot continue from.

        Raises:
          CorruptCheckpointError: a file, the meta or an array fails verification.
          CheckpointError: incompatible settings.
        """
        state, data, _ = self._restore(step, abstract_state, accept or self._equal_to(meta or {}))
        return state, data

    def _restore(
        self, step: int, abstract_state: Any, accept: Callable[[dict, int], None]
    ) -> tuple[Any, IteratorState, dict]:
        self.verify_files(step)
        record = self._record(step)
        accept(dict(record["settings"]), step)
        target = {"train": abstract_state, "data": _data_tree(IteratorState(0, 0))}
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)
            ),
            target,
        )
        restored, problem = _read_quietly(
            self._manager, step, ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        if problem is not None:
            raise CorruptCheckpointError(
                f"checkpoint {self.path(step)} cannot be restored (corrupt or incompatible): "
                f"{problem}"
            )
        restored = restored["state"]
        sums = tree_checksums(restored)
        bad = [k for k, v in record["checksums"].items() if sums.get(k) != v]
        if bad or set(sums) != set(record["checksums"]):
            what = f"array {bad[0]}" if bad else "its array list"
            raise self._corrupt(step, f"{what} does not match the checksum saved with it")
        position = IteratorState(int(restored["data"]["epoch"]), int(restored["data"]["index"]))
        return restored["train"], position, record["settings"]

    def restore_latest(
        self,
        abstract_state: Any,
        accept: Callable[[dict, int], None],
        warn: Callable[[str], None],
    ) -> tuple[int, Any, IteratorState, dict] | None:
        """The newest intact step: ``(step, state, data position, saved settings)``.

        A corrupt step (see :meth:`restore`) is moved aside to ``<step>.corrupt`` with a warning
        naming it, and the next older one is tried. ``None`` when there is no step at all.

        Raises:
          CheckpointError: incompatible settings, or no intact step (the message names each
            step's bad file and what to delete).
        """
        bad = []
        for step in reversed(self.all_steps()):
            try:
                state, data, settings = self._restore(step, abstract_state, accept)
            except CorruptCheckpointError as err:
                bad.append((step, err))
                continue
            for bad_step, err in bad:
                moved = self._move_aside(bad_step)
                warn(f"{err} -- moved it to {moved}; resuming from step {step}")
            return step, state, data, settings
        if not bad:
            return None
        if len(bad) == 1:
            step, err = bad[0]
            raise CorruptCheckpointError(
                f"{err}; it is the only checkpoint: delete {self.path(step)} to start the run over"
            )
        reasons = "; ".join(str(err) for _, err in bad)
        raise CorruptCheckpointError(
            f"no intact checkpoint: {reasons}; delete {self.directory} to start the run over"
        )

    def _move_aside(self, step: int) -> str:
        """Renames a corrupt step to ``<step>.corrupt[-n]`` (orbax ignores it) and reloads."""
        target, n = f"{self.path(step)}.corrupt", 1
        while os.path.exists(target):
            target, n = f"{self.path(step)}.corrupt-{n}", n + 1
        _barrier(f"lowrank_jax: move aside step {step}")
        if jax.process_index() == 0:
            os.rename(self.path(step), target)
        _barrier(f"lowrank_jax: moved aside step {step}")
        self._manager.reload()
        return target

    def _equal_to(self, meta: dict) -> Callable[[dict, int], None]:
        """An ``accept`` that wants every saved setting equal to ``meta``'s."""

        def accept(saved: dict, step: int) -> None:
            different = [
                f"{key}={saved.get(key)!r} (now {meta.get(key)!r})"
                for key in sorted(set(saved) | set(meta))
                if saved.get(key) != meta.get(key)
            ]
            if different:
                raise CheckpointError(
                    f"checkpoint {self.path(step)} was written by an incompatible run: "
                    + ", ".join(different)
                )

        return accept

    def close(self) -> None:
        """Releases the manager."""
        self._manager.close()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _read_quietly(manager: Any, step: int, args: Any) -> tuple[Any, str | None]:
    """``(manager.restore(step, args), None)``, or ``(None, first line of the error)``.

    A failed read leaves orbax's loggers, asyncio's ("Future exception was never retrieved")
    and the interpreter's unraisable-exception hook (coroutines finalised with an error) with
    pages of TensorStore specs and tracebacks; we report one line, so they are silenced while
    the read runs and while its leftovers are collected.
    """
    names = ("asyncio", "absl", "orbax", "orbax.checkpoint")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    problem = None
    try:
        return manager.restore(step, args=args), None
    except Exception as err:  # noqa: BLE001 -- any failure of a read is one line
        problem = _first_line(err)
    finally:
        if problem is not None:
            hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
            try:
                gc.collect()
            finally:
                sys.unraisablehook = hook
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return None, problem


def _data_tree(data: IteratorState) -> dict:
    return {"epoch": np.int32(data.epoch), "index": np.int32(data.index)}
