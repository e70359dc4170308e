"""Hydra: parallel and sequential branches, the bias through the sequential branch, unmerge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import reparam as R

from . import family
from .conftest import normal, perturb


def three_branches(x, w, b, t, s):
    """The reference forward: (xW + b) + s·x P_d P_u + s·(xW + b) S_d S_u."""
    base = x @ w + b
    return base + s * (x @ t["P_d"] @ t["P_u"]) + s * (base @ t["S_d"] @ t["S_u"])


def test_merged_forward_equals_the_three_branches_with_bias(key):
    params = {"proj": {"kernel": normal(0, (8, 6)), "bias": normal(1, (6,))}}
    _, adapters = R.hydra(3, 2, scale=0.7).init(key, params)
    adapters = perturb(adapters)
    t = {k: np.asarray(v, np.float64) for k, v in adapters.trainable["proj/kernel"].items()}
    x = np.asarray(normal(2, (5, 8)), np.float64)
    want = three_branches(
        x, np.asarray(params["proj"]["kernel"]), np.asarray(params["proj"]["bias"]), t, 0.7
    )
    eff = R.apply(R.hydra_bias(params, adapters), adapters)["proj"]
    np.testing.assert_allclose(x @ eff["kernel"] + eff["bias"], want, rtol=1e-5, atol=1e-5)
    # Without the bias helper the sequential branch sees xW only (the wrap layers' semantics).
    plain = R.apply(params, adapters)["proj"]
    no_bias_route = want - 0.7 * np.asarray(params["proj"]["bias"]) @ t["S_d"] @ t["S_u"]
    np.testing.assert_allclose(
        x @ plain["kernel"] + plain["bias"], no_bias_route, rtol=1e-5, atol=1e-5
    )
    back = R.hydra_bias(R.hydra_bias(params, adapters), adapters, inverse=True)
    np.testing.assert_allclose(back["proj"]["bias"], params["proj"]["bias"], atol=1e-6)


def test_stacked_bias_and_kernel(key):
    params = {"mlp": {"kernel": normal(3, (2, 8, 6)), "bias": normal(4, (2, 6))}}
    _, adapters = R.hydra(2).init(key, params)
    adapters = perturb(adapters)
    t = adapters.trainable["mlp/kernel"]
    got = R.hydra_bias(params, adapters)["mlp"]["bias"]
    for layer in range(2):
        b = params["mlp"]["bias"][layer]
        want = b + b @ t["S_d"][layer] @ t["S_u"][layer]
        np.testing.assert_allclose(got[layer], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["kaiming", "lora"])
def test_init_count_merge_io_jit(init, key, tmp_path):
    count = lambda b, i, o: b * (3 * (i + o) + 2 * 2 * o)  # r_p(in + out) + 2·r_s·out
    _, base, adapters = family.noop_and_count(R.hydra(3, 2, init=init), key, count)
    family.merge_unmerge(base, adapters)  # W(I + sS) + sP: unmerged by Woodbury
    family.round_trips(base, adapters, tmp_path)
    family.jitted(base, adapters)


def test_inits(key):
    w = {"w": normal(5, (16, 8))}
    _, k = R.hydra(4, init="kaiming").init(key, w)
    _, g = R.hydra(4, init="lora").init(key, w)
    assert float(jnp.abs(k.trainable["w"]["P_d"]).max()) <= 1 / 4  # U(±1/√in)
    assert float(jnp.abs(k.trainable["w"]["S_d"]).max()) <= 1 / np.sqrt(8)  # U(±1/√out)
    assert 0.01 < float(jnp.std(g.trainable["w"]["P_d"])) < 0.03  # N(0, 0.02²)
    assert not np.any(k.trainable["w"]["P_u"]) and not np.any(k.trainable["w"]["S_u"])


def test_nnx_fast_path(key):
    family.nnx_matches_apply(R.hydra(2, 3), key)
    family.never_builds_delta_w(R.hydra(2, 3), key)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: R.hydra(0), "parallel_rank must be a positive int"),
        (lambda: R.hydra(2, 0), "sequential_rank must be a positive int"),
        (lambda: R.hydra(2, init="zeros"), "init must be one of"),
        (
            lambda: R.hydra(2, 9).init(jax.random.key(0), {"w": jnp.ones((12, 8))}),
            "sequential_rank=9 does not fit leaf 'w'",
        ),
        (
            lambda: R.hydra_bias({}, R.lora(2).init(jax.random.key(0), {"w": jnp.ones((4, 4))})[1]),
            "no Hydra site",
        ),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
