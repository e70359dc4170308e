"""Writes tests/golden/peft_merging.npz: PEFT ``add_weighted_adapter`` results for the merging
parity tests (``tests/reparam/test_merging.py``).

Run with the ``compare`` extra installed (torch==2.13.0, peft):

    python -m tests.golden.make_golden_merging

The tests compare against live PEFT when torch and peft are importable and against this file
otherwise. DARE's masks are ours (``lowrank_jax.reparam.merging.merge_key`` with
``jax.random.key(DARE_SEED)``), fed to PEFT in place of ``torch.bernoulli``.
"""

from __future__ import annotations

import pathlib

import numpy as np

from tests.golden.peft_merging_reference import CASES, run_peft

OUT = pathlib.Path(__file__).with_name("peft_merging.npz")
DARE_SEED = 7


def dare_masks(case: str):
    """``mask_for(module, role, index, torch_shape)``: our DARE mask, in PEFT's layout."""
    import jax

    from lowrank_jax.reparam.merging import merge_key

    density = CASES[case][3].get("density")
    key = jax.random.key(DARE_SEED)

    def mask_for(module, role, index, shape):
        k = merge_key(key, f"{module}/kernel", role, index)
        return np.asarray(jax.random.bernoulli(k, density, shape[::-1])).T

    return mask_for


def main() -> None:
    import peft

    arrays = {"peft_version": np.array(peft.__version__)}
    for case in CASES:
        for name, value in run_peft(case, dare_masks(case)).items():
            arrays[f"{case}/{name}"] = value
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {len(arrays)} arrays to {OUT} (peft {peft.__version__})")


if __name__ == "__main__":
    main()
