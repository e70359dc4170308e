"""Orbax checkpoints of a run: parameters, optimizer state (projectors included), data position.

One :class:`Checkpointer` wraps an ``orbax.checkpoint.CheckpointManager`` (V0 API) that keeps
the last ``k`` steps. Each step directory holds two items: ``state`` (``StandardSave`` of the
:class:`~lowrank_jax.train.step.TrainState` and the iterator position) and ``meta`` (JSON: the
run settings the state depends on). Orbax writes a step into a temporary directory and renames
it when complete, so a process killed during a save leaves no step that looks finished; saves
are synchronous (our buffers are donated to the next step).

Restoring goes against an abstract target from ``jax.eval_shape``, so optax NamedTuple states
(``GaLoreState``, ``ScaleByAdamState``, ``MaskedNode`` leaves) come back with their types.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lowrank_jax.data.packing import IteratorState

__all__ = ["CheckpointError", "Checkpointer"]


class CheckpointError(RuntimeError):
    """A checkpoint that is unreadable, or written by an incompatible run."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
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

    def path(self, step: int) -> str:
        """Directory of ``step``."""
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, data: IteratorState, meta: dict) -> str:
        """Writes ``state`` (any pytree), the data position and ``meta`` as ``step``.

        Returns:
          The step's directory.
        """
        tree = {"train": state, "data": _data_tree(data)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        return self.path(step)

    def read_meta(self, step: int) -> dict:
        """The ``meta`` saved with ``step``.

        Raises:
          CheckpointError: the step is missing or its ``meta`` is unreadable.
        """
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {self.path(step)} is unreadable (corrupt or not ours): "
                f"{_first_line(err)}"
            ) from None
        return dict(restored["meta"])

    def restore(self, step: int, abstract_state: Any, meta: dict) -> tuple[Any, IteratorState]:
        """The state and data position saved as ``step``, checked against this run's ``meta``.

        Args:
          step: which step.
          abstract_state: ``jax.eval_shape`` of the state (its structure, shapes, dtypes and
            NamedTuple types are what is restored); leaves that carry a ``sharding`` are
            restored straight into it, whatever mesh wrote the checkpoint.
          meta: this run's settings; every key saved with the checkpoint must be equal.

        Raises:
          CheckpointError: incompatible settings, or a corrupt checkpoint.
        """
        saved = self.read_meta(step)
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
        target = {"train": abstract_state, "data": _data_tree(IteratorState(0, 0))}
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)
            ),
            target,
        )
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )["state"]
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {self.path(step)} cannot be restored (corrupt or incompatible): "
                f"{_first_line(err)}"
            ) from None
        data = restored["data"]
        return restored["train"], IteratorState(int(data["epoch"]), int(data["index"]))

    def close(self) -> None:
        """Releases the manager."""
        self._manager.close()


def _data_tree(data: IteratorState) -> dict:
    return {"epoch": np.int32(data.epoch), "index": np.int32(data.index)}
