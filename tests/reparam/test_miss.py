"""MiSS / Bone: balance, mini and bat against PEFT (live or golden), merge and unmerge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_jax import reparam as R
from tests.golden import peft_family_reference as ref

from . import family
from .conftest import normal, perturb
from .peft_golden import forward, jax_params, reference, sources

MODES = {
    "balance": lambda: R.miss(4),
    "mini": lambda: R.miss(4, mode="mini", mini_r=2),
    "bat": lambda: R.miss(2, mode="bat"),
}


def case(source, mode):
    r = reference(source, "miss")
    prefix = f"{mode}/"
    r = {k[len(prefix) :]: v for k, v in r.items() if k.startswith(prefix)}
    params = jax_params(r)
    _, adapters = MODES[mode]().init(jax.random.key(0), params)
    trainable = {f"{m}/kernel": {"D": jnp.asarray(r[f"moved/{m}/miss_block"])} for m in ref.SHAPES}
    return r, params, adapters.replace(trainable=trainable)


@pytest.mark.parametrize("source", sources("miss"))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_forward_and_merge_match_peft(mode, source):
    r, params, adapters = case(source, mode)
    got = forward(R.apply(params, adapters), ref.X)
    np.testing.assert_allclose(got, r["moved/output"], atol=1e-5)
    assert np.abs(got - forward(params, ref.X)).max() > 1e-2
    merged, record = R.merge(params, adapters)
    for m in ref.SHAPES:
        np.testing.assert_allclose(merged[m]["kernel"], r[f"merged/{m}/weight"].T, atol=1e-5)
    back = R.unmerge(merged, adapters, record)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), back, params)


def test_balance_tiles_the_block_down_the_in_axis(key):
    w = normal(0, (10, 6))  # 10 % 4: a ragged tail uses D[:2]
    _, adapters = R.miss(4).init(key, {"w": w})
    adapters = perturb(adapters)
    d = np.asarray(adapters.trainable["w"]["D"])
    want = np.asarray(w) + d[np.arange(10) % 4]
    np.testing.assert_allclose(R.apply({"w": w}, adapters)["w"], want, atol=1e-6)
    x = normal(1, (3, 10))  # the folded forward: the sum of the input's r-chunks times D
    padded = np.concatenate([np.asarray(x), np.zeros((3, 2))], -1)
    folded = padded.reshape(3, 3, 4).sum(1)
    np.testing.assert_allclose(x @ want, x @ np.asarray(w) + folded @ d, rtol=1e-5, atol=1e-5)


def test_bat_is_block_affine(key):
    w = normal(2, (3, 4, 6))  # stacked; blocks of 2
    _, adapters = R.miss(2, mode="bat").init(key, {"w": w})
    adapters = perturb(adapters)
    d = np.asarray(adapters.trainable["w"]["D"])
    assert d.shape == (3, 3, 2, 2)
    got = np.asarray(R.apply({"w": w}, adapters)["w"])
    for layer in range(3):
        for j in range(2):
            for i in range(3):
                block = np.asarray(w)[layer, 2 * j : 2 * j + 2, 2 * i : 2 * i + 2]
                dt = d[layer, i].T
                np.testing.assert_allclose(
                    got[layer, 2 * j : 2 * j + 2, 2 * i : 2 * i + 2],
                    block + dt @ block + dt,
                    rtol=1e-5,
                    atol=1e-6,
                )


@settings(max_examples=15, deadline=None)
@given(weight=st.floats(-0.8, 2.0), seed=st.integers(0, 2**16))
def test_bat_weighted_merge_unmerge_round_trip(weight, seed):
    params = {"w": normal(seed, (4, 6))}
    _, adapters = R.miss(2, mode="bat").init(jax.random.key(0), params)
    adapters = perturb(adapters, scale=0.2, seed=seed)
    merged, record = R.merge(params, adapters, weights=[weight])
    np.testing.assert_allclose(R.unmerge(merged, adapters, record)["w"], params["w"], atol=1e-5)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_init_count_merge_io_jit(mode, key, tmp_path):
    make = {
        "balance": (lambda: R.miss(4), lambda b, i, o: b * 4 * o),
        "mini": (lambda: R.miss(4, mode="mini", mini_r=4), lambda b, i, o: b * 4 * 4),
        "bat": (lambda: R.miss(4, mode="bat"), lambda b, i, o: b * o * 4),
    }
    factory, count = make[mode]
    _, base, adapters = family.noop_and_count(factory(), key, count)
    family.merge_unmerge(base, adapters)
    family.round_trips(base, adapters, tmp_path)
    family.jitted(base, adapters)


@pytest.mark.parametrize("mode", ["balance", "bat"])
def test_nnx_fast_path(mode, key):
    rp = R.bone(2, bat=mode == "bat")
    assert rp.method == R.MiSS(rank=2, mode=mode)
    family.nnx_matches_apply(rp, key)
    if mode == "balance":
        family.never_builds_delta_w(rp, key)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: R.miss(0), "rank must be a positive int"),
        (lambda: R.miss(4, mode="tile"), "mode must be one of"),
        (lambda: R.miss(4, mode="mini", mini_r=0), "mini_r must be a positive int"),
        (
            lambda: R.miss(3, mode="bat").init(jax.random.key(0), {"w": jnp.ones((6, 8))}),
            "rank=3 must divide in=6 and out=8 of leaf 'w'",
        ),
        (
            lambda: R.miss(2, mode="mini", mini_r=3).init(
                jax.random.key(0), {"w": jnp.ones((6, 8))}
            ),
            "mini_r=3 must divide out=8",
        ),
        (lambda: R.miss(9).init(jax.random.key(0), {"w": jnp.ones((8, 12))}), "rank=9 .*'w'"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
