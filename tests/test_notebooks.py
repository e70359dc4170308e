"""Every notebook in colab/ runs as a notebook (nbclient, a fresh Jupyter kernel, top to bottom),
and its first cell installs the package from the one variable that says where from."""

import json
import pathlib
import subprocess

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "colab").glob("*.ipynb"))

# What each notebook must have shown, checked in its kernel after its last cell. A new
# notebook needs its entry here (test_every_notebook_has_a_final_check).
FINAL_CHECKS = {
    "finetune_family.ipynb": "\n".join(
        [
            "assert list(rows) == list(METHODS) == ['LoRA', 'DoRA', 'GaLore', 'LISA'], rows",
            "assert MODEL.startswith(work), MODEL  # the stand-in: nothing was downloaded",
            "params = [rows[name]['trainable_params'] for name in METHODS]",
            "assert params[0] < params[1] < params[2] == params[3], params  # LoRA < DoRA < all",
            "assert all(0 < r['step_peak_bytes'] for r in rows.values()), rows",
            "assert all(r['val_loss'] < r['val_loss_before'] for r in rows.values()), rows",
            "assert [len(ax.patches) for ax in axes] == [8, 4, 8], axes",
        ]
    ),
    "lowrank_jax_quickstart.ipynb": 'assert runs["galore"][-1] < runs["galore"][0], runs',
    "memory_planner.ipynb": "\n".join(
        [
            "assert len(plans) == 6 and all(p.fits for p in plans.values()), plans",
            "for layerwise in (False, True):",
            "    state = [plans[(name, layerwise)].state_bytes for name in OPTIMIZERS]",
            "    assert state[2] < state[1] < state[0], state  # 8-bit GaLore < GaLore < AdamW",
            "assert [len(ax.patches) for ax in axes] == [6, 6], axes",
        ]
    ),
    "pretrain_compare.ipynb": "\n".join(
        [
            "assert list(summaries) == OPTIMIZERS, summaries",
            "assert all(math.isfinite(s['val_loss']) for s in summaries.values()), summaries",
            "state = {name: s['opt_state_bytes'] for name, s in summaries.items()}",
            "assert max(state['galore'], state['fira'], state['apollo']) < state['adamw'], state",
            "assert curves['galore'].val_loss[-1] < curves['galore'].val_loss[0], curves",
            "axes = figure.axes  # lowrank_jax.train.plot.draw_figure's four panels",
            "assert [len(ax.lines) for ax in axes[:2]] == [len(OPTIMIZERS)] * 2, axes",
            "assert [len(ax.patches) for ax in axes[2:]] == [len(OPTIMIZERS)] * 2, axes",
        ]
    ),
    "sharding.ipynb": "\n".join(
        [
            "assert mesh.shape == {'fsdp': 4, 'tensor': 2}, mesh",
            "assert len(q_kernel.sharding.device_set) == 8, q_kernel.sharding",
            "assert q_kernel.sharding.spec == P('fsdp', 'tensor'), q_kernel.sharding",
            "assert losses[-1] < losses[0] - 1.0, losses",
        ]
    ),
}

NO_FIGURE = {"sharding.ipynb"}  # the others must show at least one figure (a PNG output)


def test_there_is_a_notebook():
    assert NOTEBOOKS


def test_every_notebook_has_a_final_check():
    assert sorted(FINAL_CHECKS) == [path.name for path in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_are_stripped(path):
    """The repository keeps notebooks without outputs: what a reader opens is what runs."""
    cells = json.loads(path.read_text())["cells"]
    kept = [i for i, c in enumerate(cells) if c["cell_type"] == "code"
            and (c.get("outputs") or c.get("execution_count") is not None)]  # fmt: skip
    assert not kept, f"{path.name}: cells {kept} keep outputs; clear them before committing"


def _first_code_cell(path):
    cells = json.loads(path.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_cell_installs_from_one_variable(path, monkeypatch):
    """On a fresh runtime (no lowrank_jax) the cell pip-installs SOURCE, not `-e .` in /content
    (the issue's row: CalledProcessError on Colab); where it is installed, it does nothing."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    source = _first_code_cell(path)
    assert source.count("SOURCE = ") == 1 and "-e" not in source
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    namespace = {}
    exec(compile(source, str(path), "exec"), namespace)  # noqa: S102
    pip = [namespace["sys"].executable, "-m", "pip", "install", "-q", namespace["SOURCE"]]
    assert calls == [pip]
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    calls.clear()
    exec(compile(source, str(path), "exec"), {})  # noqa: S102 -- installed: no pip call
    assert calls == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_as_a_notebook(path):
    import nbclient
    import nbformat

    notebook = nbformat.read(str(path), as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(FINAL_CHECKS[path.name]))
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    images = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images or path.name in NO_FIGURE, f"{path.name} showed no figure"
