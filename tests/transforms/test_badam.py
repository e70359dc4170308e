"""BAdam: the block schedule, one block's state, parity with badam's BlockOptimizer, plumbing."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lr
from lowrank_jax import memory
from lowrank_jax.train.layerwise import split_state
from lowrank_jax.transforms import badam_block
from tests.helpers import assert_same_types, orbax_roundtrip, run_steps

HAVE_BADAM = all(importlib.util.find_spec(m) for m in ("torch", "badam", "transformers"))
L, D = 4, 6


def model(key, stacked=False):
    keys = jax.random.split(key, L + 1)
    layers = {str(i): {"w": jax.random.normal(keys[i], (D, D))} for i in range(L)}
    if stacked:
        layers = {"w": jnp.stack([layers[str(i)]["w"] for i in range(L)])}
    embed = {"embedding": jax.random.normal(keys[-1], (9, D))}
    return {"model": {"layers": layers, "embed": embed}}


def grads_for(params, n):
    keys = jax.random.split(jax.random.key(1), n)
    return [jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape), params) for k in keys]


def test_schedule_k3_d4_ascending():
    blocks = [int(badam_block(t, 4, switch_every=3)) for t in range(12)]
    # BAdam switches after steps K-1, 2K-1, ...: the first block gets K - 1 = 2 steps
    assert blocks == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0]
    full = [int(badam_block(t, 4, switch_every=3, full_first_block=True)) for t in range(6)]
    assert full == [0, 0, 0, 1, 1, 1]
    desc = [int(badam_block(t, 4, switch_every=1, order="descending")) for t in range(5)]
    assert desc == [2, 1, 0, 3, 2]  # starts at D - 1; first switch after step 0
    key = jax.random.key(3)
    rand = [int(badam_block(t, 4, switch_every=1, order="random", key=key)) for t in range(-1, 11)]
    for epoch in range(3):  # every block epoch is a permutation
        assert sorted(rand[4 * epoch: 4 * epoch + 4]) == [0, 1, 2, 3]
    assert int(badam_block(7, 4, switch_every=3, order="fixed", start_block=2)) == 2


@pytest.mark.parametrize("stacked", [False, True])
def test_one_block_state_restarts_at_each_switch(key, stacked):
    params = model(key, stacked)
    tx = lr.badam(optax.scale_by_adam(), switch_every=3, train_non_layer=False)
    state = tx.init(params)
    mu = state.layer_state.mu["model"]["layers"]
    assert (list(mu) == ["0"]) if not stacked else (mu["w"].shape == (1, D, D))
    update = jax.jit(tx.update)
    actives, counts = [], []
    for g in grads_for(params, 9):
        updates, state = update(g, state)
        actives.append(int(state.active[0]))
        counts.append(int(state.layer_state.count))
        lay = updates["model"]["layers"]
        changed = (
            [bool(jnp.any(lay[str(i)]["w"] != 0)) for i in range(L)]
            if not stacked
            else [bool(jnp.any(lay["w"][i] != 0)) for i in range(L)]
        )
        assert changed == [i == actives[-1] for i in range(L)]
        assert not np.any(np.asarray(updates["model"]["embed"]["embedding"]))
    assert actives == [0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert counts == [1, 2, 1, 2, 3, 1, 2, 3, 1]  # bias correction restarts at every switch


@pytest.mark.skipif(not HAVE_BADAM, reason="needs the `compare` extra (torch, badam)")
def test_parity_with_badam_block_optimizer(key):
    import warnings

    import torch
    from badam import BlockOptimizer

    params = model(key)
    grads = grads_for(params, 8)
    names = [f"model.layers.{i}.w" for i in range(L)] + ["model.embed.embedding"]
    get = lambda tree, name: tree["model"]["embed"]["embedding"] if "embed" in name else (
        tree["model"]["layers"][name.split(".")[2]]["w"]
    )
    torch_params = [torch.nn.Parameter(torch.tensor(np.asarray(get(params, n)))) for n in names]
    base = torch.optim.AdamW(torch_params, lr=0.01, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = BlockOptimizer(base, list(zip(names, torch_params)), switch_block_every=3,
                             switch_mode="ascending", verbose=0)
        for g in grads:
            for n, p in zip(names, torch_params):
                p.grad = torch.tensor(np.asarray(get(g, n))) if p.requires_grad else None
            opt.step()
    tx = lr.badam_adamw(0.01, switch_every=3, weight_decay=0.1, train_non_layer=False)
    ours, _ = run_steps(tx, params, grads)
    for n, p in zip(names, torch_params):
        np.testing.assert_allclose(np.asarray(get(ours, n)), p.detach().numpy(), atol=1e-5)


def test_memory_roundtrip_and_one_compile(key, tmp_path):
    params = model(key)
    tx = lr.badam_adamw(1e-2, switch_every=2)
    assert memory.state_bytes(tx, params, scalars=False) == memory.badam_bytes(params)
    # one layer's two moments plus the always-active embedding's, not L layers'
    assert memory.badam_bytes(params) == 2 * 4 * (D * D + 9 * D) + 4
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for g in grads_for(params, 5):
        params, state = step(params, state, g)
    assert len(traces) == 1
    restored = orbax_roundtrip(state, tmp_path)
    assert_same_types(restored, state)


def test_not_layerwise(key):
    params = {"layers": {"w": jnp.zeros((3, 8, 8))}, "embed": {"embedding": jnp.zeros((10, 8))}}
    with pytest.raises(ValueError, match="badam cannot be applied per layer"):
        split_state(lr.badam_adamw(1e-2), params, "badam")


def test_bad_inputs(key):
    with pytest.raises(ValueError, match="switch_every"):
        lr.badam(optax.scale_by_adam(), switch_every=-1)
    with pytest.raises(ValueError, match="order"):
        lr.badam(optax.scale_by_adam(), order="sideways")
    with pytest.raises(ValueError, match="start_block"):
        lr.badam(optax.scale_by_adam(), order="random", start_block=1)
    with pytest.raises(ValueError, match="start_block=7"):
        lr.badam(optax.scale_by_adam(), start_block=7).init(model(key))
    with pytest.raises(ValueError, match="layer_pattern"):
        lr.badam(optax.scale_by_adam()).init({"w": jnp.zeros((3, 3))})
