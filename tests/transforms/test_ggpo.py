"""LoRA-GGPO: the tracked norms, the noise's per-unit variance, functional use with Adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import memory, reparam
from lowrank_jax.transforms import ggpo_perturb, lora_ggpo
from tests.helpers import assert_same_types, orbax_roundtrip


def test_norms_follow_the_merged_weight_and_its_gradient(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    a, b = jax.random.normal(k1, (8, 2)), jax.random.normal(k2, (2, 5))
    ga, gb = jax.random.normal(k3, (8, 2)), jax.random.normal(k4, (2, 5))
    tx = lora_ggpo(optax.sgd(0.1), scaling=2.0, base_row_norms=0.5)
    params = {"q": {"A": a, "B": b}}
    _, state = tx.update({"q": {"A": ga, "B": gb}}, tx.init(params), params)
    np.testing.assert_allclose(state.weight_norms["q"],
                               0.25 + np.sum((2 * a @ b) ** 2, axis=0), rtol=1e-5)
    np.testing.assert_allclose(state.grad_norms["q"],
                               np.sum((2 * (ga @ b + a @ gb)) ** 2, axis=0), rtol=1e-5)


def test_noise_variance_per_output_unit(key):
    n_in = 64
    state = lora_ggpo(optax.sgd(0.1)).init({"q": {"A": jnp.ones((n_in, 1)), "B": jnp.ones((1, 4))}})
    state = state._replace(weight_norms={"q": jnp.array([1.0, 4.0, 9.0, 0.0])},
                           grad_norms={"q": jnp.array([0.0, 0.0, 0.0, 100.0])})
    w = jnp.zeros((n_in, 4))
    draws = jax.vmap(lambda t: ggpo_perturb({"q": w}, state._replace(count=t))["q"])(
        jnp.arange(300)
    )
    var = np.var(np.asarray(draws), axis=(0, 1))
    expected = 0.03**2 / n_in * np.array([1.0, 4.0, 9.0, 0.01 * 100.0])
    np.testing.assert_allclose(var, expected, rtol=0.05)
    assert not np.allclose(draws[0], draws[1])  # fresh every step


def test_with_functional_adapters_jit_and_roundtrip(key, tmp_path):
    base = {"layers": {"q_proj": {"kernel": jax.random.normal(key, (8, 6))}}}
    base, adapters = reparam.lora(rank=2, alpha=4).init(key, base)
    scaling = {s.path: s.method.scale for s in adapters.sites}
    tx = lora_ggpo(optax.adam(1e-2), scaling=scaling)
    state = tx.init(adapters.trainable)

    def loss(trainable, state):
        merged = reparam.apply(base, adapters.replace(trainable=trainable))
        noisy = ggpo_perturb(merged, state)
        return jnp.mean(noisy["layers"]["q_proj"]["kernel"] ** 2)

    @jax.jit
    def step(trainable, state):
        grads = jax.grad(loss)(trainable, state)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    trainable = adapters.trainable
    for _ in range(3):
        trainable, state = step(trainable, state)
    assert int(state.count) == 3
    assert float(jnp.sum(state.grad_norms["layers/q_proj/kernel"])) > 0
    assert_same_types(orbax_roundtrip(state, tmp_path), state)
    measured = memory.state_bytes(tx, adapters.trainable, scalars=False)
    assert measured == memory.ggpo_bytes(adapters.trainable) == (2 * 2 * (8 + 6) + 2 * 6) * 4


def test_bad_inputs():
    with pytest.raises(ValueError, match="no LoRA factor"):
        lora_ggpo(optax.sgd(0.1)).init({"w": jnp.ones((3, 3))})
    state = lora_ggpo(optax.sgd(0.1)).init({"q": {"A": jnp.ones((4, 1)), "B": jnp.ones((1, 2))}})
    with pytest.raises(ValueError, match="no merged weight"):
        ggpo_perturb({"other": jnp.ones((4, 2))}, state)
    with pytest.raises(ValueError, match="GGPOState"):
        ggpo_perturb({"q": jnp.ones((4, 2))}, optax.EmptyState())
