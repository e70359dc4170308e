"""The batched-LoRA kernels (interpret mode) against their reference and a per-token loop; the
Triton lowering; dispatch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.export import DisabledSafetyCheck

from lowrank_jax.kernels import kernel_mode
from lowrank_jax.kernels.lora_batched import (
    lora_batched,
    lora_batched_pallas,
    lora_batched_reference,
)


def problem(t=13, n_in=48, r=4, n_out=80, n=4, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, n_in)), dtype)
    a = jnp.asarray(rng.standard_normal((n, n_in, r)), dtype)
    b = jnp.asarray(rng.standard_normal((n, r, n_out)), dtype)
    ids = jnp.asarray(rng.integers(0, n, t), jnp.int32)
    return x, a, b, ids


def loop(x, a, b, ids):
    f = lambda z: np.asarray(z, np.float64)
    return np.stack([f(x[t]) @ f(a[i]) @ f(b[i]) for t, i in enumerate(np.asarray(ids))])


def test_reference_is_the_per_token_loop():
    x, a, b, ids = problem()
    np.testing.assert_allclose(lora_batched_reference(x, a, b, ids), loop(x, a, b, ids), atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_matches_reference_in_interpret_mode(dtype):
    x, a, b, ids = problem(dtype=dtype)
    want = jax.jit(lora_batched_reference)(x, a, b, ids)
    got = jax.jit(functools.partial(lora_batched_pallas, interpret=True))(x, a, b, ids)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol * 8)  # fmt: skip


def test_kernels_lower_to_triton():
    x, a, b, ids = problem(t=8, n_in=64, r=8, n_out=128, n=3, dtype=jnp.bfloat16)
    call = "__gpu$xla.gpu.triton"
    exported = jax.export.export(
        jax.jit(lora_batched_pallas),
        platforms=["cuda"],
        disabled_checks=[DisabledSafetyCheck.custom_call(call)],
    )(x, a, b, ids)
    assert exported.mlir_module().count(call) >= 2  # shrink and expand


def test_dispatch():
    x, a, b, ids = problem()
    want = lora_batched_reference(x, a, b, ids)
    np.testing.assert_array_equal(lora_batched(x, a, b, ids), want)  # CPU auto: the reference
    with kernel_mode("interpret"):
        np.testing.assert_allclose(lora_batched(x, a, b, ids), want, atol=2e-5)
    with pytest.raises(ValueError, match="mode='pallas' needs a CUDA GPU"):
        lora_batched(x, a, b, ids, mode="pallas")
    odd = problem(r=3)
    with pytest.raises(ValueError, match="power-of-2 rank"):
        lora_batched(*odd, mode="interpret")
    np.testing.assert_allclose(lora_batched(*odd), loop(*odd), atol=2e-5)  # auto: the reference


def test_bad_inputs():
    x, a, b, ids = problem()
    with pytest.raises(ValueError, match="ids must be integers of shape"):
        lora_batched_reference(x, a, b, ids[:-1])
    with pytest.raises(ValueError, match="shapes disagree"):
        lora_batched_reference(x, a[:, :-1], b, ids)
