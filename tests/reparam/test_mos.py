"""MoS: shard pools shared by a leaf's layers, the routing indices, pair dissociation, privacy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import reparam as R

from . import family
from .conftest import normal, perturb

W = {"layers": {"q": {"kernel": normal(0, (4, 8, 6))}}}  # 4 stacked layers
Q = "layers/q/kernel"


def test_indices_shared_prefix_private_tail_and_dissociated_pairs(key):
    _, adapters = R.mos(rank=5, equivalent_rank=3, private_rank=1, shards=2).init(key, W)
    idx_a, idx_b = (np.asarray(adapters.frozen[Q][k]) for k in ("idx_A", "idx_B"))
    assert idx_a.shape == (4, 10)  # r·l per layer
    shared = (3 - 1) * 4 * 2  # S = (r_v - r_p)·L·l
    for layer in range(4):
        private = shared + layer * 2 + np.arange(2)  # [S + ℓ·r_p·l, S + (ℓ+1)·r_p·l)
        np.testing.assert_array_equal(idx_a[layer, 8:], private)
        np.testing.assert_array_equal(idx_b[layer, 8:], private)
        for idx in (idx_a, idx_b):  # a draw without replacement from [0, S)
            assert len(set(idx[layer, :8])) == 8 and idx[layer, :8].max() < shared
    assert not np.array_equal(idx_a[:, :8], idx_b[:, :8])  # A and B drawn independently
    assert not np.array_equal(idx_a[0, :8], idx_a[1, :8])  # and per layer


def test_factors_gather_their_shards(key):
    _, adapters = R.mos(rank=5, equivalent_rank=3, shards=2, alpha=10.0).init(key, W)
    adapters = perturb(adapters)
    t, f = adapters.trainable[Q], adapters.frozen[Q]
    a_pool, b_pool = np.asarray(t["A_pool"]), np.asarray(t["B_pool"])
    assert a_pool.shape == (3 * 4 * 2, 4) and b_pool.shape == (24, 3)  # P = r_v·L·l
    eff = np.asarray(R.apply(W, adapters)["layers"]["q"]["kernel"])
    for layer in range(4):
        ia, ib = np.asarray(f["idx_A"][layer]), np.asarray(f["idx_B"][layer])
        a = np.stack([np.concatenate([a_pool[ia[2 * k]], a_pool[ia[2 * k + 1]]]) for k in range(5)])
        b = np.stack([np.concatenate([b_pool[ib[2 * k]], b_pool[ib[2 * k + 1]]]) for k in range(5)])
        want = np.asarray(W["layers"]["q"]["kernel"][layer]) + 2.0 * a.T @ b  # s = 10 / 5
        np.testing.assert_allclose(eff[layer], want, rtol=1e-5, atol=1e-5)


def test_all_private_with_one_shard_is_per_layer_lora(key):
    _, adapters = R.mos(rank=2, equivalent_rank=2, private_rank=2, shards=1).init(key, W)
    idx = np.asarray(adapters.frozen[Q]["idx_A"])
    np.testing.assert_array_equal(idx, np.arange(8).reshape(4, 2))  # layer ℓ owns rows 2ℓ, 2ℓ+1
    adapters = perturb(adapters)
    lora = R.mos_to_lora(adapters)
    assert lora.sites[0].method == R.LoRA(rank=2, alpha=2.0)
    assert lora.trainable[Q]["A"].shape == (4, 8, 2)
    np.testing.assert_allclose(
        R.apply(W, lora)[Q.split("/")[0]]["q"]["kernel"],
        R.apply(W, adapters)["layers"]["q"]["kernel"],
        atol=1e-6,
    )


def test_shared_pool_gradient_sums_over_layers(key):
    _, adapters = R.mos(rank=3, equivalent_rank=2, private_rank=0, shards=1).init(key, W)
    adapters = perturb(adapters)
    x = normal(1, (5, 8))

    def loss(t, layers):
        eff = R.apply(W, adapters.replace(trainable=t))["layers"]["q"]["kernel"]
        return sum(jnp.sum(jnp.tanh(x @ eff[i]) ** 2) for i in layers)

    total = jax.grad(loss)(adapters.trainable, range(4))
    parts = [jax.grad(loss)(adapters.trainable, [i]) for i in range(4)]
    summed = jax.tree.map(lambda *g: sum(g), *parts)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), total, summed)


def test_init_count_merge_io_jit(key, tmp_path):
    # r_v·L·(in + out) per leaf; the stacked leaf uses rank 4 > r_v = 2 in every layer.
    rp = R.mos(rank=2, equivalent_rank=2, private_rank=1, rank_pattern={"up": 4})
    count = lambda b, i, o: 2 * b * (i + o)
    _, base, adapters = family.noop_and_count(rp, key, count)
    assert {s.path: s.method.rank for s in adapters.sites}["layers/mlp/up/kernel"] == 4
    family.merge_unmerge(base, adapters)
    family.round_trips(base, adapters, tmp_path)
    family.jitted(base, adapters)


def test_nnx_fast_path(key):
    rp = R.mos(rank=2, equivalent_rank=2, private_rank=2, shards=2)
    family.nnx_matches_apply(rp, key)
    family.never_builds_delta_w(rp, key)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: R.mos(rank=0), "rank must be a positive int"),
        (lambda: R.mos(rank=4, equivalent_rank=2, private_rank=3), "private_rank=3 must not"),
        (lambda: R.mos(rank=3, equivalent_rank=2, private_rank=2), "no shared shards"),
        (lambda: R.mos(rank=2, private_rank=-1), "private_rank must be a number >= 0"),
        (lambda: R.mos(rank=4, shards=5).init(jax.random.key(0), W), "shards=5 must divide"),
        (
            lambda: R.mos(rank=4, equivalent_rank=2).init(
                jax.random.key(0), {"w": jnp.ones((8, 6))}
            ),
            "leaf 'w' has 1 layer",
        ),
        (
            lambda: R.mos_to_lora(R.lora(2).init(jax.random.key(0), {"w": jnp.ones((4, 4))})[1]),
            "no MoS site",
        ),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
