"""fira_adamw and apollo_adamw reproduce fira 1.0.2 and apollo-torch 1.0.3 over the first T steps.

Live against torch when the ``compare`` extra is installed; otherwise against the committed
golden trajectories written by ``python -m tests.golden.make_golden_fira_apollo``. APOLLO's
random projection cannot be drawn by JAX's generator, so it is shown twice: with
``proj="svd"`` (which apollo-torch offers) and with apollo-torch's own random matrices
injected through ``proj=``.
"""

import functools
import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax.optimizers import apollo_adamw, fira_adamw
from lowrank_jax.transforms import decoupled_weight_decay, fira, scale_by_adam_hf
from tests.golden import fira_apollo_reference as fa
from tests.golden import torch_reference as ref
from tests.transforms.test_galore_parity import run_ours

GOLDEN = pathlib.Path(fa.__file__).with_name("fira_apollo_torch.npz")
HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "fira", "apollo_torch"))
SOURCES = ["golden"] + (["live"] if HAVE_TORCH else [])
# The gain ‖N_k‖/‖R_k‖ turns the float32 round-off of the SVD basis (~1e-6 here) into
# ~1e-5 weight differences: both implementations are that far from a float64 evaluation of
# the same formulas. Any wrong detail (variant, bias correction, limiter, granularity,
# sqrt(scale)) moves the weights by > 2e-2 (test_parity_is_sensitive_to_the_details).
ATOL, RTOL = 5e-5, 2e-5


@functools.cache
def reference(source, case):
    if source == "live":
        return fa.run_reference(case)
    data = np.load(GOLDEN)
    trajectory = [
        {name: data[f"{case}/{step}/{name}"] for name in ref.SHAPES} for step in range(ref.STEPS)
    ]
    projections = {k: data[f"{case}/proj/{k}"] for k in fa.MATRICES if f"{case}/proj/{k}" in data}
    return trajectory, projections


def injected(projections):
    """apollo's ``proj`` callable returning the reference's matrix of each leaf."""

    def proj(path, shape, key):
        assert projections[path].shape == shape
        return jnp.asarray(projections[path])

    return proj


def ours(case, projections, **overrides):
    common = dict(rank=ref.RANK, update_proj_gap=ref.GAP, weight_decay=ref.WEIGHT_DECAY)
    method, options = fa.CASES[case]
    if method == "fira":
        return fira_adamw(ref.LR, scale=options["alpha"], **common, **overrides)
    kwargs = dict(
        scale=options["scale"],
        scale_type=options["scale_type"],
        proj="svd" if options["proj"] == "svd" else injected(projections),
        scale_front=options.get("scale_front", False),
        limiter=None if options.get("disable_nl") else 1.01,
    )
    kwargs.update(overrides)
    return apollo_adamw(ref.LR, **common, **kwargs)


def assert_close(a_traj, b_traj, atol=ATOL):
    for step, (a, b) in enumerate(zip(a_traj, b_traj, strict=True)):
        for name in ref.SHAPES:
            np.testing.assert_allclose(
                a[name], b[name], rtol=RTOL, atol=atol, err_msg=f"step {step} leaf {name}"
            )


@pytest.mark.parametrize("case", list(fa.CASES))
def test_matches_the_torch_reference(case):
    trajectory = None
    for source in SOURCES:
        theirs, projections = reference(source, case)
        trajectory = trajectory or run_ours(ours(case, projections))
        # injected random matrices: no SVD, so plain float32 round-off
        atol = 5e-6 if projections else ATOL
        assert_close(trajectory, theirs, atol)


@pytest.mark.parametrize(
    "case,overrides",
    [
        ("fira/alpha0.25", {"variant": "paper"}),
        ("fira/alpha0.25", {"limiter": None}),
        ("apollo/svd", {"scale_type": "tensor"}),
        ("apollo/svd-scale4-front", {"scale": 1.0}),  # sqrt(scale) multiplies the update
    ],
)
def test_parity_is_sensitive_to_the_details(case, overrides):
    theirs, projections = reference("golden", case)
    with pytest.raises(AssertionError):
        assert_close(run_ours(ours(case, projections, **overrides)), theirs)


def test_bias_correction_must_stay_outside_the_gain():
    """fira(scale_by_adam_hf()) (φ from the corrected ratio) is not the reference."""
    theirs, _ = reference("golden", "fira/alpha0.25")
    corrected_inside = optax.chain(
        fira(scale_by_adam_hf(), rank=ref.RANK, update_proj_gap=ref.GAP, scale=0.25),
        optax.scale_by_learning_rate(ref.LR),
        decoupled_weight_decay(ref.LR, ref.WEIGHT_DECAY, after_update=True),
    )
    with pytest.raises(AssertionError):
        assert_close(run_ours(corrected_inside), theirs)
