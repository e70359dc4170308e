"""Checks every wave-2 method test runs (issue 14): no-op at init, the paper's parameter count,
merge/unmerge, safetensors and orbax round trips, jit, and the NNX fast path."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lowrank_jax import reparam as R

from .conftest import ZEROS, filled, normal, perturb, tree
from .test_nnx import count_dots

# The leaves default targets select in conftest.tree(): (batch, in, out).
TARGETED = {"layers/attn/q_proj/kernel": (1, 8, 12), "layers/mlp/up/kernel": (3, 8, 16)}


def kernels(p):
    return [p["layers"]["attn"]["q_proj"]["kernel"], p["layers"]["mlp"]["up"]["kernel"]]


def noop_and_count(rp, key, count, atol=2e-6):
    """A no-op at init (up to the residual's round-off), ``count(batch, in, out)`` trainable
    scalars per leaf, and a real change once trained. Returns ``(params, base, adapters)``."""
    params = tree()
    base, adapters = rp.init(key, params)
    for got, want in zip(kernels(R.apply(base, adapters)), kernels(params)):
        np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    assert set(adapters.paths) == set(TARGETED)
    assert R.num_trainable(adapters) == sum(count(*shape) for shape in TARGETED.values())
    moved = perturb(adapters)
    for got, want in zip(kernels(R.apply(base, moved)), kernels(params)):
        assert float(jnp.max(jnp.abs(got - want))) > 1e-3
    return params, base, moved


def merge_unmerge(base, adapters, weights=(1.0, 0.5), atol=1e-6):
    """merge equals apply and unmerge restores the base within ``atol`` (float32)."""
    for weight in weights:
        merged, record = R.merge(base, adapters, weights=[weight])
        applied = R.apply(base, adapters, weights=[weight])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol), merged, applied)
        back = R.unmerge(merged, adapters, record)
        for got, want, m in zip(kernels(back), kernels(base), kernels(merged)):
            np.testing.assert_allclose(got, want, atol=atol, rtol=0)
            assert float(jnp.max(jnp.abs(m - want))) > 1e-3


def round_trips(base, adapters, path):
    """safetensors (reparam.save/load) and orbax (the trainable and frozen trees) round trips."""
    R.save(str(path / "st"), adapters)
    loaded = R.load(str(path / "st"), base)
    assert loaded.sites == adapters.sites
    jax.tree.map(np.testing.assert_array_equal, loaded.trainable, adapters.trainable)
    jax.tree.map(np.testing.assert_array_equal, loaded.frozen, adapters.frozen)
    jax.tree.map(np.testing.assert_array_equal, R.apply(base, loaded), R.apply(base, adapters))
    tree_ = {"trainable": adapters.trainable, "frozen": adapters.frozen}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "orbax", tree_)
        ckpt.wait_until_finished()
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree_)
        restored = ckpt.restore(path / "orbax", target)
    again = adapters.replace(**restored)
    jax.tree.map(np.testing.assert_array_equal, R.apply(base, again), R.apply(base, adapters))


def jitted(base, adapters, atol=1e-6):
    got = jax.jit(R.apply)(base, adapters)
    want = R.apply(base, adapters)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol), got, want)


class Net(nnx.Module):
    """A Linear and an Einsum (the einsum's head axis is a batch axis of the kernel)."""

    def __init__(self, rngs, d=8):
        self.q_proj = nnx.Linear(d, 12, rngs=rngs, **ZEROS)
        self.mix = nnx.Einsum("bthk,hkd->bthd", (2, 4, d), rngs=rngs, **ZEROS)

    def __call__(self, x):
        return self.q_proj(x).sum(-1) + self.mix(x.reshape(*x.shape[:-1], 2, 4)).sum((-1, -2))


X = normal(3, (2, 5, 8))


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_params(model, params):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def nnx_matches_apply(rp, key, atol=1e-5):
    """``wrap`` is a no-op at init, equals the functional apply once trained (also under
    ``nnx.jit``), and ``unwrap`` merges into plain layers with the same outputs."""
    make = lambda: filled(Net(nnx.Rngs(0)))
    net = make()
    base_out, base = net(X), params_of(net)
    wrapped = R.wrap(net, rp, key=key)
    np.testing.assert_allclose(wrapped(X), base_out, atol=atol)
    adapters = perturb(R.adapters_of(wrapped))
    moved = R.wrap(make(), adapters)
    want = with_params(make(), R.apply(base, adapters))(X)
    np.testing.assert_allclose(moved(X), want, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(moved, X), want, rtol=1e-5, atol=atol)
    assert float(jnp.abs(moved(X) - base_out).max()) > 1e-2
    merged = R.unwrap(moved)
    assert isinstance(merged.q_proj, nnx.Linear)
    np.testing.assert_allclose(merged(X), want, rtol=1e-5, atol=atol)


def never_builds_delta_w(rp, key, d_in=48, d_out=40):
    """The wrapped forward has no matmul with an ``(in, out)`` result: ``ΔW`` is never formed."""

    class Big(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(d_in, d_out, rngs=rngs, **ZEROS)

        def __call__(self, x):
            return self.proj(x)

    model = R.wrap(filled(Big(nnx.Rngs(0))), rp, key=key)
    graphdef, state = nnx.split(model)
    f = lambda s, x: nnx.merge(graphdef, s)(x)
    jaxpr = jax.make_jaxpr(f)(state, jnp.ones((3, d_in))).jaxpr
    assert count_dots(jaxpr, (d_in, d_out)) == 0
