"""Federated aggregation: FedAvg's exact bias, exactness of FLoRA / FFA-LoRA / Fed-SB, LoRA-FAIR's
refinement, DP-FedAvg through optax, errors, jit and save/load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import reparam as R

from .conftest import normal

PARAMS = {"layer": {"kernel": normal(0, (2, 12, 10), 0.5)}, "out": {"kernel": normal(1, (10, 9))}}
P = [3.0, 1.0, 2.0]  # client dataset sizes


def lora_clients(ranks=(4, 4, 4), seed=0):
    out = []
    for k, r in enumerate(ranks):
        _, c = R.lora(rank=r, alpha=2 * r).init(jax.random.key(seed + k), PARAMS)
        out.append(moved(c, seed + 10 * k))
    return out


def moved(adapters, seed):
    leaves, treedef = jax.tree.flatten(adapters.trainable)
    new = [x + normal(seed + i, x.shape, 0.4) for i, x in enumerate(leaves)]
    return adapters.replace(trainable=jax.tree.unflatten(treedef, new))


def ideal(clients, weights):
    p = np.asarray(weights) / np.sum(weights)
    ups = [R.apply(PARAMS, c) for c in clients]
    return {
        m: sum(pk * (u[m]["kernel"] - PARAMS[m]["kernel"]) for pk, u in zip(p, ups)) for m in PARAMS
    }


def update(adapters):
    out = R.apply(PARAMS, adapters)
    return {m: out[m]["kernel"] - PARAMS[m]["kernel"] for m in PARAMS}


def test_fedavg_of_lora_has_exactly_the_known_bias():
    clients = lora_clients()
    avg = R.fedavg(clients, P)
    bias = R.fedavg_bias(clients, P)
    want, got = ideal(clients, P), update(avg)
    for m in PARAMS:
        np.testing.assert_allclose(got[m] - want[m], bias[f"{m}/kernel"], atol=2e-5)
        assert float(jnp.abs(bias[f"{m}/kernel"]).max()) > 0.1  # a real error, not round-off
    gaps = R.aggregation_gap(PARAMS, avg, clients, P)
    assert min(gaps.values()) > 0.05


def test_flora_stacking_is_exact_for_heterogeneous_ranks():
    clients = lora_clients(ranks=(8, 4, 2))
    clients[1] = moved(R.lora(rank=4, alpha=3, rslora=True).init(jax.random.key(9), PARAMS)[1], 5)
    stacked = R.flora_stack(clients, P)
    assert {s.method.rank for s in stacked.sites} == {14} and stacked.sites[0].method.scale == 1
    want, got = ideal(clients, P), update(stacked)
    for m in PARAMS:
        np.testing.assert_allclose(got[m], want[m], atol=2e-5)
    assert max(R.aggregation_gap(PARAMS, stacked, clients, P).values()) < 1e-5


def test_ffa_lora_aggregation_is_exact():
    _, start = R.ffa_lora(rank=4).init(jax.random.key(0), PARAMS)  # one seed: one frozen A
    clients = [moved(start, 10 * k) for k in range(3)]
    agg = R.ffa_aggregate(clients, P)
    assert max(R.aggregation_gap(PARAMS, agg, clients, P).values()) < 1e-5
    assert set(agg.trainable["out/kernel"]) == {"B"}  # only B is communicated


def test_fed_sb_aggregation_is_exact():
    cal = R.lora_sb(rank=3).calibration(PARAMS)
    cal.add_gradients(jax.tree.map(lambda x: normal(7, x.shape), PARAMS))
    _, start = R.lora_sb(rank=3).init(jax.random.key(0), PARAMS, calibration=cal)
    clients = [moved(start, 10 * k) for k in range(3)]
    agg = R.fed_sb_aggregate(clients)
    assert R.num_trainable(agg) == 3 * 9  # r² per matrix: two stacked + one
    assert max(R.aggregation_gap(PARAMS, agg, clients).values()) < 1e-5
    # LoRA-XS clients too (same structure)
    _, xs = R.lora_xs(rank=3).init(jax.random.key(0), PARAMS)
    xs_clients = [moved(xs, k) for k in range(2)]
    xs_gap = R.aggregation_gap(PARAMS, R.fed_sb_aggregate(xs_clients), xs_clients)
    assert max(xs_gap.values()) < 1e-5


def test_lora_fair_refines_fedavg_to_the_best_b_for_a_bar():
    clients = lora_clients()
    avg, fair = R.fedavg(clients, P), R.lora_fair(clients, P, ridge=0.0)
    gap_avg = R.aggregation_gap(PARAMS, avg, clients, P)
    gap_fair = R.aggregation_gap(PARAMS, fair, clients, P)
    for path in gap_avg:
        assert gap_fair[path] < gap_avg[path] - 0.05
    a_fair, a_avg = fair.trainable["out/kernel"]["A"], avg.trainable["out/kernel"]["A"]
    np.testing.assert_array_equal(a_fair, a_avg)
    # normal equations: Āᵀ (s Ā B - ideal) = 0
    a = fair.trainable["out/kernel"]["A"]
    s = fair.sites[-1].method.scale
    residual = s * a @ fair.trainable["out/kernel"]["B"] - ideal(clients, P)["out"]
    assert float(jnp.abs(a.T @ residual).max()) < 1e-4
    # a larger ridge moves less
    strong = R.lora_fair(clients, P, ridge=1e3)
    np.testing.assert_allclose(
        strong.trainable["out/kernel"]["B"], avg.trainable["out/kernel"]["B"], atol=0.05
    )


def test_dp_fedavg_through_optax():
    _, server = R.ffa_lora(rank=4).init(jax.random.key(0), PARAMS)
    clients = [moved(server, 10 * k) for k in range(4)]
    dp = jax.jit(  # one compile for the three settings (the clip and noise are traced)
        lambda clip, sigma: (
            R.dp_fedavg(
                server, clients, l2_norm_clip=clip, noise_multiplier=sigma, key=jax.random.key(1)
            ).trainable
        )
    )
    plain, mean = dp(1e6, 0.0), R.fedavg(clients).trainable
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(mean)):
        np.testing.assert_allclose(x, y, atol=1e-5)
    clip = 0.5
    clipped = dp(clip, 0.0)
    step = jax.tree.map(lambda a, b: a - b, clipped, server.trainable)
    assert float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(step)))) <= clip + 1e-5
    noisy = dp(clip, 4.0)
    pairs = zip(jax.tree.leaves(noisy), jax.tree.leaves(clipped))
    noise = jnp.concatenate([(a - b).ravel() for a, b in pairs])
    np.testing.assert_allclose(float(jnp.std(noise)), 4.0 * clip / len(clients), rtol=0.1)


def test_aggregators_jit_and_round_trip(tmp_path):
    clients = lora_clients(ranks=(4, 2, 2))
    eager = R.flora_stack(clients, P)
    jitted = jax.jit(lambda cs: R.flora_stack(cs, P))(clients)
    for m in PARAMS:
        np.testing.assert_allclose(update(jitted)[m], update(eager)[m], atol=1e-6)
    same = lora_clients()
    np.testing.assert_allclose(
        update(jax.jit(lambda cs: R.lora_fair(cs, P))(same))["out"],
        update(R.lora_fair(same, P))["out"], atol=1e-5,
    )  # fmt: skip
    R.save(str(tmp_path), eager)
    back = R.load(str(tmp_path), PARAMS)
    for m in PARAMS:
        np.testing.assert_array_equal(update(back)[m], update(eager)[m])


def test_bad_inputs_name_the_problem():
    clients = lora_clients()
    with pytest.raises(ValueError, match="client 1 differs from client 0 at leaf.*flora_stack"):
        R.fedavg([clients[0], lora_clients(ranks=(2,))[0]])
    _, a = R.ffa_lora(rank=4).init(jax.random.key(0), PARAMS)
    _, b = R.ffa_lora(rank=4).init(jax.random.key(1), PARAMS)
    with pytest.raises(ValueError, match="frozen array 'A' at leaf 'layer/kernel' differs"):
        R.ffa_aggregate([a, b])
    with pytest.raises(ValueError, match="FFA-LoRA clients train B only"):
        R.ffa_aggregate(clients)
    with pytest.raises(ValueError, match="Fed-SB clients"):
        R.fed_sb_aggregate(clients)
    with pytest.raises(ValueError, match="non-negative"):
        R.fedavg(clients, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="2 weights for 3 clients"):
        R.fedavg(clients, [1.0, 1.0])
    _, d = R.dora(rank=4).init(jax.random.key(0), PARAMS)
    with pytest.raises(ValueError, match="adapted by DoRA"):
        R.flora_stack([d, d])
