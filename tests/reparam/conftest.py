"""Shared fixtures for the reparameterization tests: tiny parameter trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax import reparam as R


def normal(seed, shape, scale=1.0, dtype=jnp.float32):
    """Gaussian test data from NumPy: no XLA compilation per shape (keeps the suite fast)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def tree(key=None, dtype=jnp.float32):
    """A small model-like tree: two 2-D kernels, a scan-stacked kernel, a norm and an embedding."""
    return {
        "embed": {"embedding": normal(4, (11, 8), dtype=dtype)},
        "layers": {
            "attn": {"q_proj": {"kernel": normal(1, (8, 12), 0.5, dtype)}},
            "mlp": {"up": {"kernel": normal(2, (3, 8, 16), 0.5, dtype)}},
            "norm": {"scale": jnp.ones((8,), dtype)},
        },
        "head": {"kernel": normal(3, (16, 8), 0.5, dtype)},
    }


def perturb(adapters, scale=0.3, seed=0):
    """Adapters with every trainable leaf moved away from its init (as after training)."""
    leaves, treedef = jax.tree.flatten(adapters.trainable)
    moved = [x + normal(seed + i, x.shape, scale, x.dtype) for i, x in enumerate(leaves)]
    return adapters.replace(trainable=jax.tree.unflatten(treedef, moved))


ZEROS = {"kernel_init": nnx.initializers.zeros_init()}  # no RNG compile in layer constructors


def filled(module, seed=0, scale=0.5):
    """``module`` with every ``nnx.Param`` set to NumPy Gaussian values (deterministic)."""
    for i, (_, var) in enumerate(sorted(nnx.iter_graph(module), key=lambda e: str(e[0]))):
        if isinstance(var, nnx.Param):
            var[...] = normal(seed + i, var.shape, scale)
    return module


# name -> (factory, trainable parameters of one (..., in, out) matrix with `batch` matrices)
METHODS = {
    "lora": (lambda: R.lora(4, 8), lambda b, i, o: b * 4 * (i + o)),
    "dora": (lambda: R.dora(4), lambda b, i, o: b * (4 * (i + o) + o)),
    "pissa": (lambda: R.pissa(4), lambda b, i, o: b * 4 * (i + o)),
    "olora": (lambda: R.olora(4), lambda b, i, o: b * 4 * (i + o)),
    "ffa_lora": (lambda: R.ffa_lora(4), lambda b, i, o: b * 4 * o),
    "lora_xs": (lambda: R.lora_xs(4), lambda b, i, o: b * 16),
    "vera": (lambda: R.vera(6), lambda b, i, o: b * (o + 6)),
    "nola": (lambda: R.nola(4, num_a=5, num_b=7), lambda b, i, o: b * 12),
    "diablo": (lambda: R.diablo(4), lambda b, i, o: b * i * o // 4),
    "dora_pissa": (lambda: R.dora(4, init="pissa"), lambda b, i, o: b * (4 * (i + o) + o)),
}


@pytest.fixture
def params(key):
    return tree(key)
