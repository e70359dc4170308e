"""Every notebook in colab/ runs top to bottom (its code cells, in order, in one namespace)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "colab").glob("*.ipynb"))


def test_there_is_a_notebook():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    try:  # optional (the notebooks extra); the notebook prints instead of plotting without it
        import matplotlib

        matplotlib.use("Agg")  # plt.show() draws nowhere
    except ImportError:
        pass
    cells = json.loads(path.read_text())["cells"]
    namespace = {"__name__": "__main__"}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(path), "exec"), namespace)  # noqa: S102
    assert namespace["runs"]["galore"][-1] < namespace["runs"]["galore"][0]
