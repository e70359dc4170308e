"""Helpers shared by the transform tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp


def orbax_roundtrip(state, directory):
    """Saves ``state`` with orbax and restores it against an abstract target."""
    path = directory / "state"
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, state)
        ckpt.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        return ckpt.restore(path, abstract)


def assert_same_types(a, b):
    """Same tree structure (NamedTuple types included), shapes and dtypes."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype


def run_steps(tx, params, grads, state=None):
    """Applies ``tx`` to a gradient stream under one jit; returns (params, state)."""
    state = tx.init(params) if state is None else state

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for g in grads:
        params, state = step(params, state, g)
    return params, state


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# the GaLore tests' tree and gradient stream


def make_params(key, dtype=jnp.float32):
    k = jax.random.split(key, 4)
    return {
        "layers": {
            "q_proj": {"kernel": jax.random.normal(k[0], (16, 16), dtype)},
            "up_proj": {"kernel": jax.random.normal(k[1], (16, 40), dtype)},
            "down_proj": {"kernel": jax.random.normal(k[2], (40, 16), dtype)},
        },
        "embed": {"embedding": jax.random.normal(k[3], (50, 16), dtype)},
        "final_norm": {"scale": jnp.ones(16, dtype)},
    }


def grad_stream(params, n, seed=1):
    keys = jax.random.split(jax.random.key(seed), n)
    return [
        jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape, x.dtype), params) for k in keys
    ]


# the LISA tests' LLaMA-like trees

SDS = jax.ShapeDtypeStruct
L, D = 4, 8


def normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def layer(rng, d=D):
    return {
        "attn": {"q_proj": {"kernel": normal(rng, (d, d))}},
        "mlp": {"up_proj": {"kernel": normal(rng, (d, 2 * d))}},
        "input_norm": {"scale": jnp.ones(d)},
    }


def model(key, stacked=False):
    """A tiny LLaMA-like tree (numpy draws: cheaper than compiling jax.random per shape)."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))
    layers = [layer(rng) for _ in range(L)]
    params = {
        "embed": {"embedding": normal(rng, (20, D))},
        "final_norm": {"scale": jnp.ones(D)},
        "lm_head": {"kernel": normal(rng, (D, 20))},
    }
    if stacked:
        params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    else:
        params["layers"] = {str(i): p for i, p in enumerate(layers)}
    return params


def grads_for(params, n, seed=1):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda x: normal(rng, x.shape), params) for _ in range(n)]


def llama_1b(stacked=False):
    """LLaMA-1B shapes (hidden 2048, intermediate 5461, 24 layers, vocab 32000), float32."""
    h, f, n = 2048, 5461, 24
    lead = (n,) if stacked else ()
    block = {
        "attn": {p: {"kernel": SDS((*lead, h, h), jnp.float32)} for p in "qkvo"},
        "mlp": {
            "gate_proj": {"kernel": SDS((*lead, h, f), jnp.float32)},
            "up_proj": {"kernel": SDS((*lead, h, f), jnp.float32)},
            "down_proj": {"kernel": SDS((*lead, f, h), jnp.float32)},
        },
        "input_layernorm": {"scale": SDS((*lead, h), jnp.float32)},
        "post_attention_layernorm": {"scale": SDS((*lead, h), jnp.float32)},
    }
    block["attn"] = {f"{p}_proj": v for p, v in block["attn"].items()}
    return {
        "embed_tokens": {"embedding": SDS((32000, h), jnp.float32)},
        "layers": block if stacked else {str(i): block for i in range(n)},
        "norm": {"scale": SDS((h,), jnp.float32)},
        "lm_head": {"kernel": SDS((h, 32000), jnp.float32)},
    }


# the memory tests' tree
PARAMS = {
    "embed": {"embedding": SDS((1000, 64), jnp.float32)},
    "layers": {
        "q_proj": {"kernel": SDS((4, 64, 64), jnp.float32)},
        "up_proj": {"kernel": SDS((4, 64, 172), jnp.float32)},
        "down_proj": {"kernel": SDS((4, 172, 64), jnp.float32)},
        "norm": {"scale": SDS((4, 64), jnp.float32)},
    },
    "lm_head": {"kernel": SDS((64, 1000), jnp.bfloat16)},
}


def losses_on_a_4x2_mesh(graphdef, tx, params, data, config, **step_options):
    """The losses of ``make_train_step(graphdef, tx, **step_options)`` run over ``data`` with
    the parameters, the optimizer state and the batch sharded on a 4x2 (fsdp x tensor) mesh of
    8 devices; ``config`` is the model's ``LlamaConfig`` (for the parameter specs)."""
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lowrank_jax import sharding
    from lowrank_jax.models import Llama
    from lowrank_jax.train.step import TrainState, make_train_step

    mesh = sharding.make_mesh(4, 2, explicit=False)
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    specs = sharding.param_specs(nnx.state(abstract, nnx.Param))
    specs = jax.tree.map(
        lambda x, s: sharding.fit_spec(x.shape, s, mesh), params, specs,
        is_leaf=lambda x: isinstance(x, P),
    )  # fmt: skip
    state_sharding = sharding.named(
        TrainState(P(), specs, sharding.state_specs(tx, params, specs, mesh)), mesh
    )
    batch_sharding = NamedSharding(mesh, P("fsdp"))
    with jax.set_mesh(mesh):
        step = make_train_step(
            graphdef, tx, state_sharding=state_sharding, batch_sharding=batch_sharding,
            **step_options,
        )  # fmt: skip
        state = jax.device_put(
            TrainState(jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params)),
            state_sharding,
        )
        losses = []
        for batch in data:
            state, metrics = step(state, jax.device_put(batch, batch_sharding))
            losses.append(float(metrics["loss"]))
    return losses, state, state_sharding
