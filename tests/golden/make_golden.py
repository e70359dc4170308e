"""Writes tests/golden/galore_torch.npz: galore-torch 1.0 trajectories for the parity tests.

Run with the ``compare`` extra installed (torch==2.13.0, galore-torch==1.0):

    python -m tests.golden.make_golden

The tests compare against the live reference when torch is importable and against this file
otherwise, so CI without torch still checks parity.
"""

from __future__ import annotations

import pathlib

import numpy as np

from tests.golden.torch_reference import run_reference

OUT = pathlib.Path(__file__).with_name("galore_torch.npz")
CASES = [("adamw", p) for p in ("std", "reverse_std", "left", "right", "full")] + [
    ("adafactor", "std")
]


def main() -> None:
    arrays = {}
    for optimizer, proj_type in CASES:
        for step, weights in enumerate(run_reference(optimizer, proj_type)):
            for name, value in weights.items():
                arrays[f"{optimizer}/{proj_type}/{step}/{name}"] = value
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {len(arrays)} arrays to {OUT}")


if __name__ == "__main__":
    main()
