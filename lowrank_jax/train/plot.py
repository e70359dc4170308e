"""``lowrank-jax plot``: the curves of one or more runs on one figure, as a PNG.

Reads each run directory's ``metrics.jsonl`` (and ``config.json``, for the label) as written
by ``lowrank-jax train``, and draws the training loss and the validation loss of every run
against the step, labelled by optimizer (and method, where a run names one), with bar charts
of the optimizer-state memory (next to AdamW's on the same model) and the throughput from the
runs' final summaries. Runs without a summary (still running, or stopped) keep their curves
and have no bar. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import os
import sys
from typing import Any

__all__ = [
    "PlotError",
    "RunCurves",
    "add_command",
    "draw_figure",
    "figure_data",
    "plot_runs",
    "read_run",
    "run_command",
]


class PlotError(ValueError):
    """A run directory that cannot be plotted, or no matplotlib; the message says which."""


@dataclasses.dataclass(frozen=True)
class RunCurves:
    """One run's curves, read from its ``metrics.jsonl``.

    Attributes:
      run_dir: the run directory.
      label: the legend label (optimizer, method, layer-wise), made unique by
        :func:`figure_data`.
      train_steps, train_loss: the training lines' steps and losses (a skipped non-finite step,
        whose loss is ``null``, is left out).
      val_steps, val_loss: the evaluation lines'.
      summary: the final summary line, or ``None`` when the run wrote none.
    """

    run_dir: str
    label: str
    train_steps: list[int]
    train_loss: list[float]
    val_steps: list[int]
    val_loss: list[float]
    summary: dict[str, Any] | None


def read_run(run_dir: str) -> RunCurves:
    """Reads ``RUN_DIR/metrics.jsonl`` (and ``RUN_DIR/config.json`` when present).

    Args:
      run_dir: a directory written by ``lowrank-jax train --out RUN_DIR``.

    Returns:
      The run's :class:`RunCurves`.

    Raises:
      PlotError: no ``metrics.jsonl`` there, or a line of it that is not a JSON object
        (the message names the file and the line number).
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{run_dir}: no metrics.jsonl (is it an --out directory of a run?)")
    train_steps, train_loss, val_steps, val_loss = [], [], [], []
    summary = None
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PlotError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise PlotError(f"{path}: line {number} is not a JSON object")
            if record.get("summary"):
                summary = record
                continue
            for key, steps, values in (
                ("loss", train_steps, train_loss),
                ("val_loss", val_steps, val_loss),
            ):
                if record.get(key) is None:
                    continue
                if not isinstance(record.get("step"), int) or isinstance(record[key], str):
                    raise PlotError(f"{path}: line {number} has no integer step or a bad {key}")
                steps.append(record["step"])
                values.append(float(record[key]))
    config = {}
    config_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except json.JSONDecodeError as err:
            raise PlotError(f"{config_path} is not valid JSON ({err.msg})") from None
    return RunCurves(
        run_dir=run_dir,
        label=_label(config, summary, run_dir),
        train_steps=train_steps,
        train_loss=train_loss,
        val_steps=val_steps,
        val_loss=val_loss,
        summary=summary,
    )


def _label(config: dict[str, Any], summary: dict[str, Any] | None, run_dir: str) -> str:
    optimizer = config.get("optimizer") or (summary or {}).get("optimizer")
    if not optimizer:
        return os.path.basename(os.path.normpath(run_dir))
    label = f"{config['method']} + {optimizer}" if config.get("method") else optimizer
    return f"{label} (layer-wise)" if config.get("layerwise") else label


def figure_data(runs: list[RunCurves]) -> dict[str, dict[str, Any]]:
    """What the figure shows, by panel and by label (labels made unique).

    Runs with the same label (e.g. GaLore at two learning rates) get their directory names
    appended (their paths, where the names repeat too).

    Args:
      runs: the runs, in legend order.

    Returns:
      ``{"train_loss": {label: (steps, losses)}, "val_loss": {label: (steps, losses)},
      "opt_state_mb": {label: MB}, "adamw_state_mb": {label: MB},
      "tokens_per_s": {label: tokens/s}}``; a bar panel holds only the runs whose summary
      records that figure, a curve panel only the runs with points in it.
    """
    counts = collections.Counter(run.label for run in runs)
    names = [os.path.basename(os.path.normpath(run.run_dir)) for run in runs]
    if len(set(names)) < len(names):  # runs/a/galore and runs/b/galore: the paths as given
        names = [run.run_dir for run in runs]
    labels = [
        f"{run.label} [{name}]" if counts[run.label] > 1 else run.label
        for run, name in zip(runs, names)
    ]
    data: dict[str, dict[str, Any]] = {
        key: {} for key in ("train_loss", "val_loss", "opt_state_mb", "adamw_state_mb")
    }
    data["tokens_per_s"] = {}
    for label, run in zip(labels, runs):
        if run.train_steps:
            data["train_loss"][label] = (run.train_steps, run.train_loss)
        if run.val_steps:
            data["val_loss"][label] = (run.val_steps, run.val_loss)
        summary = run.summary or {}
        for key, panel, scale in (
            ("opt_state_bytes", "opt_state_mb", 1e-6),
            ("adamw_state_bytes", "adamw_state_mb", 1e-6),
            ("tokens_per_s", "tokens_per_s", 1.0),
        ):
            if summary.get(key) is not None:
                data[panel][label] = summary[key] * scale
    return data


def plot_runs(run_dirs: list[str], out: str) -> dict[str, dict[str, Any]]:
    """Reads the runs and saves their figure as a PNG.

    Args:
      run_dirs: run directories (``lowrank-jax train --out``), in legend order.
      out: the PNG to write (its directory is created).

    Returns:
      The :func:`figure_data` that was drawn.

    Raises:
      PlotError: a run that cannot be read (see :func:`read_run`), or matplotlib missing.

    Example:
      >>> plot_runs(["runs/galore", "runs/adamw"], "runs.png")  # doctest: +SKIP
    """
    data = figure_data([read_run(run_dir) for run_dir in run_dirs])
    figure = draw_figure(data)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, format="png", dpi=100)
    return data


def draw_figure(data: dict[str, dict[str, Any]]) -> Any:
    """Draws :func:`figure_data` on a matplotlib ``Figure`` with an Agg canvas (no pyplot, so
    no global backend is changed).

    The top row has the training and the validation loss against the step, one line per run;
    a second row, when any run has a summary, the optimizer-state memory (with AdamW's on the
    same model as a dashed line across each bar) and the throughput.

    Args:
      data: the output of :func:`figure_data`.

    Returns:
      The ``matplotlib.figure.Figure``; as a notebook cell's last expression it shows inline
      (as a PNG, whichever matplotlib backend the kernel has, pyplot imported or not).

    Raises:
      PlotError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    bars = [panel for panel in ("opt_state_mb", "tokens_per_s") if data[panel]]
    rows = 2 if bars else 1
    figure = Figure(figsize=(12, 4.5 * rows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 2, squeeze=False)
    for ax, panel, title in (
        (axes[0][0], "train_loss", "training loss"),
        (axes[0][1], "val_loss", "validation loss"),
    ):
        for label, (steps, losses) in data[panel].items():
            ax.plot(steps, losses, marker="o" if panel == "val_loss" else None, label=label)
        ax.set(title=title, xlabel="step", ylabel="loss")
        if data[panel]:
            ax.legend()
    if bars:
        for ax, panel in zip(axes[1], bars):
            _bar_panel(ax, panel, data)
        if len(bars) == 1:
            axes[1][1].set_visible(False)
    figure.tight_layout()
    figure._repr_png_ = lambda: _png(figure)  # IPython's display: no pyplot needed
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi)
    return buffer.getvalue()


def _bar_panel(ax: Any, panel: str, data: dict[str, dict[str, Any]]) -> None:
    values = data[panel]
    positions = range(len(values))
    ax.bar(positions, list(values.values()), color=f"C{0 if panel == 'opt_state_mb' else 2}")
    ax.set_xticks(list(positions), list(values), rotation=20, ha="right")
    if panel == "tokens_per_s":
        ax.set(title="throughput", ylabel="tokens / s")
        return
    ax.set(title="optimizer-state memory", ylabel="MB")
    adamw = [(i, data["adamw_state_mb"].get(label)) for i, label in enumerate(values)]
    adamw = [(i, mb) for i, mb in adamw if mb is not None]
    if adamw:  # AdamW's state on the same model, for scale: a line across each bar
        ax.hlines([mb for _, mb in adamw], [i - 0.4 for i, _ in adamw],
                  [i + 0.4 for i, _ in adamw], colors="k", linestyles="--",
                  label="AdamW on the same model")  # fmt: skip
        ax.legend()


def add_command(commands: Any) -> None:
    """Adds ``plot`` to the ``lowrank-jax`` subcommands (an ``add_subparsers`` object)."""
    plot = commands.add_parser(
        "plot",
        help="draw the loss curves, state memory and throughput of runs into a PNG",
        description="Draws the training and the validation loss of runs (each RUN_DIR's "
        "metrics.jsonl, labelled by the optimizer in its config.json) on one figure, with bar "
        "charts of the optimizer-state memory and the throughput from the runs' summaries, "
        "and saves it as a PNG. Needs matplotlib.",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's --out directory")
    plot.add_argument("--out", default="runs.png", metavar="FILE", help="the PNG [runs.png]")


def run_command(args: argparse.Namespace) -> int:
    """Runs ``lowrank-jax plot`` from parsed arguments; returns the exit status."""
    try:
        plot_runs(args.run_dirs, args.out)
    except (PlotError, OSError) as err:
        print(f"lowrank-jax: error: {err}", file=sys.stderr)
        return 2
    print(f"plot: {args.out}")
    return 0
