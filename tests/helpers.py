"""Helpers shared by the transform tests."""

import jax
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
