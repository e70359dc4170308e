"""The fused HF-Adam kernel (interpret mode) against its reference and ``scale_by_adam_hf``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax.kernels as K
from lowrank_jax.transforms._torch_style import scale_by_adam_hf

CONSTS = dict(b1=0.9, b2=0.999, eps=1e-6)


def ulps(dtype, n=2):
    return n * float(jnp.finfo(dtype).eps)


def assert_close(got, want, n_ulps=2):
    """Equal dtypes and shapes; values within ``n_ulps`` of the least precise dtype present.

    (XLA may keep a bfloat16 intermediate in float32 inside a fusion, so bfloat16 moments agree
    to bfloat16 round-off, float32 ones to float32 round-off.)
    """
    tol = max(ulps(x.dtype, n_ulps) for x in want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
        )


def stream(shape, dtypes, seed=0):
    rng = np.random.default_rng(seed)
    g_dtype, m_dtype, v_dtype = dtypes
    g = jnp.asarray(rng.standard_normal(shape), g_dtype)
    m = jnp.asarray(0.1 * rng.standard_normal(shape), m_dtype)
    v = jnp.asarray(rng.uniform(0.0, 0.5, shape), v_dtype)
    return g, m, v


@pytest.mark.parametrize(
    "shape, dtypes",
    [
        ((5, 77), (jnp.float32, jnp.float32, jnp.float32)),  # 385 elements: padded, 2 steps
        ((3, 128), (jnp.bfloat16, jnp.float32, jnp.bfloat16)),  # bf16 grads, f32 first moment
    ],
)
def test_pallas_matches_reference_within_float32_roundoff(shape, dtypes):
    g, m, v = stream(shape, dtypes)
    factor = jnp.float32(0.37)
    want = jax.jit(functools.partial(K.adam_hf_update_reference, **CONSTS))(g, m, v, factor=factor)
    got = jax.jit(
        functools.partial(K.adam_hf_update_pallas, interpret=True, block_rows=2, **CONSTS)
    )(g, m, v, factor=factor)
    assert got.update.dtype == g.dtype and got.mu.dtype == m.dtype
    assert_close(got, want)


def test_tpu_variant_on_the_tpu_interpreter():
    g, m, v = stream((16, 128), (jnp.float32,) * 3)
    factor = jnp.float32(1.5)
    want = K.adam_hf_update_reference(g, m, v, factor=factor, **CONSTS)
    got = jax.jit(
        functools.partial(
            K.adam_hf_update_pallas, target="tpu", interpret=True, block_rows=8, **CONSTS
        )
    )(g, m, v, factor=factor)
    assert_close(got, want)


@pytest.mark.parametrize("mu_dtype", [None, jnp.bfloat16])
def test_reference_is_scale_by_adam_hf_per_leaf(mu_dtype):
    """The swap-in guarantee: the transform's update equals the kernel reference's, per leaf."""
    tx = scale_by_adam_hf(**CONSTS, mu_dtype=mu_dtype)
    params = {"a": jnp.zeros((4, 24)), "b": jnp.zeros((7,))}
    state = tx.init(params)
    rng = np.random.default_rng(1)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        t = (state.count + 1).astype(jnp.float32)
        factor = jnp.sqrt(1 - CONSTS["b2"] ** t) / (1 - CONSTS["b1"] ** t)
        reference = jax.jit(functools.partial(K.adam_hf_update_reference, **CONSTS))
        want = {k: reference(grads[k], state.mu[k], state.nu[k], factor=factor) for k in params}
        updates, state = jax.jit(tx.update)(grads, state)
        for k in params:
            assert_close((updates[k], state.mu[k], state.nu[k]), want[k])


def test_dispatcher_interpret_mode_runs_the_kernel_and_matches():
    g, m, v = stream((2, 128), (jnp.float32,) * 3)
    f = jnp.float32(0.5)
    run = lambda mode: K.adam_hf_update(g, m, v, factor=f, mode=mode, **CONSTS)  # noqa: E731
    assert "pallas_call" in str(jax.make_jaxpr(lambda: run("interpret"))())
    assert "pallas_call" not in str(jax.make_jaxpr(lambda: run("auto"))())  # CPU: reference
    assert_close(jax.jit(lambda: run("interpret"))(), jax.jit(lambda: run("reference"))())


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(g=jnp.zeros(3), m=jnp.zeros(4), v=jnp.zeros(4)), "one shape"),
        (dict(g=jnp.zeros(3, jnp.int32), m=jnp.zeros(3), v=jnp.zeros(3)), "float array"),
        (dict(g=jnp.zeros(3), m=jnp.zeros(3), v=jnp.zeros(3), factor=jnp.ones(2)), "scalar"),
    ],
)
def test_bad_inputs_raise(args, match):
    args = {"factor": jnp.float32(1), **args}
    with pytest.raises(ValueError, match=match):
        K.adam_hf_update(**args, **CONSTS)


def test_traced_constants_use_the_reference_or_raise_when_forced():
    g = jnp.ones((4, 128))

    @jax.jit
    def auto(b1):
        return K.adam_hf_update(g, g, g, b1=b1, b2=0.999, eps=1e-6, factor=1.0).mu

    np.testing.assert_allclose(auto(0.5), 1.0)
    with pytest.raises(ValueError, match="Python numbers"):
        jax.jit(
            lambda b1: K.adam_hf_update(
                g, g, g, b1=b1, b2=0.9, eps=1e-6, factor=1.0, mode="interpret"
            )
        )(0.5)
