"""Helpers shared by the gradient transformations: mask splitting, counters, keys, canon layout."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.targets import path_str

MaskedNode = optax.MaskedNode


def is_masked(x: Any) -> bool:
    return isinstance(x, MaskedNode)


def select(mask: Any, tree: Any) -> Any:
    """``tree`` with every leaf whose mask is False replaced by ``optax.MaskedNode()``."""
    if tree is None:
        return None
    return jax.tree.map(lambda m, x: x if m else MaskedNode(), mask, tree)


def combine(mask: Any, selected: Any, rest: Any) -> Any:
    """Inverse of :func:`select`: leaves from ``selected`` where mask is True, else ``rest``."""
    return jax.tree.map(
        lambda m, a, b: a if m else b, mask, selected, rest, is_leaf=is_masked
    )


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1`` that saturates at the int32 maximum instead of overflowing."""
    return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)


def new_key(seed: int | jax.Array) -> jax.Array:
    """Raw ``uint32[2]`` key data: jnp.where/orbax/apply_if_finite all handle it."""
    return jax.random.key_data(jax.random.key(seed))


def wrap_key(data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(data)


def check_float_leaf(path: str, leaf: Any, method: str) -> None:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(
            f"{method}: leaf '{path}' has dtype {leaf.dtype}; only floating-point parameters "
            "can be optimized. Exclude it with `targets=` or keep it out of the optimizer "
            "(for example with optax.partition / optax.set_to_zero)."
        )


def check_float_tree(tree: Any, method: str) -> None:
    """:func:`check_float_leaf` on every array leaf of ``tree`` (``MaskedNode`` skipped)."""
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "dtype"):
            check_float_leaf(path_str(keypath), leaf, method)
