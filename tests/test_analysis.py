"""Intruder dimensions and effective rank on constructed matrices with known answers; PEFT's
intruder mitigation (live, with the compare extra)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import MatrixDims, analysis
from lowrank_jax import reparam as R


def orthonormal(seed, n, k):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q[:, :k]


def base_weight(seed=0, n_out=12, n_in=8):
    """A PyTorch-layout (out, in) weight with singular values 4, 3.5, ..., its left vectors
    spanning 8 of the 12 output directions; and an output direction orthogonal to all of them."""
    full = orthonormal(seed, n_out, n_out)
    u, outside = full[:, :n_in], full[:, n_in]
    v = orthonormal(seed + 1, n_in, n_in)
    s = 4.0 - 0.5 * np.arange(n_in)
    return (u * s) @ v.T, u, v, outside


def test_a_new_dominant_direction_is_exactly_one_intruder():
    w, u, v, outside = base_weight()
    # input v_7 (σ_7 = 0.5) now also drives a new output direction, ⟂ every old one, with 6:
    # the top vector is (0.5 u_7 + 6 outside) / ‖·‖, cosine 0.5 / √36.25 = 0.083 with u_7
    spike = 6.0 * np.outer(outside, v[:, 7])
    got = analysis.intruder_dimensions(w.T, (w + spike).T, top_k=5)  # Flax kernels (in, out)
    assert int(got.count) == 1 and got.mask.tolist() == [True] + [False] * 4
    assert float(got.similarity[0]) == pytest.approx(0.5 / np.sqrt(36.25), abs=1e-5)
    assert float(got.singular_values[0]) == pytest.approx(np.sqrt(36.25), abs=1e-4)
    # the same update in PyTorch layout, through dims
    torch_dims = MatrixDims(in_axis=-1, out_axis=-2)
    same = analysis.intruder_dimensions(w, w + spike, top_k=5, dims=torch_dims)
    np.testing.assert_allclose(same.similarity, got.similarity, atol=1e-6)


def test_an_update_inside_the_top_subspace_has_no_intruders():
    w, u, v, _ = base_weight()
    boost = 3.0 * np.outer(u[:, 0], v[:, 0]) + 0.5 * np.outer(u[:, 1], v[:, 1])
    got = analysis.intruder_dimensions(w.T, (w + boost).T)
    assert int(got.count) == 0
    np.testing.assert_allclose(got.similarity, 1.0, atol=1e-5)  # same vectors, reordered
    assert got.mask.shape == (8,)  # top_k=10 examines the 8 that exist


def test_stacked_weights_are_analysed_one_matrix_at_a_time():
    w, _, v, outside = base_weight()
    before = np.stack([w.T, w.T])
    after = np.stack([(w + 6.0 * np.outer(outside, v[:, 7])).T, w.T])
    got = analysis.intruder_dimensions(before, after, top_k=3)
    assert got.count.tolist() == [1, 0] and got.mask.shape == (2, 3)
    jitted = jax.jit(lambda b, a: analysis.intruder_dimensions(b, a, top_k=3))(before, after)
    np.testing.assert_array_equal(jitted.count, got.count)


def test_effective_rank_on_known_spectra():
    u, v = orthonormal(0, 9, 9), orthonormal(1, 7, 7)

    def matrix(s):
        return (u[:, : len(s)] * np.asarray(s)) @ v[:, : len(s)].T

    for method in ("entropy", "stable", "energy"):
        assert float(analysis.effective_rank(matrix([2.0, 2.0, 2.0]), method=method)) == (
            pytest.approx(3.0, abs=1e-4)
        )
        assert float(analysis.effective_rank(np.zeros((9, 7)), method=method)) == 0.0
    spectrum = matrix([2.0, 1.0, 1.0])
    assert float(analysis.effective_rank(spectrum)) == pytest.approx(np.exp(1.5 * np.log(2)), 1e-5)
    assert float(analysis.effective_rank(spectrum, method="stable")) == pytest.approx(1.5, 1e-5)
    assert float(analysis.effective_rank(spectrum, method="energy", energy=0.9)) == 3.0
    assert float(analysis.effective_rank(spectrum, method="energy", energy=0.8)) == 2.0
    # a LoRA update of rank r never has an effective rank above r
    params = {"w": jnp.zeros((2, 16, 10))}
    _, ad = R.lora(rank=3).init(jax.random.key(0), params)
    b = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 10)), jnp.float32)
    update = R.apply(params, ad.replace(trainable={"w": {**ad.trainable["w"], "B": b}}))["w"]
    ranks = analysis.effective_rank(update, method="energy", energy=1.0)
    assert ranks.shape == (2,) and ranks.tolist() == [3.0, 3.0]


def test_bad_inputs_name_the_problem():
    w = np.ones((4, 3))
    with pytest.raises(ValueError, match="one shape"):
        analysis.intruder_dimensions(w, np.ones((3, 4)))
    with pytest.raises(ValueError, match="side must be one of"):
        analysis.intruder_dimensions(w, w, side="left")
    with pytest.raises(ValueError, match="top_k >= 1"):
        analysis.intruder_dimensions(w, w, top_k=0)
    with pytest.raises(ValueError, match="w_before must be a floating-point matrix"):
        analysis.intruder_dimensions(np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="method must be one of"):
        analysis.effective_rank(w, method="nuclear")
    _, dora = R.dora(rank=2).init(jax.random.key(0), {"w": jnp.ones((4, 3))})
    with pytest.raises(ValueError, match="leaf 'w' is DoRA"):
        analysis.reduce_intruders({"w": jnp.ones((4, 3))}, dora)


def lora_with_intruder():
    """Base (in 8, out 12) and a rank-2 LoRA whose update points outside the base's outputs."""
    w, _, v, outside = base_weight()
    params = {"proj": {"kernel": jnp.asarray(w.T, jnp.float32)}}
    _, ad = R.lora(rank=2, alpha=4).init(jax.random.key(0), params)
    second = orthonormal(5, 12, 12)[:, 0]
    a = np.stack([v[:, 2], v[:, 5]], axis=1)  # (in, r)
    b = np.stack([3.5 * outside, 0.2 * second])  # (r, out); s = 2: σ = 7 on `outside`
    trainable = {
        "proj/kernel": {"A": jnp.asarray(a, jnp.float32), "B": jnp.asarray(b, jnp.float32)}
    }
    return params, ad.replace(trainable=trainable)


def test_reduce_intruders_shrinks_the_intruder_and_keeps_the_rest():
    params, ad = lora_with_intruder()
    new, counts = analysis.reduce_intruders(params, ad, top_k=4, mitigation_lambda=0.5)
    assert int(counts["proj/kernel"]) == 1
    before = analysis.intruder_dimensions(
        params["proj"]["kernel"], R.apply(params, ad)["proj"]["kernel"], top_k=4
    )
    after = analysis.intruder_dimensions(
        params["proj"]["kernel"], R.apply(params, new)["proj"]["kernel"], top_k=4
    )
    top = float(before.singular_values[0])
    assert float(after.singular_values[before.mask].max(initial=0)) < top
    # λ = 1 changes nothing
    same, _ = analysis.reduce_intruders(params, ad, top_k=4, mitigation_lambda=1.0)
    np.testing.assert_allclose(
        R.apply(params, same)["proj"]["kernel"], R.apply(params, ad)["proj"]["kernel"], atol=1e-5
    )


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "peft")),
    reason="PEFT parity needs torch and peft: pip install '.[compare]'",
)
def test_reduce_intruders_matches_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    params, ad = lora_with_intruder()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 12, bias=False)

        def forward(self, x):
            return self.proj(x)

    net = Net()
    with torch.no_grad():
        net.proj.weight.copy_(torch.from_numpy(np.asarray(params["proj"]["kernel"]).T.copy()))
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(
            torch.from_numpy(np.asarray(ad.trainable["proj/kernel"]["A"]).T.copy())
        )
        layer.lora_B["default"].weight.copy_(
            torch.from_numpy(np.asarray(ad.trainable["proj/kernel"]["B"]).T.copy())
        )
    log = []
    reduce_intruder_dimension(model, top_k=4, mitigation_lambda=0.6, logging_sink=log.append)
    want = (layer.get_delta_weight("intruder_reduced")).detach().numpy().T
    new, counts = analysis.reduce_intruders(params, ad, top_k=4, mitigation_lambda=0.6)
    got = R.apply(params, new)["proj"]["kernel"] - params["proj"]["kernel"]
    assert any("Intruders: 1" in line for line in log) and int(counts["proj/kernel"]) == 1
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_docstring_examples():
    import doctest

    assert doctest.testmod(analysis, optionflags=doctest.ELLIPSIS).failed == 0
