"""Initialisations: PiSSA, OLoRA, LoRA-GA, EVA, LoRA-XS/SB, and the calibration hook."""

import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import reparam as R

from .conftest import normal

W = np.asarray(normal(7, (12, 10)))


def factors(adapters, path="w"):
    both = {**adapters.frozen[path], **adapters.trainable[path]}
    return np.asarray(both["A"]), np.asarray(both["B"])


def test_pissa_takes_the_principal_singular_triplets(key):
    base, adapters = R.pissa(3, 6.0).init(key, {"w": W})
    a, b = factors(adapters)
    u, s, vh = np.linalg.svd(W, full_matrices=False)
    top = (u[:, :3] * s[:3]) @ vh[:3]
    np.testing.assert_allclose(2.0 * a @ b, top, atol=1e-5)  # s = 6/3
    np.testing.assert_allclose(base["w"], W - top, atol=1e-5)
    # Balanced split: A = U√(S/s), B = √(S/s)Vᵀ have equal column / row norms.
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-5)


def test_pissa_randomized_matches_exact(key):
    _, exact = R.pissa(3).init(key, {"w": W})
    _, fast = R.pissa(3, niter=4).init(key, {"w": W})
    prod = lambda ad: np.matmul(*factors(ad))
    np.testing.assert_allclose(prod(fast), prod(exact), atol=1e-3)


def test_olora_uses_the_qr_factors(key):
    base, adapters = R.olora(4).init(key, {"w": W})
    a, b = factors(adapters)
    q, r = np.linalg.qr(W.T)  # PEFT's (out, in) weight
    np.testing.assert_allclose(np.abs(b), np.abs(q[:, :4].T), atol=1e-5)
    np.testing.assert_allclose(np.abs(a), np.abs(r[:4].T), atol=1e-4)
    np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(base["w"] + a @ b, W, atol=1e-5)


def grad_calibration(rp, params, grads):
    cal = rp.calibration(params)
    for g in grads:
        cal.add_gradients({"w": g, "ignored": jnp.ones(3)})
    return cal


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr"])
def test_loraga_follows_the_gradient_svd(key, direction):
    g1, g2 = (np.asarray(normal(s, W.shape)) for s in (1, 2))
    rp = R.loraga(2, 4.0, ga_direction=direction)
    base, adapters = rp.init(key, {"w": W}, calibration=grad_calibration(rp, {"w": W}, [g1, g2]))
    a, b = factors(adapters)
    p, s, qh = np.linalg.svd((g1 + g2) / 2)
    first, second = (
        (slice(0, 2), slice(2, 4)) if direction == "ArB2r" else (slice(2, 4), slice(0, 2))
    )
    stable = 10**0.25 / 4.0  # out^(1/4) / sqrt(gamma=16)
    np.testing.assert_allclose(np.abs(a), np.abs(p[:, first]), atol=1e-5)
    np.testing.assert_allclose(np.abs(b), np.abs(s[second, None] * qh[second]) * stable, atol=1e-4)
    np.testing.assert_allclose(base["w"] + 2.0 * a @ b, W, atol=1e-5)  # residual: a no-op
    assert R.num_trainable(adapters) == 2 * (12 + 10)


def test_lora_sb_starts_at_the_best_rank_r_first_step(key):
    g = np.asarray(normal(3, W.shape))
    rp = R.lora_sb(3, lr=1e-2)
    base, adapters = rp.init(key, {"w": W}, calibration=grad_calibration(rp, {"w": W}, [g]))
    step = -1e-2 * np.sign(g)
    u, s, vh = np.linalg.svd(step)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    np.testing.assert_allclose(R.apply(base, adapters)["w"] - W, best, atol=1e-6)
    assert R.num_trainable(adapters) == 9
    no_op = R.lora_sb(3, lr=1e-2, residual=True)
    base, adapters = no_op.init(key, {"w": W}, calibration=grad_calibration(rp, {"w": W}, [g]))
    np.testing.assert_allclose(R.apply(base, adapters)["w"], W, atol=1e-6)


def test_lora_xs_factors_are_the_truncated_svd(key):
    _, adapters = R.lora_xs(3, core_init_std=1e-5).init(key, {"w": W})
    a, b = adapters.frozen["w"]["A"], adapters.frozen["w"]["B"]
    u, s, vh = np.linalg.svd(W, full_matrices=False)
    np.testing.assert_allclose(np.abs(a), np.abs(u[:, :3] * s[:3]), atol=1e-4)
    np.testing.assert_allclose(np.abs(b), np.abs(vh[:3]), atol=1e-5)
    assert 0 < float(jnp.abs(adapters.trainable["w"]["R"]).max()) < 1e-4  # the reference's init


def activations(key, n=64, scales=None):
    scales = jnp.linspace(3.0, 0.1, 12) if scales is None else scales
    mix = np.linalg.qr(np.asarray(normal(4, (12, 12))))[0] * scales[:, None]
    return normal(5, (n, 12)) @ mix + 0.5


def test_eva_takes_the_principal_directions_of_the_inputs(key):
    params = {"w": W, "v": W.copy()}
    rp = R.eva(3, eva_rho=1.0)  # no redistribution
    cal = rp.calibration(params)
    x = np.asarray(activations(key))
    for batch in (x[:30], x[30:60]):  # accumulation over batches is exact
        cal.add_activations({"w": batch.reshape(2, 15, 12), "v": batch})
    base, adapters = rp.init(key, params, calibration=cal)
    a, b = factors(adapters)
    centred = x[:60] - x[:60].mean(0)
    _, _, vh = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(a), np.abs(vh[:3].T), atol=1e-4)
    assert not b.any()  # B = 0: a no-op; the base is not changed
    np.testing.assert_array_equal(base["w"], W)


def test_eva_redistributes_ranks_under_the_budget(key):
    params = {"lo": W, "hi": W.copy()}
    rp = R.eva(2, 4.0, eva_rho=2.0)
    cal = rp.calibration(params)
    x = np.asarray(activations(key, scales=jnp.array([4.0] * 4 + [0.01] * 8)))  # 4 strong axes
    spread = np.asarray(normal(6, (64, 12)))  # flat spectrum: ~1/12 per axis
    cal.add_activations({"hi": x, "lo": spread})
    _, adapters = rp.init(key, params, calibration=cal)
    ranks = {s.path: s.method.rank for s in adapters.sites}
    assert sum(ranks.values()) == 4 and ranks["hi"] == 4 and "lo" not in ranks  # rho·r cap
    assert R.num_trainable(adapters) == 4 * (12 + 10)  # Σ_l r_l (in + out)
    site = next(s for s in adapters.sites if s.path == "hi")
    assert site.method.alpha == 8.0  # alpha scaled by new_rank / r (PEFT's adjust_scaling)


def test_calibration_errors_name_the_leaf(key):
    rp = R.eva(2)
    cal = rp.calibration({"w": W})
    with pytest.raises(ValueError, match="no activations for leaf 'w'"):
        rp.init(key, {"w": W}, calibration=cal)
    with pytest.raises(ValueError, match=r"want \(\.\.\., 12\)"):
        cal.add_activations({"w": np.ones((4, 5))})
    with pytest.raises(ValueError, match="no targeted leaf 'x'"):
        cal.add_activations({"x": np.ones((4, 12))})
    with pytest.raises(ValueError, match="no gradient for leaf 'w'"):
        R.loraga(2).init(key, {"w": W}, calibration=R.loraga(2).calibration({"w": W}))
