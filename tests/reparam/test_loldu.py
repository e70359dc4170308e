"""LoLDU: the truncated LDU factors of W, a residual base, and only the diagonal trained."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from lowrank_jax import reparam as R
from lowrank_jax.reparam.loldu import ldu_factors

from . import family
from .conftest import normal, perturb


@pytest.mark.parametrize("shape", [(8, 6), (5, 9)])
def test_factors_match_scipy_and_rebuild_the_weight(shape):
    w = normal(0, shape)
    k = min(shape)
    u, d, low = ldu_factors(w, k)
    p, lo, up = scipy.linalg.lu(np.asarray(w, np.float64).T)  # W = Kᵀ = P L U
    np.testing.assert_allclose(low, (p @ lo)[:, :k].T, atol=1e-5)
    np.testing.assert_allclose(d, np.diag(up)[:k], rtol=1e-5)
    np.testing.assert_allclose(u, (up / np.diag(up)[:, None])[:k].T, atol=1e-4)
    # P L diag(d) U' = W at full rank.
    np.testing.assert_allclose((u * d) @ low, w, atol=1e-5)


def test_residual_base_and_the_trained_diagonal(key):
    w = normal(1, (8, 6))
    base, adapters = R.loldu(3, alpha=1.5).init(key, {"w": w})
    np.testing.assert_allclose(R.apply(base, adapters)["w"], w, atol=1e-5)  # W' = W at init
    f = adapters.frozen["w"]
    u, d, low = ldu_factors(w, 3)
    np.testing.assert_allclose(adapters.trainable["w"]["z"], d)
    np.testing.assert_allclose(base["w"], w - 0.5 * (u * d) @ low, atol=1e-5)  # s = 1.5 / 3
    moved = perturb(adapters)
    z = np.asarray(moved.trainable["w"]["z"])
    want = np.asarray(base["w"]) + 0.5 * (np.asarray(f["U"]) * z) @ np.asarray(f["L"])
    np.testing.assert_allclose(R.apply(base, moved)["w"], want, atol=1e-5)


def test_rank_deficient_weight_keeps_finite_factors(key):
    w = jnp.outer(normal(2, (8,)), normal(3, (6,)))  # rank 1: pivots 2.. are (near) zero
    base, adapters = R.loldu(3).init(key, {"w": w})
    for leaf in jax.tree.leaves((adapters.trainable, adapters.frozen)):
        assert np.all(np.isfinite(leaf)) and float(jnp.abs(leaf).max()) < 1e3
    np.testing.assert_allclose(R.apply(base, adapters)["w"], w, atol=1e-5)


def test_train_scale_adds_one_parameter(key):
    params = {"w": normal(4, (3, 8, 6))}
    base, adapters = R.loldu(2, train_scale=True).init(key, params)
    assert R.num_trainable(adapters) == 3 * (2 + 1)
    np.testing.assert_allclose(R.apply(base, adapters)["w"], params["w"], atol=1e-5)
    grads = jax.grad(lambda t: jnp.sum(R.apply(base, adapters.replace(trainable=t))["w"] ** 3))(
        perturb(adapters).trainable
    )
    assert float(jnp.abs(grads["w"]["s"]).min()) > 0


@pytest.mark.parametrize("train_scale", [False, True])
def test_init_count_merge_io_jit(train_scale, key, tmp_path):
    count = lambda b, i, o: b * (2 + int(train_scale))
    rp = R.loldu(2, train_scale=train_scale)
    _, base, adapters = family.noop_and_count(rp, key, count, atol=1e-5)
    family.merge_unmerge(base, adapters)
    family.round_trips(base, adapters, tmp_path)
    family.jitted(base, adapters)


@pytest.mark.parametrize("train_scale", [False, True])
def test_nnx_fast_path(train_scale, key):
    family.nnx_matches_apply(R.loldu(2, train_scale=train_scale), key)
    family.never_builds_delta_w(R.loldu(2, train_scale=train_scale), key)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: R.loldu(0), "rank must be a positive int"),
        (lambda: R.loldu(2, alpha=-1.0), "alpha must be a number >= 0"),
        (lambda: R.loldu(9).init(jax.random.key(0), {"w": jnp.ones((8, 12))}), "rank=9 .*'w'"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
