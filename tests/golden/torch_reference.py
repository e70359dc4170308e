"""Runs the PyTorch reference optimizers on a fixed problem; shared by tests and golden files.

The problem: a tall, a wide and a square matrix (PyTorch layout ``(out, in)``) plus a 1-D leaf,
with a fixed stream of random gradients. ``run_reference`` returns the weights after every
step in **Flax layout** (matrices transposed to ``(in, out)``), ready to compare with
lowrank_jax. Requires torch and galore-torch (the ``compare`` extra).
"""

from __future__ import annotations

import numpy as np

# name -> PyTorch (out, in) shape; the 1-D leaf is not projected.
SHAPES = {"tall": (40, 16), "wide": (12, 36), "square": (24, 24), "bias": (24,)}
RANK = 4
GAP = 5
STEPS = 5  # the first T steps: parity holds regardless of SVD sign conventions
LR = 0.01
SCALE = 0.25
WEIGHT_DECAY = 0.1


def problem(seed: int = 0) -> tuple[dict, list[dict]]:
    """Initial weights and the gradient stream, PyTorch layout, float32."""
    rng = np.random.default_rng(seed)
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(STEPS)
    ]
    return weights, grads


def to_flax(tree: dict) -> dict:
    return {k: (v.T.copy() if v.ndim == 2 else v) for k, v in tree.items()}


def run_reference(optimizer: str, proj_type: str, seed: int = 0) -> list[dict]:
    """Weights (Flax layout) after each of ``STEPS`` steps of the torch reference."""
    import torch
    from galore_torch import GaLoreAdafactor, GaLoreAdamW

    weights, grads = problem(seed)
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in weights.items()}
    galore_group = [params[k] for k in ("tall", "wide", "square")]
    groups = [
        {"params": [params["bias"]]},
        {
            "params": galore_group,
            "rank": RANK,
            "update_proj_gap": GAP,
            "scale": SCALE,
            "proj_type": proj_type,
        },
    ]
    if optimizer == "adamw":
        opt = GaLoreAdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
    elif optimizer == "adafactor":
        opt = GaLoreAdafactor(
            groups,
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            beta1=0.9,
            relative_step=False,
            scale_parameter=False,
        )
    else:
        raise ValueError(optimizer)
    out = []
    for step_grads in grads:
        for k, p in params.items():
            p.grad = torch.tensor(step_grads[k])
        opt.step()
        out.append(to_flax({k: p.detach().numpy().copy() for k, p in params.items()}))
    return out
