"""``lowrank-jax plot``: curves and bars read from runs' metrics.jsonl, a PNG, clear errors."""

import base64
import json
import subprocess
import sys

import numpy as np
import pytest

from lowrank_jax.train.cli import main
from lowrank_jax.train.plot import PlotError, draw_figure, figure_data, plot_runs, read_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(path, optimizer, losses, evals, summary=None, config_extra=None):
    """A run directory as `lowrank-jax train` leaves it: config.json and metrics.jsonl."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"optimizer": optimizer, **(config_extra or {})}))
    lines = []
    for step, loss in enumerate(losses, start=1):
        lines.append({"step": step, "loss": loss, "grad_norm": 1.0, "tokens_per_s": 100.0})
        if step in evals:
            lines.append({"step": step, "val_loss": evals[step], "val_ppl": float(np.exp(1))})
    if summary is not None:
        lines.append({"summary": True, "step": len(losses), "optimizer": optimizer, **summary})
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


@pytest.fixture
def two_runs(tmp_path):
    galore = _write_run(
        tmp_path / "galore",
        "galore",
        [5.0, 4.0, 3.5, 3.0],
        {2: 4.2, 4: 3.1},
        {"opt_state_bytes": 2_500_000, "adamw_state_bytes": 7_000_000, "tokens_per_s": 900.0},
    )
    adamw = _write_run(
        tmp_path / "adamw",
        "adamw",
        [5.0, 4.5, 4.2, 4.0],
        {2: 4.6, 4: 4.1},
        {"opt_state_bytes": 7_000_000, "adamw_state_bytes": 7_000_000, "tokens_per_s": 1200.0},
    )
    return galore, adamw


def test_figure_data_is_the_runs_metrics(two_runs):
    data = figure_data([read_run(run) for run in two_runs])
    assert data["train_loss"] == {
        "galore": ([1, 2, 3, 4], [5.0, 4.0, 3.5, 3.0]),
        "adamw": ([1, 2, 3, 4], [5.0, 4.5, 4.2, 4.0]),
    }
    assert data["val_loss"] == {"galore": ([2, 4], [4.2, 3.1]), "adamw": ([2, 4], [4.6, 4.1])}
    assert data["opt_state_mb"] == pytest.approx({"galore": 2.5, "adamw": 7.0})
    assert data["adamw_state_mb"] == pytest.approx({"galore": 7.0, "adamw": 7.0})
    assert data["tokens_per_s"] == {"galore": 900.0, "adamw": 1200.0}


def test_the_figure_draws_that_data(two_runs):
    data = figure_data([read_run(run) for run in two_runs])
    figure = draw_figure(data)
    train_ax, val_ax, memory_ax, speed_ax = figure.axes
    for ax, panel in ((train_ax, "train_loss"), (val_ax, "val_loss")):
        drawn = {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()}
        assert drawn == {
            label: [list(point) for point in zip(steps, losses)]
            for label, (steps, losses) in data[panel].items()
        }
    assert [bar.get_height() for bar in memory_ax.patches] == pytest.approx([2.5, 7.0])
    assert [bar.get_height() for bar in speed_ax.patches] == [900.0, 1200.0]
    assert [t.get_text() for t in speed_ax.get_xticklabels()] == ["galore", "adamw"]


def test_the_figure_shows_inline_in_a_notebook(two_runs):
    """As a notebook cell's last expression: IPython's display gives a PNG of the figure (the
    pretrain_compare notebook relies on it), without pyplot."""
    from IPython.core.formatters import DisplayFormatter

    figure = draw_figure(figure_data([read_run(run) for run in two_runs]))
    data, _ = DisplayFormatter().format(figure)
    png = data["image/png"]
    png = png if isinstance(png, bytes) else base64.b64decode(png)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_cli_writes_a_png(two_runs, tmp_path, capsys):
    out = tmp_path / "figures" / "runs.png"
    assert main(["plot", *two_runs, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 10_000
    assert str(out) in capsys.readouterr().out


def test_a_real_run_plots(full_run, tmp_path):
    """The metrics.jsonl and config.json of a real `lowrank-jax train` run (tests/train)."""
    out_dir, summary, _ = full_run
    data = plot_runs([out_dir], str(tmp_path / "run.png"))
    label = summary["optimizer"]
    assert data["train_loss"][label][0] == list(range(1, 7))
    assert data["val_loss"][label][0] == [3, 6]
    assert data["val_loss"][label][1][-1] == pytest.approx(summary["val_loss"])
    assert data["opt_state_mb"][label] == pytest.approx(summary["opt_state_bytes"] / 1e6)
    assert (tmp_path / "run.png").read_bytes()[:8] == PNG_SIGNATURE


def test_labels_method_layerwise_and_duplicates(tmp_path):
    lora = _write_run(tmp_path / "lora", "adamw", [3.0], {}, config_extra={"method": "lora"})
    lw = _write_run(tmp_path / "lw", "galore", [3.0], {}, config_extra={"layerwise": True})
    a = _write_run(tmp_path / "lr1e-2", "galore", [3.0, 2.0], {})
    b = _write_run(tmp_path / "lr1e-3", "galore", [3.0, 2.5], {})
    data = figure_data([read_run(run) for run in (lora, lw, a, b)])
    assert list(data["train_loss"]) == [
        "lora + adamw",
        "galore (layer-wise)",
        "galore [lr1e-2]",
        "galore [lr1e-3]",
    ]
    assert data["train_loss"]["galore [lr1e-3]"] == ([1, 2], [3.0, 2.5])
    c = _write_run(tmp_path / "other" / "lr1e-2", "galore", [1.0], {})
    assert list(figure_data([read_run(a), read_run(c)])["train_loss"]) == [
        f"galore [{a}]",
        f"galore [{c}]",
    ]


def test_a_run_without_summary_has_curves_and_no_bars(tmp_path):
    """A run still going (or stopped) has no summary line: no bar row, no val curve."""
    run = _write_run(tmp_path / "running", "fira", [4.0, 3.0], {})
    (tmp_path / "skipped").mkdir()
    lines = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": None, "skipped": True}]
    (tmp_path / "skipped" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    runs = [read_run(run), read_run(str(tmp_path / "skipped"))]
    data = figure_data(runs)
    # no config.json: the directory names the run; the skipped step (loss null) is left out
    assert data["train_loss"] == {"fira": ([1, 2], [4.0, 3.0]), "skipped": ([1], [4.0])}
    assert data["val_loss"] == data["opt_state_mb"] == data["tokens_per_s"] == {}
    assert len(draw_figure(data).axes) == 2


def test_errors(two_runs, tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowrank-jax: error: ") and "no metrics.jsonl" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo\n')
    assert main(["plot", two_runs[0], str(bad), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "line 2 is not valid JSON" in err and str(bad / "metrics.jsonl") in err
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n[1, 2]\n')
    with pytest.raises(PlotError, match="line 2 is not a JSON object"):
        read_run(str(bad))
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"loss": 2.0}\n')
    with pytest.raises(PlotError, match="line 2 has no integer step"):
        read_run(str(bad))
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_says_how_to_install(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    assert main(["plot", *two_runs, "--out", str(tmp_path / "x.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_the_cli_does_not_import_matplotlib():
    code = "import sys, lowrank_jax.train.cli; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
