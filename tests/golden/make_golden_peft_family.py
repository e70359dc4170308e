"""Writes tests/golden/peft_family.npz: PEFT's AdaLoRA, RandLoRA and MiSS on a two-layer toy.

Run with the ``compare`` extra installed (torch==2.13.0, peft 0.21.2 was used):

    python -m tests.golden.make_golden_peft_family

``tests/reparam/test_adalora.py``, ``test_randlora.py`` and ``test_miss.py`` compare against the
live PEFT when torch and peft import, and against this file otherwise, so CI without torch still
checks parity. Keys are ``<method>/<name>`` with the names of
:mod:`tests.golden.peft_family_reference`.
"""

from __future__ import annotations

import pathlib

import numpy as np

from tests.golden import peft_family_reference as ref

OUT = pathlib.Path(__file__).with_name("peft_family.npz")
RUNS = {"adalora": ref.run_adalora, "randlora": ref.run_randlora, "miss": ref.run_miss}


def main() -> None:
    arrays = {}
    for method, run in RUNS.items():
        for name, value in run().items():
            arrays[f"{method}/{name}"] = np.asarray(value)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {len(arrays)} arrays to {OUT}")


if __name__ == "__main__":
    main()
