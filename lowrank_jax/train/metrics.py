"""Metrics as JSON lines, peak-memory measurement, and the progress bar.

``metrics.jsonl`` has one JSON object per line: training lines (``step``, ``loss``,
``grad_norm``, ``lr``, ``tokens``, ``tokens_per_s``, ``epoch``, ``skipped_steps``; a skipped
non-finite step has ``"skipped": true`` and ``null`` for what was not finite), evaluation lines
(``step``, ``val_loss``, ``val_ppl``) and a final ``summary`` line. Every line is flushed when
written; on resume the lines after the restored step (and any line cut short by a kill) are
dropped, so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

import jax

__all__ = ["MetricsWriter", "peak_memory", "peak_rss", "progress_bar", "warn_line"]


class MetricsWriter:
    """Appends JSON lines to ``path``.

    Args:
      path: the ``metrics.jsonl`` file.
      resume_step: keep only the complete lines with ``step <= resume_step`` that are not a
        summary (``None``: start a new file).
    """

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        self.resumed_records: list[dict[str, Any]] = []
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if not record.get("summary") and record.get("step", 0) <= resume_step:
                        kept.append(json.dumps(record) + "\n")
                        self.resumed_records.append(record)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        self._file = open(path, "a")  # noqa: SIM115 -- closed by close()

    def write(self, record: dict[str, Any]) -> None:
        """Writes one line and flushes it."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Closes the file (again: nothing)."""
        self._file.close()


def peak_memory() -> tuple[int, str]:
    """``(bytes, source)``: the device allocator's peak when it reports one, else process RSS.

    On a GPU/TPU this is ``peak_bytes_in_use`` of the first local device. The CPU backend has no
    allocator statistics, so it falls back to the process's peak resident set size
    (:func:`peak_rss`), which also counts the Python interpreter, XLA and the dataset.
    """
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(
            stats["peak_bytes_in_use"]
        ), f"{jax.local_devices()[0].platform} peak_bytes_in_use"
    return peak_rss(), "process peak RSS (CPU: no device allocator stats)"


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes.

    Linux's ``VmHWM`` (reset by ``exec``) when available; ``getrusage``'s ``ru_maxrss`` otherwise,
    which Linux carries over from the parent across ``exec``, so a child of a large process
    would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * (1 if sys.platform == "darwin" else 1024))  # Linux reports KiB


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar over steps (ETA included) on stderr; a no-op object when disabled."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        leave=True,
    )


def warn_line(line: str) -> None:
    """Prints ``lowrank-jax: warning: LINE`` on stderr, above a progress bar if one is shown."""
    from tqdm.auto import tqdm

    tqdm.write(f"lowrank-jax: warning: {line}", file=sys.stderr)
