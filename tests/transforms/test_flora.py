"""Flora: parity with flora-opt's torch Flora, unbiased compression, accumulation, plumbing."""

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lr
from lowrank_jax import memory
from lowrank_jax.train.layerwise import split_state
from lowrank_jax.transforms import flora_accumulation, flora_projection, scale_by_flora
from tests.helpers import assert_same_types, grad_stream, orbax_roundtrip, run_steps

HAVE_FLORA = all(importlib.util.find_spec(m) for m in ("torch", "flora_opt", "bitsandbytes"))
TORCH_SHAPES = {"a": (12, 20), "b": (20, 12), "c": (16, 16), "bias": (20,)}  # (out, in)


def canonical(x):
    return jnp.asarray(x.T if x.ndim == 2 else x)


@pytest.mark.skipif(not HAVE_FLORA, reason="needs the `compare` extra (torch, flora-opt)")
def test_parity_with_torch_flora_across_projection_switches():
    import torch
    from flora_opt.optimizers.torch.flora import Flora, next_seed, split_seed, stable_randn

    rank, kappa, steps, lr_, wd = 3, 2, 5, 0.05, 0.1
    rng = np.random.default_rng(0)
    w0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in TORCH_SHAPES.items()}
    grads = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in TORCH_SHAPES.items()}
        for _ in range(steps)
    ]
    params = [torch.nn.Parameter(torch.tensor(w0[k])) for k in TORCH_SHAPES]
    opt = Flora(params, lr=lr_, rank=rank, kappa=kappa, beta1=0.9, weight_decay=wd)
    seeds = {k: opt.state[p]["seed"] for k, p in zip(TORCH_SHAPES, params)}
    for g in grads:
        for k, p in zip(TORCH_SHAPES, params):
            p.grad = torch.tensor(g[k])
        opt.step()

    def torch_basis(name, period):  # torch's projection of a period as our (dim, r) basis
        seed = seeds[name]
        for _ in range(period):
            seed = next_seed(seed)
        lseed, rseed = split_seed(seed)
        m, n = TORCH_SHAPES[name]
        if m < n:  # torch's left projection (r, m) compresses the out axis
            return (stable_randn((rank, m), seed=lseed) / math.sqrt(rank)).T.numpy()
        return (stable_randn((n, rank), seed=rseed) / math.sqrt(rank)).numpy()

    table = {
        k: jnp.stack([torch_basis(k, q) for q in range(steps // kappa + 2)])
        for k in TORCH_SHAPES if k != "bias"
    }
    tx = optax.chain(
        scale_by_flora(rank, kappa=kappa, weight_decay=wd,
                       projection_fn=lambda path, shape, period: table[path][period]),
        optax.scale_by_learning_rate(lr_),
    )
    ours, _ = run_steps(
        tx, {k: canonical(v) for k, v in w0.items()},
        [{k: canonical(v) for k, v in g.items()} for g in grads],
    )
    for k, p in zip(TORCH_SHAPES, params):
        np.testing.assert_allclose(canonical(np.asarray(ours[k])), p.detach().numpy(), atol=1e-5)


def test_decompression_is_unbiased():
    g = jax.random.normal(jax.random.key(0), (24, 10))
    keys = jax.random.split(jax.random.key(1), 400)
    recon = jax.vmap(lambda k: (a := flora_projection("w", (24, 4), k)) @ (a.T @ g))(keys)
    err = np.abs(np.asarray(jnp.mean(recon, 0) - g)).mean() / np.abs(np.asarray(g)).mean()
    assert err < 0.2  # single draws are off by ~sqrt(24/4); the mean converges as 1/sqrt(400)
    single = np.abs(np.asarray(recon[0] - g)).mean() / np.abs(np.asarray(g)).mean()
    assert single > 1.0


def test_momentum_is_compressed_on_the_smaller_axis_and_regenerated(key):
    params = {"w": jnp.ones((32, 16)), "v": jnp.ones((16, 32)), "small": jnp.ones((3, 40)),
              "b": jnp.zeros(16)}
    state = scale_by_flora(4).init(params)
    shapes = jax.tree.map(lambda x: x.shape, state.momentum)
    assert shapes == {"w": (32, 4), "v": (4, 32), "small": (3, 40), "b": (16,)}
    assert memory.state_bytes(scale_by_flora(4), params, scalars=False) == memory.flora_bytes(
        params, rank=4
    )


def test_projection_changes_every_kappa_steps(key):
    """With b1 = 0 the stored momentum is down_k(Ĝ): the period's projection is visible."""
    g = {"w": jnp.eye(6, 20)}
    tx = scale_by_flora(2, b1=0.0, kappa=2, scale_parameter=False)
    state, seen = tx.init(g), []
    update = jax.jit(tx.update)
    for _ in range(5):
        _, state = update(g, state)
        seen.append(np.asarray(state.momentum["w"]))
    # steps 1..5 use the projections of periods 0, 1, 1, 2, 2 (torch switches when t % κ == 0)
    np.testing.assert_allclose(seen[1], seen[2], rtol=1e-6)
    np.testing.assert_allclose(seen[3], seen[4], rtol=1e-6)
    assert not np.allclose(seen[0], seen[1]) and not np.allclose(seen[2], seen[3])


def test_accumulation_with_an_orthonormal_full_rank_projection_is_multisteps(key):
    params = {"w": jax.random.normal(key, (6, 10)), "b": jnp.zeros(10)}
    grads = grad_stream(params, 6)
    eye = lambda path, shape, period: jnp.eye(shape[-2], shape[-1])
    inner = optax.adam(0.1)
    ours, state = run_steps(
        flora_accumulation(inner, every_k=3, rank=6, projection_fn=eye), params, grads
    )
    ref, _ = run_steps(optax.MultiSteps(inner, every_k_schedule=3), params, grads)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), ours, ref)
    assert int(state.count) == 2 and int(state.mini_step) == 0


def test_accumulation_compresses_and_is_unbiased(key):
    params = {"w": jax.random.normal(key, (8, 30))}
    tx = flora_accumulation(optax.sgd(1.0), every_k=2, rank=2)
    state = tx.init(params)
    assert state.accumulator["w"].shape == (2, 30)
    assert memory.state_bytes(tx, params, scalars=False) == memory.flora_accumulation_bytes(
        params, rank=2
    )
    g = {"w": jnp.ones((8, 30))}
    update = jax.jit(tx.update)
    first, state = update(g, state)
    assert not np.any(np.asarray(first["w"]))  # nothing applied before the k-th micro-batch
    total = np.zeros((8, 30))
    for _ in range(150):
        out, state = update(g, state)  # every second call applies a new window's projection
        total += np.asarray(out["w"])
        _, state = update(g, state)
    np.testing.assert_allclose(-total / 150, 1.0, atol=0.35)


def test_flora_adafactor_roundtrip_one_compile_and_layerwise(key, tmp_path):
    params = {"layers": {"w": jax.random.normal(key, (2, 8, 12))},
              "embed": {"embedding": jax.random.normal(key, (20, 8))}}
    tx = lr.flora_adafactor(1e-2, rank=4, kappa=2, weight_decay=0.1)
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for g in grad_stream(params, 5):
        params, state = step(params, state, g)
    assert len(traces) == 1
    restored = orbax_roundtrip(state, tmp_path)
    assert_same_types(restored, state)
    assert state[0].momentum["layers"]["w"].shape == (2, 4, 12)  # in=8 < out=12: in compressed
    assert split_state(tx, params, "flora").n_layers == 2


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        scale_by_flora(0)
    with pytest.raises(ValueError, match="b1"):
        scale_by_flora(2, b1=1.5)
    with pytest.raises(ValueError, match="projection_fn"):
        scale_by_flora(2, projection_fn="svd")
    with pytest.raises(ValueError, match="parameters"):
        tx = scale_by_flora(2)
        tx.update({"w": jnp.ones((4, 4))}, tx.init({"w": jnp.ones((4, 4))}))
    with pytest.raises(ValueError, match="every_k"):
        flora_accumulation(optax.sgd(1.0), every_k=0, rank=2)
    bad = lambda path, shape, period: jnp.ones((3, 3))
    tx = scale_by_flora(2, projection_fn=bad, scale_parameter=False)
    with pytest.raises(ValueError, match="'w'"):
        tx.update({"w": jnp.ones((8, 8))}, tx.init({"w": jnp.ones((8, 8))}))
