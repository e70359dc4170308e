"""Q-GaLore's INT8 weights: stored in its group format, updated by stochastic rounding.

A weight is stored as :class:`~lowrank_jax.transforms.QuantizedGroups` (8 bits, groups of
``group_size`` along the in axis of the PyTorch-layout weight, as ``W8Linear``); the forward pass
uses :func:`dequantize_weights`, and :func:`stochastic_weight_update` -- the last step of the
optimizer chain -- adds the float update and re-quantizes with stochastic rounding, which is
unbiased, so updates far below one quantization step still move the weights on average.

Reference: Zhang et al., "Q-GaLore", 2024 (``utils/quantization.py`` ``W8Linear``,
``q_galore_adamw8bit.py`` ``_quantize_stochastic_round``).
"""

from __future__ import annotations

import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.targets import MatrixDims, Targets, path_str, resolve, resolve_dims
from lowrank_jax.transforms._common import new_key, safe_increment, wrap_key
from lowrank_jax.transforms._qgalore import QuantizedGroups, dequantize_groups, quantize_groups

__all__ = [
    "StochasticWeightState",
    "dequantize_weights",
    "quantize_weights",
    "stochastic_weight_update",
]

def _weight_plans(tree: Any, targets: Targets, dims: Any, method: str) -> tuple[Any, list, list]:
    mask = resolve(targets, tree, method=method)
    dims_tree = resolve_dims(dims, tree)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, QuantizedGroups)
    )
    masks = treedef.flatten_up_to(mask)
    dims_list = treedef.flatten_up_to(dims_tree)
    plans = []
    for (kp, leaf), selected, d in zip(flat, masks, dims_list):
        if not selected or d is None:
            plans.append(None)
            continue
        ndim = len(np.shape(leaf)) if not isinstance(leaf, QuantizedGroups) else None
        plans.append((path_str(kp), d if ndim is None else d.normalize(ndim, path_str(kp))))
    return treedef, [leaf for _, leaf in flat], plans


def _torch_shape(shape: tuple[int, ...], d: MatrixDims) -> tuple[int, ...]:
    *batch, n_in, n_out = d.canonical_shape(tuple(shape))
    return (*batch, n_out, n_in)


def _to_torch(x: jax.Array, d: MatrixDims) -> jax.Array:
    return jnp.swapaxes(d.to_canonical(x), -1, -2)


def _from_torch(x: jax.Array, d: MatrixDims) -> jax.Array:
    return d.from_canonical(jnp.swapaxes(x, -1, -2))


def quantize_weights(
    params: Any, *, targets: Targets = None, dims: Any = None, group_size: int = 256
) -> Any:
    """``params`` with every targeted weight stored INT8 (:class:`QuantizedGroups`, groups along
    the in axis as Q-GaLore's ``W8Linear``; round to nearest, as its init).

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> q = lr.transforms.quantize_weights({"w": jnp.ones((64, 32))}, group_size=256)
      >>> q["w"].codes.dtype, q["w"].codes.shape, q["w"].scales.shape
      (dtype('uint8'), (8, 256), (8,))
    """
    treedef, leaves, plans = _weight_plans(params, targets, dims, "quantize_weights")
    out = []
    for leaf, plan in zip(leaves, plans):
        if plan is None:
            out.append(leaf)
        else:
            out.append(quantize_groups(_to_torch(leaf, plan[1]), 8, group_size,
                                       scale_dtype=jnp.bfloat16,
                                       where=f"quantize_weights '{plan[0]}'"))
    return treedef.unflatten(out)


def dequantize_weights(
    qparams: Any, like: Any, *, dims: Any = None, dtype: Any = None
) -> Any:
    """The float weights of ``qparams`` (for the forward pass), shaped like ``like`` (the
    original parameters or their ``ShapeDtypeStruct``); ``dtype`` defaults to each leaf's."""
    like_leaves, treedef = jax.tree.flatten(like)
    q_leaves = treedef.flatten_up_to(qparams)
    dims_list = treedef.flatten_up_to(resolve_dims(dims, like))
    out = []
    for q, x, d in zip(q_leaves, like_leaves, dims_list):
        if not isinstance(q, QuantizedGroups):
            out.append(q)
            continue
        d = d.normalize(len(x.shape))
        w = dequantize_groups(q, _torch_shape(x.shape, d), dtype or x.dtype)
        out.append(_from_torch(w, d))
    return treedef.unflatten(out)


class StochasticWeightState(NamedTuple):
    """State of :func:`stochastic_weight_update`: the step and the rounding key."""

    count: jax.Array
    key: jax.Array


def stochastic_weight_update(
    *,
    like: Any,
    dims: Any = None,
    learning_rate: optax.ScalarOrSchedule = 0.0,
    weight_decay: float = 0.0,
    stochastic: bool = True,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""Turns float updates into updates of INT8-stored weights, re-quantized with stochastic
    rounding (Q-GaLore's weight step).

    For every weight stored as :class:`QuantizedGroups` in ``params``:

    .. math::
        W_f = s(q - z) + u,\quad W_f \leftarrow W_f (1 - \eta\lambda),\quad
        (q', s', z') = \mathrm{SR}_8(W_f)

    with fresh per-group ``s', z'`` and stochastic rounding (round to nearest with
    ``stochastic=False``); the output is the difference ``(q' - q, s' - s, z' - z)``, so
    ``optax.apply_updates`` stores exactly the new codes. Float leaves get
    ``u - ηλ(W + u)``. The last transformation of a chain whose ``params`` are
    :func:`quantize_weights`' output; the gradient comes from the dequantized weights
    (:func:`dequantize_weights`). Rounding keys are per step and per leaf path.

    Args:
      like: the float parameters (or ``ShapeDtypeStruct``) ``params`` were quantized from.
      dims: their :class:`~lowrank_jax.MatrixDims` (as given to :func:`quantize_weights`).
      learning_rate, weight_decay: decoupled decay of the updated weights (reference order).
      stochastic: stochastic rounding (Q-GaLore ``--stochastic_round``) or round to nearest.
      seed: seed of the rounding noise.

    Returns:
      An ``optax.GradientTransformation`` (state: :class:`StochasticWeightState`).
    """
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), like)

    def init_fn(params: Any) -> StochasticWeightState:
        del params
        return StochasticWeightState(jnp.zeros([], jnp.int32), new_key(seed))

    def update_fn(updates: Any, state: StochasticWeightState, params: Any = None):
        if params is None:
            raise ValueError("stochastic_weight_update needs the (quantized) parameters.")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        decay = lr * weight_decay
        like_leaves, treedef = jax.tree.flatten(like)
        p_leaves = treedef.flatten_up_to(params)
        u_leaves = treedef.flatten_up_to(updates)
        dims_list = treedef.flatten_up_to(resolve_dims(dims, like))
        paths = [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
        step_key = jax.random.fold_in(wrap_key(state.key), state.count)
        out = []
        for path, x, p, u, d in zip(paths, like_leaves, p_leaves, u_leaves, dims_list):
            if not isinstance(p, QuantizedGroups):
                out.append((u - decay * (p + u)).astype(u.dtype) if weight_decay else u)
                continue
            d = d.normalize(len(x.shape))
            w = dequantize_groups(p, _torch_shape(x.shape, d), jnp.float32)
            w = (w + _to_torch(u.astype(jnp.float32), d)) * (1 - decay)
            key = jax.random.fold_in(step_key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
            new = quantize_groups(w, 8, p.codes.shape[-1], key=key if stochastic else None,
                                  scale_dtype=p.scales.dtype,
                                  where=f"stochastic_weight_update '{path}'")
            out.append(QuantizedGroups(
                new.codes.astype(jnp.int32) - p.codes.astype(jnp.int32),
                new.scales.astype(jnp.float32) - p.scales.astype(jnp.float32),
                new.zeros.astype(jnp.float32) - p.zeros.astype(jnp.float32),
            ))
        return treedef.unflatten(out), StochasticWeightState(safe_increment(state.count), state.key)

    return optax.GradientTransformation(init_fn, update_fn)

