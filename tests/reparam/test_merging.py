"""Adapter merging: PEFT ``add_weighted_adapter`` parity (live or golden), exactness of ``cat``,
PEFT's cross terms in ``linear``, TIES/DARE properties, LoRA-LEGO, errors, save/load."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import reparam as R
from lowrank_jax.reparam import merging
from tests.golden.make_golden_merging import DARE_SEED, dare_masks
from tests.golden.peft_merging_reference import ADAPTERS, CASES, MODULES, inputs, run_peft

from .conftest import normal

GOLDEN = pathlib.Path(__file__).parents[1] / "golden" / "peft_merging.npz"
LIVE = all(importlib.util.find_spec(m) for m in ("torch", "peft"))


def base_params():
    return {m: {"kernel": jnp.zeros((n_in, n_out))} for m, (n_in, n_out) in MODULES.items()}


def ours(name):
    """The reference's source adapter ``name`` as our LoRA adapters (Flax layout)."""
    r, alpha = ADAPTERS[name]
    _, adapters = R.lora(rank=r, alpha=alpha).init(jax.random.key(0), base_params())
    arrays = inputs()
    trainable = {
        f"{m}/kernel": {
            "A": jnp.asarray(arrays[f"{name}/{m}/lora_A"].T),
            "B": jnp.asarray(arrays[f"{name}/{m}/lora_B"].T),
        }
        for m in MODULES
    }
    return adapters.replace(trainable=trainable)


def delta(adapters, path):
    return R.apply(base_params(), adapters)[path.split("/")[0]]["kernel"]


def reference(case):
    if LIVE:
        return run_peft(case, dare_masks(case))
    golden = np.load(GOLDEN)
    return {k.split("/", 1)[1]: golden[k] for k in golden.files if k.startswith(case + "/")}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_add_weighted_adapter_parity(case):
    """ΔW of the merged adapter equals PEFT's within 1e-5 (DARE with PEFT fed our masks)."""
    names, weights, combination, options = CASES[case]
    merged = R.combine_adapters(
        [ours(n) for n in names], list(weights), combination,
        key=jax.random.key(DARE_SEED), **options,
    )  # fmt: skip
    want = reference(case)
    for module in MODULES:
        path = f"{module}/kernel"
        got = np.asarray(delta(merged, path))
        a, b, s = (want[f"{module}/{k}"] for k in ("lora_A", "lora_B", "scaling"))
        np.testing.assert_allclose(got, (s * b @ a).T, atol=1e-5, rtol=1e-5)
        site = {x.path: x for x in merged.sites}[path]
        assert site.method.rank == a.shape[0] and site.method.scale == 1.0 == float(s)
        if not combination.endswith("svd"):  # factors themselves (SVD ones: up to signs)
            np.testing.assert_allclose(merged.trainable[path]["A"], a.T, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(merged.trainable[path]["B"], b.T, atol=1e-5, rtol=1e-5)


def test_golden_file_matches_live_peft():
    if not LIVE:
        pytest.skip("needs torch and peft (the compare extra) to check the golden file")
    golden = np.load(GOLDEN)
    for case in ("cat", "svd", "ties", "dare_ties"):
        for name, value in run_peft(case, dare_masks(case)).items():
            np.testing.assert_allclose(golden[f"{case}/{name}"], value, atol=1e-6)


def trained(seed, rank=3, alpha=6.0, shape=(10, 8)):
    params = {"w": jnp.zeros(shape)}
    _, a = R.lora(rank=rank, alpha=alpha).init(jax.random.key(seed), params)
    batch = shape[:-2]
    a = a.replace(
        trainable={
            "w": {
                "A": normal(seed, (*batch, shape[-2], rank)),
                "B": normal(seed + 100, (*batch, rank, shape[-1])),
            }
        }
    )
    return params, a


def test_cat_is_exact_and_linear_has_cross_terms():
    params, a = trained(0)
    _, b = trained(1, alpha=3.0)
    want = delta_of(params, a) - delta_of(params, b)
    cat = R.combine_adapters([a, b], [1.0, -1.0], "cat")
    np.testing.assert_allclose(delta_of(params, cat), want, atol=1e-5)
    # linear: (√2 A_a - 1 A_b)(√2 B_a + 1 B_b) = Σ ± s_i A_i B_i plus the cross terms.
    lin = R.combine_adapters([a, b], [1.0, -1.0], "linear")
    (aa, ba), (ab, bb) = ((x.trainable["w"]["A"], x.trainable["w"]["B"]) for x in (a, b))
    sa, sb = 2.0, 1.0
    cross = np.sqrt(sa * sb) * (aa @ bb - ab @ ba)
    np.testing.assert_allclose(delta_of(params, lin), want + cross, atol=1e-4)
    assert np.abs(cross).max() > 0.1


def delta_of(params, adapters):
    return np.asarray(R.apply(params, adapters)["w"] - params["w"])


def test_svd_is_the_best_rank_r_approximation_and_stacked_kernels():
    params, a = trained(0, shape=(2, 10, 8))
    _, b = trained(1, shape=(2, 10, 8))
    merged = R.combine_adapters([a, b], [0.5, 0.5], "svd", svd_rank=4)
    want = 0.5 * (delta_of(params, a) + delta_of(params, b))
    for i in range(2):
        u, s, vh = np.linalg.svd(want[i])
        best = (u[:, :4] * s[:4]) @ vh[:4]
        np.testing.assert_allclose(delta_of(params, merged)[i], best, atol=1e-4)
    full = R.combine_adapters([a, b], [0.5, 0.5], "svd", svd_rank=6)  # rank 6 >= 3 + 3: exact
    np.testing.assert_allclose(delta_of(params, full), want, atol=1e-4)


def test_ties_and_magnitude_pruning_properties():
    t = [normal(0, (6, 5)), normal(1, (6, 5)), normal(2, (6, 5))]
    kept = merging.combine_tensors(t[:1], [1.0], "magnitude_prune", density=0.2)
    assert int(jnp.sum(kept != 0)) == 6  # int(0.2 * 30) entries survive
    smallest_kept = float(jnp.abs(kept).min(initial=9.0, where=kept != 0))
    assert float(jnp.abs(t[0])[kept == 0].max()) <= smallest_kept
    # with density 1 and one agreeing sign everywhere, TIES is the mean of the weighted tensors
    same = [jnp.abs(x) for x in t]
    np.testing.assert_allclose(
        merging.combine_tensors(same, [1.0, 1.0, 1.0], "ties", density=1.0),
        sum(same) / 3, atol=1e-6,
    )  # fmt: skip
    # an entry where the signs disagree keeps only the elected side
    ties = merging.combine_tensors(
        [jnp.array([[2.0]]), jnp.array([[-1.0]])], [1.0, 1.0], "ties", density=1.0
    )
    assert float(ties[0, 0]) == 2.0
    freq = merging.combine_tensors(
        [jnp.array([[5.0]]), jnp.array([[-1.0]]), jnp.array([[-1.0]])], [1.0] * 3, "ties",
        density=1.0, majority_sign_method="frequency",
    )  # fmt: skip
    assert float(freq[0, 0]) == -1.0


def test_dare_is_unbiased_and_keeps_the_density():
    t = [jnp.ones((200, 100))]
    keys = [jax.random.key(3)]
    out = merging.combine_tensors(t, [1.0], "dare_linear", density=0.25, keys=keys)
    kept = float(jnp.mean(out != 0))
    assert abs(kept - 0.25) < 0.01
    assert float(jnp.max(out)) == 4.0 and abs(float(jnp.mean(out)) - 1.0) < 0.05


def test_lora_lego_properties():
    params, a = trained(0, rank=2)
    _, b = trained(1, rank=3, alpha=3.0)
    want = delta_of(params, a) + 0.5 * delta_of(params, b)
    every = R.lora_lego([a, b], [1.0, 0.5], rank=5)  # one unit per cluster: exactly cat
    np.testing.assert_allclose(delta_of(params, every), want, atol=1e-5)
    # the same adapter twice, halved: each cluster is a pair of equal units -> the adapter
    twice = R.lora_lego([b, b], [0.5, 0.5], rank=3)
    np.testing.assert_allclose(delta_of(params, twice), delta_of(params, b), atol=1e-5)
    # (a, b) and (-a, -b) are one unit
    flip = b.replace(trainable={"w": {k: -v for k, v in b.trainable["w"].items()}})
    np.testing.assert_allclose(
        delta_of(params, R.lora_lego([b, flip], [0.5, 0.5], rank=3)),
        delta_of(params, b), atol=1e-5,
    )  # fmt: skip
    # compressed merge: rank 3 < 5 units; reweighted to the norm of the sum, closer than not
    merged = R.lora_lego([a, b], [1.0, 0.5], rank=3, key=jax.random.key(1))
    assert merged.sites[0].method.rank == 3
    got = delta_of(params, merged)
    np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(want), rtol=1e-4)


def test_merged_adapter_round_trips_and_exports(tmp_path):
    params, a = trained(0)
    _, b = trained(1)
    merged = R.combine_adapters({"x": a, "y": b}, {"x": 0.3, "y": 0.7}, "ties", density=0.5)
    R.save(str(tmp_path / "ours"), merged)
    back = R.load(str(tmp_path / "ours"), params)
    np.testing.assert_array_equal(delta_of(params, back), delta_of(params, merged))
    name = lambda path, index: "proj"
    R.to_peft(str(tmp_path / "peft"), merged, module_name=name)
    loaded = R.from_peft(str(tmp_path / "peft"), params, module_name=name)
    np.testing.assert_allclose(delta_of(params, loaded), delta_of(params, merged), atol=1e-6)


def test_bad_inputs_name_the_problem():
    params, a = trained(0, rank=3)
    _, b = trained(1, rank=2)
    with pytest.raises(ValueError, match="equal ranks.*'w'.*\\[3, 2\\]"):
        R.combine_adapters([a, b], [1, 1], "linear")
    with pytest.raises(ValueError, match="needs density"):
        R.combine_adapters([a, a], [1, 1], "ties")
    with pytest.raises(ValueError, match="needs key"):
        R.combine_adapters([a, a], [1, 1], "dare_linear", density=0.5)
    with pytest.raises(ValueError, match="combination_type must be one of"):
        R.combine_adapters([a, b], [1, 1], "mean")
    with pytest.raises(ValueError, match="svd_rank=11 does not fit leaf 'w'"):
        R.combine_adapters([a, b], [1, 1], "svd", svd_rank=11)
    with pytest.raises(ValueError, match="2 weights for 3 adapters"):
        R.combine_adapters([a, b, a], [1, 1], "cat")
    _, d = R.dora(rank=3).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="leaf 'w' is adapted by DoRA"):
        R.combine_adapters([a, d], [1, 1], "cat")
    _, p = R.pissa(rank=3).init(jax.random.key(0), {"w": normal(0, (10, 8))})
    with pytest.raises(ValueError, match="to_base_lora"):
        R.combine_adapters([a, p], [1, 1], "cat")
    _, other = trained(2, shape=(8, 10))
    with pytest.raises(ValueError, match="different models"):
        R.combine_adapters([a, other], [1, 1], "cat")
    with pytest.raises(ValueError, match="rank=9 at leaf 'w'"):
        R.lora_lego([a, b], rank=9)


@pytest.mark.parametrize("combination", ["dare_ties", "ties_svd"])
def test_combine_adapters_jits(combination):
    params, a = trained(0)
    _, b = trained(1)
    run = lambda a, b, key: R.combine_adapters(
        [a, b], [0.6, -0.3], combination, density=0.5, key=key
    )
    key = jax.random.key(5)
    eager, jitted = run(a, b, key), jax.jit(run)(a, b, key)
    np.testing.assert_allclose(delta_of(params, jitted), delta_of(params, eager), atol=1e-5)
