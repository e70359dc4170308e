"""RandLoRA: the full-rank update from frozen random bases, against PEFT (live or golden)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import reparam as R
from tests.golden import peft_family_reference as ref

from . import family
from .conftest import normal, perturb
from .peft_golden import forward, jax_params, reference, sources

CFG = ref.RANDLORA


def from_peft(r, params):
    """Our adapters holding PEFT's scalings and its bases as sliced for each layer."""
    _, adapters = R.randlora(CFG["r"], CFG["randlora_alpha"]).init(jax.random.key(0), params)
    trainable, frozen = {}, {}
    for m, (n_in, n_out) in ref.SHAPES.items():
        small, large, terms = min(n_in, n_out), max(n_in, n_out), math.ceil(min(n_in, n_out) / 2)
        trainable[f"{m}/kernel"] = {
            "lambda": jnp.asarray(r[f"moved/{m}/randlora_lambda"]),
            "gamma": jnp.asarray(r[f"moved/{m}/randlora_gamma"]),
        }
        frozen[f"{m}/kernel"] = {
            "A": jnp.asarray(r[f"moved/{m}/randlora_A"][:, 0, :small]),
            "B": jnp.asarray(r[f"moved/{m}/randlora_B"][:large, :terms, :]),
        }
    return adapters.replace(trainable=trainable, frozen=frozen)


@pytest.mark.parametrize("source", sources("randlora"))
def test_forward_matches_peft(source):
    # q_proj is wide in the torch sense (out 5 < in 6: ΔK = Δ), v_proj tall (in 6 <= out 7: Δᵀ).
    r = reference(source, "randlora")
    params = jax_params(r)
    adapters = from_peft(r, params)
    got = forward(R.apply(params, adapters), ref.X)
    np.testing.assert_allclose(got, r["moved/output"], atol=1e-5)
    assert np.abs(got - forward(params, ref.X)).max() > 1e-2
    merged, _ = R.merge(params, adapters)
    np.testing.assert_allclose(forward(merged, ref.X), r["moved/output"], atol=1e-5)


def test_update_is_the_sum_over_bases_in_peft_pairing(key):
    w = normal(0, (5, 9))  # in 5 <= out 9: d = 5, D = 9, r = 2, N = 3
    _, adapters = R.randlora(2, 4.0, store_bases=True).init(key, {"w": w})
    adapters = perturb(adapters)
    a, b = (np.asarray(adapters.frozen["w"][k], np.float64) for k in ("A", "B"))
    lam = np.asarray(adapters.trainable["w"]["lambda"], np.float64)
    gamma = np.asarray(adapters.trainable["w"]["gamma"], np.float64)
    assert a.shape == (2, 5) and b.shape == (9, 3, 2)
    # Column c = b·r + k of B̃ meets row c of Ã = row (c // N, c % N) of λ⊗A⊗γ (PEFT's orders).
    delta = np.zeros((9, 5))
    for c in range(6):
        k, n = divmod(c, 3)
        delta += np.outer(b[:, c // 2, c % 2], lam[k, n] * a[k] * gamma[n])
    want = np.asarray(w) + 2.0 * delta.T  # s = 4/2; in <= out: ΔK = Δᵀ
    np.testing.assert_allclose(R.apply({"w": w}, adapters)["w"], want, rtol=1e-5, atol=1e-5)
    # Full rank: with N·r >= d the update reaches rank d = 5.
    assert np.linalg.matrix_rank(R.apply({"w": w}, adapters)["w"] - w, tol=1e-5) == 5


def test_seeded_bases_equal_stored_ones_and_are_not_saved(key, tmp_path):
    params = {"a": normal(1, (8, 6)), "b": normal(2, (8, 6))}
    _, seeded = R.randlora(4, 8.0).init(key, params)
    _, stored = R.randlora(4, 8.0, store_bases=True).init(key, params)
    seeded = perturb(seeded)
    stored = stored.replace(trainable=seeded.trainable)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
        R.apply(params, seeded),
        R.apply(params, stored),
    )
    np.testing.assert_array_equal(seeded.frozen["a"]["seed"], seeded.frozen["b"]["seed"])  # shared
    R.save(str(tmp_path), seeded)
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 2048
    bound = stored.frozen["a"]["A"]
    assert float(jnp.abs(bound).max()) <= 1 / np.sqrt(6)  # Kaiming U(±1/√d)


def test_official_scaling_divides_by_root_terms(key):
    w = {"w": normal(3, (8, 6))}
    _, adapters = R.randlora(2, 4.0, scale_by_terms=True).init(key, w)
    adapters = perturb(adapters)
    _, plain = R.randlora(2, 4.0).init(key, w)
    plain = plain.replace(trainable=adapters.trainable)
    d1, d2 = (R.apply(w, x)["w"] - w["w"] for x in (adapters, plain))
    np.testing.assert_allclose(d1, d2 / np.sqrt(3), rtol=1e-5, atol=1e-6)


def test_init_count_merge_io_jit(key, tmp_path):
    def count(b, i, o):
        d = min(i, o)
        n = math.ceil(d / 3)
        return b * n * (3 + d)

    _, base, adapters = family.noop_and_count(R.randlora(3, 6.0), key, count)
    family.merge_unmerge(base, adapters)
    family.round_trips(base, adapters, tmp_path)
    family.jitted(base, adapters)


def test_nnx_fast_path(key):
    family.nnx_matches_apply(R.randlora(2, 4.0), key)
    family.never_builds_delta_w(R.randlora(2, 4.0), key)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: R.randlora(0), "rank must be a positive int"),
        (lambda: R.randlora(4, seed=-1), "seed must be an int >= 0"),
        (lambda: R.randlora(4, dropout=2.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
