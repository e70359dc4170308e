"""Runs fira's ``FiraAdamW`` and apollo-torch's ``APOLLOAdamW`` on the GaLore parity problem.

Same weights, gradient stream, rank, gap, lr and decay as :mod:`tests.golden.torch_reference`
(a tall, a wide and a square matrix in the method's group, a 1-D leaf in the plain group);
weights come back in Flax layout after every step. Requires torch, fira and apollo-torch (the
``compare`` extra).
"""

from __future__ import annotations

from tests.golden.torch_reference import GAP, LR, RANK, WEIGHT_DECAY, problem, to_flax

MATRICES = ("tall", "wide", "square")
# name -> (method, group options); the fira alphas are the package default and the scripts'.
CASES = {
    "fira/alpha1": ("fira", {"alpha": 1.0}),
    "fira/alpha0.25": ("fira", {"alpha": 0.25}),
    "apollo/svd": ("apollo", {"proj": "svd", "scale_type": "channel", "scale": 1.0}),
    "apollo/svd-scale4-front": (
        "apollo", {"proj": "svd", "scale_type": "channel", "scale": 4.0, "scale_front": True}
    ),
    "apollo/svd-no-limiter": (
        "apollo", {"proj": "svd", "scale_type": "channel", "scale": 1.0, "disable_nl": True}
    ),
    "apollo-mini/svd": ("apollo", {"proj": "svd", "scale_type": "tensor", "scale": 128.0}),
    "apollo/random": ("apollo", {"proj": "random", "scale_type": "channel", "scale": 1.0}),
    "apollo-mini/random": ("apollo", {"proj": "random", "scale_type": "tensor", "scale": 128.0}),
}


def run_reference(case: str) -> tuple[list[dict], dict]:
    """``(weights after each step in Flax layout, {matrix: projection as (dim, r)})``.

    The projections are apollo-torch's random matrices, transposed to our ``(dim, r)`` basis
    layout (empty for fira and ``proj="svd"``).
    """
    import torch

    method, options = CASES[case]
    options = dict(options)
    weights, grads = problem()
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in weights.items()}
    group = {
        "params": [params[k] for k in MATRICES],
        "rank": RANK,
        "update_proj_gap": GAP,
        "proj_type": "std",
    }
    if method == "fira":
        from fira import FiraAdamW

        group["alpha"] = options["alpha"]
        opt = FiraAdamW(
            [{"params": [params["bias"]]}, group],
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            no_deprecation_warning=True,
        )
    else:
        from apollo_torch import APOLLOAdamW

        flags = {k: options.pop(k) for k in ("scale_front", "disable_nl") if k in options}
        group.update(options)
        opt = APOLLOAdamW(
            [{"params": [params["bias"]]}, group], lr=LR, weight_decay=WEIGHT_DECAY, **flags
        )
    out = []
    for step_grads in grads:
        for k, p in params.items():
            p.grad = torch.tensor(step_grads[k])
        opt.step()
        out.append(to_flax({k: p.detach().numpy().copy() for k, p in params.items()}))
    projections = {}
    if method == "apollo" and options.get("proj") == "random":
        for k in MATRICES:
            matrix = opt.state[params[k]]["projector"].ortho_matrix.numpy()
            m, n = weights[k].shape
            # right projector (r, n) compresses the in axis; left (m, r) the out axis
            projections[k] = matrix.T.copy() if m >= n else matrix.copy()
    return out, projections
