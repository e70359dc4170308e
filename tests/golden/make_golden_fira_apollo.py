"""Writes tests/golden/fira_apollo_torch.npz: fira and apollo-torch trajectories for parity tests.

Run with the ``compare`` extra installed (torch==2.13.0, fira==1.0.2, apollo-torch==1.0.3):

    python -m tests.golden.make_golden_fira_apollo

``tests/transforms/test_fira_apollo_parity.py`` compares against the live references when they
import and against this file otherwise. For ``apollo*/random`` the file also holds
apollo-torch's random projections (``<case>/proj/<matrix>``), which the tests inject.
"""

from __future__ import annotations

import pathlib

import numpy as np

from tests.golden.fira_apollo_reference import CASES, run_reference

OUT = pathlib.Path(__file__).with_name("fira_apollo_torch.npz")


def main() -> None:
    arrays = {}
    for case in CASES:
        trajectory, projections = run_reference(case)
        for step, weights in enumerate(trajectory):
            for name, value in weights.items():
                arrays[f"{case}/{step}/{name}"] = value
        for name, value in projections.items():
            arrays[f"{case}/proj/{name}"] = value
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {len(arrays)} arrays to {OUT}")


if __name__ == "__main__":
    main()
