"""GaLore in a plain optax train step: a small MLP fits a random teacher network.

Run ``python -m lowrank_jax.examples.quickstart``. It trains the same model with
``optax.adamw`` and ``lowrank_jax.galore_adamw`` and prints the loss and optimizer-state bytes
of both; the GaLore moments are rank-16 instead of full size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import lowrank_jax as lr


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict:
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"dense_{i}": {
            "kernel": jax.random.normal(k, (a, b)) / jnp.sqrt(a),
            "bias": jnp.zeros(b),
        }
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    }


def mlp(params: dict, x: jax.Array) -> jax.Array:
    n = len(params)
    for i in range(n):
        layer = params[f"dense_{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < n - 1:
            x = jax.nn.gelu(x)
    return x


def train(tx: optax.GradientTransformation, steps: int = 300, seed: int = 0) -> list[float]:
    key_teacher, key_student, key_data = jax.random.split(jax.random.key(seed), 3)
    sizes = (64, 256, 256, 32)
    teacher = init_mlp(key_teacher, sizes)
    params = init_mlp(key_student, sizes)
    state = tx.init(params)

    def loss_fn(params: dict, x: jax.Array) -> jax.Array:
        return jnp.mean((mlp(params, x) - mlp(teacher, x)) ** 2)

    @jax.jit
    def step(params: dict, state: optax.OptState, key: jax.Array):
        x = jax.random.normal(key, (128, sizes[0]))
        loss, grads = jax.value_and_grad(loss_fn)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for key in jax.random.split(key_data, steps):
        params, state, loss = step(params, state, key)
        losses.append(float(loss))
    return losses


def main() -> None:
    params = init_mlp(jax.random.key(0), (64, 256, 256, 32))
    optimizers = {
        "adamw": optax.adamw(3e-3),
        "galore_adamw (rank 16)": lr.galore_adamw(3e-3, rank=16, update_proj_gap=50, scale=1.0),
    }
    print(f"{'step':>6} " + " ".join(f"{name:>24}" for name in optimizers))
    curves = {name: train(tx) for name, tx in optimizers.items()}
    for i in (0, 50, 100, 150, 200, 250, 299):
        print(f"{i:>6} " + " ".join(f"{curves[n][i]:>24.5f}" for n in optimizers))
    for name, tx in optimizers.items():
        print(f"{name}: optimizer state {lr.memory.human(lr.memory.state_bytes(tx, params))}")
    for name, curve in curves.items():
        if not curve[-1] < 0.5 * curve[0]:
            raise SystemExit(f"{name}: the loss did not go down ({curve[0]} -> {curve[-1]})")


if __name__ == "__main__":
    main()
