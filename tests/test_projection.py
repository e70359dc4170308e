"""Subspace math: properties of bases and projections (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_jax import projection

shapes = st.tuples(st.integers(2, 24), st.integers(2, 24))


@settings(max_examples=12, deadline=None)
@given(shape=shapes, rank=st.integers(1, 24), proj_type=st.sampled_from(projection.PROJ_TYPES),
       seed=st.integers(0, 2**16))
def test_project_back_of_project_is_an_orthogonal_projection(shape, rank, proj_type, seed):
    n_in, n_out = shape
    rank = min(rank, n_in, n_out)
    g = jax.random.normal(jax.random.key(seed), shape)
    side = projection.choose_side(proj_type, n_in, n_out)
    proj = projection.compute_projector(g, side, rank, "svd")
    for b in proj:
        if b is not None:
            np.testing.assert_allclose(b.T @ b, np.eye(rank), atol=2e-5)
    low = projection.project(g, proj)
    assert low.shape == projection.lowrank_shape(shape, side, rank)
    back = projection.project_back(low, proj)
    again = projection.project_back(projection.project(back, proj), proj)
    np.testing.assert_allclose(again, back, atol=2e-4)
    # the projection never increases the norm, and keeps the top-r energy exactly
    s = np.linalg.svd(np.asarray(g), compute_uv=False)
    kept = np.sum(s[:rank] ** 2)
    np.testing.assert_allclose(np.sum(np.asarray(back) ** 2), kept, rtol=1e-4)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), rank=st.integers(1, 6))
def test_randomized_recovers_an_exactly_low_rank_subspace(seed, rank):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    g = jax.random.normal(k1, (40, rank)) @ jax.random.normal(k2, (rank, 30))
    u_exact, v_exact = projection.svd_basis(g, rank)
    u, v = projection.randomized_svd(g, rank, k3)
    # same subspaces: |U_exactᵀ U| has singular values 1
    for a, b in ((u_exact, u), (v_exact, v)):
        np.testing.assert_allclose(np.linalg.svd(np.asarray(a.T @ b), compute_uv=False),
                                   np.ones(rank), atol=1e-4)


def test_randomized_is_close_to_svd_on_decaying_spectra():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q1, _ = jnp.linalg.qr(jax.random.normal(k1, (128, 64)))
    q2, _ = jnp.linalg.qr(jax.random.normal(k2, (96, 64)))
    g = (q1 * (0.9 ** jnp.arange(64))) @ q2.T
    u_exact, _ = projection.svd_basis(g, 8)
    u, _ = projection.randomized_svd(g, 8, k3)
    captured = jnp.linalg.norm(u.T @ g) / jnp.linalg.norm(u_exact.T @ g)
    assert captured > 0.999


def test_batched_bases_equal_per_matrix():
    g = jax.random.normal(jax.random.key(1), (3, 10, 7))
    batched = projection.compute_projector(g, "both", 3, "svd")
    for i in range(3):
        single = projection.compute_projector(g[i], "both", 3, "svd")
        np.testing.assert_allclose(jnp.abs(batched.in_basis[i]), jnp.abs(single.in_basis),
                                   atol=1e-5)


def test_random_basis_needs_no_gradient_values():
    proj = projection.compute_projector(jnp.zeros((12, 9)), "in", 4, "random", jax.random.key(2))
    np.testing.assert_allclose(proj.in_basis.T @ proj.in_basis, np.eye(4), atol=1e-5)
    assert proj.out_basis is None
