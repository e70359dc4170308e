"""LoRA-GGPO: gradient- and weight-norm-guided random perturbations of the merged weights."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.targets import path_str
from lowrank_jax.transforms import _lora_factors
from lowrank_jax.transforms._common import new_key, safe_increment, wrap_key

__all__ = ["GGPOState", "ggpo_perturb", "lora_ggpo"]


class GGPOState(NamedTuple):
    """State of :func:`lora_ggpo`.

    Attributes:
      count: the step (``int32``); the noise of step ``t`` is drawn from ``fold_in(key, t)``.
      key: ``uint32[2]`` key data.
      weight_norms: per adapter (keyed by its path) ``‖W_j‖²`` per output unit, ``(..., out)``.
      grad_norms: per adapter ``‖∇W_j‖²`` per output unit from the last step, ``(..., out)``.
      inner_state: the wrapped optimizer's state.
    """

    count: jax.Array
    key: jax.Array
    weight_norms: dict
    grad_norms: dict
    inner_state: Any


def _adapters(tree: Any, method: str) -> dict[str, tuple[str, str]]:
    """``{adapter path: (A path, B path)}`` of the pairs in ``tree``."""
    flat = _lora_factors.flat_paths(tree)
    pairs = {}
    for path in flat:
        if _lora_factors.factor_of(path) == "b":
            a = _lora_factors.partner_path(path)
            if a in flat:
                pairs[path.rsplit("/", 1)[0]] = (a, path)
    if not pairs:
        _lora_factors.check_factors({}, method)
    return pairs


def lora_ggpo(
    inner: optax.GradientTransformation,
    *,
    scaling: _lora_factors.Scaling = 1.0,
    base_row_norms: Mapping[str, float] | float = 0.0,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Tracks what LoRA-GGPO's perturbation needs: per output unit :math:`\|W_j\|^2` and
    :math:`\|\nabla W_j\|^2` of every adapter's merged weight (``inner`` does the update).

    For an adapter ``W' = W_0 + s A B`` (``A: (in, r)``, ``B: (r, out)``) the state keeps, per
    output unit :math:`j` (a PyTorch row),

    .. math::
        \|W_j\|^2 = \hat w^2 + \|(sAB)_{:,j}\|^2,\qquad
        \|\nabla W_j\|^2 = \|s(\nabla A\,B + A\,\nabla B)_{:,j}\|^2

    (:math:`\hat w` the mean row norm of the frozen base, ``base_row_norms``; the gradient of the
    merged weight estimated from the adapter's, as the public ports do): ``2·out`` floats per
    adapter. :func:`ggpo_perturb` then adds, in the training forward pass only, fresh noise
    :math:`\epsilon_{:,j} \sim \mathcal N\bigl(0, \tfrac{\sigma^2}{n}(\|W_j\|^2 +
    \beta\|\nabla W_j\|^2) I\bigr)` to the merged weights (``n`` = in). The exact v1 formula is
    not public (the paper's code was unavailable); this is the "Eq. 6-8" port's.

    Works layer-wise on stacked adapters (per-leaf state).

    Args:
      inner: the adapters' optimizer (e.g. ``optax.adamw``).
      scaling: the LoRA scale ``s`` (a float, ``{adapter path: s}`` or a callable).
      base_row_norms: ``ŵ`` per adapter path (or one float): the frozen base's mean row norm.
      seed: seed of the perturbation noise.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`GGPOState`.

    Example:
      >>> import jax.numpy as jnp, optax, lowrank_jax as lr
      >>> adapter = {"q": {"A": jnp.ones((8, 2)), "B": jnp.ones((2, 4))}}
      >>> state = lr.transforms.lora_ggpo(optax.sgd(0.1)).init(adapter)
      >>> state.grad_norms["q"].shape
      (4,)

    References:
      Chang et al., "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via
      Gradient-Guided Perturbation Optimization", arXiv:2502.14538 (v1).
    """
    inner = optax.with_extra_args_support(inner)

    def norms(tree: Any, grads: Any | None) -> tuple[dict, dict]:
        flat = _lora_factors.flat_paths(tree)
        gflat = _lora_factors.flat_paths(grads) if grads is not None else None
        weights, gradients = {}, {}
        for site, (a_path, b_path) in _adapters(tree, "lora_ggpo").items():
            s = _lora_factors.scaling_of(scaling, b_path, "lora_ggpo")
            a, b = flat[a_path].astype(jnp.float32), flat[b_path].astype(jnp.float32)
            base = base_row_norms.get(site, 0.0) if isinstance(base_row_norms, Mapping) else (
                base_row_norms
            )
            weights[site] = base**2 + jnp.sum(jnp.square(s * a @ b), axis=-2)
            if gflat is None:
                gradients[site] = jnp.zeros_like(weights[site])
            else:
                ga, gb = gflat[a_path].astype(jnp.float32), gflat[b_path].astype(jnp.float32)
                gradients[site] = jnp.sum(jnp.square(s * (ga @ b + a @ gb)), axis=-2)
        return weights, gradients

    def init_fn(params: Any) -> GGPOState:
        weights, gradients = norms(params, None)
        return GGPOState(jnp.zeros([], jnp.int32), new_key(seed), weights, gradients,
                         inner.init(params))

    def update_fn(
        updates: Any, state: GGPOState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, GGPOState]:
        if params is None:
            raise ValueError(
                "lora_ggpo needs the adapter parameters: update(grads, state, params)."
            )
        weights, gradients = norms(params, updates)
        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        return new_updates, GGPOState(
            safe_increment(state.count), state.key, weights, gradients, inner_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ggpo_perturb(
    weights: Any, state: Any, *, sigma: float = 0.03, beta: float = 0.01
) -> Any:
    r"""``weights`` (merged, canonical ``(..., in, out)``) plus LoRA-GGPO's noise at the adapted
    leaves: :math:`\epsilon_{:,j} \sim \mathcal N(0, \tfrac{\sigma^2}{n}(\|W_j\|^2 +
    \beta\|\nabla W_j\|^2))`, fresh each step (keyed by the state's step and the leaf path).
    For the training forward only; ``state`` is :func:`lora_ggpo`'s (found inside a chain).

    Args:
      weights: the merged parameters (adapter paths name their leaves).
      state: a :class:`GGPOState` or an optax state containing one.
      sigma, beta: the port's defaults (0.03, 0.01).
    """
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, GGPOState))
             if isinstance(s, GGPOState)]
    if len(found) != 1:
        raise ValueError(f"ggpo_perturb: expected one GGPOState in the state, found {len(found)}.")
    ggpo = found[0]
    key = jax.random.fold_in(wrap_key(ggpo.key), ggpo.count)

    def add(keypath: Any, w: Any) -> Any:
        path = path_str(keypath)
        if path not in ggpo.weight_norms:
            return w
        var = sigma**2 / w.shape[-2] * (ggpo.weight_norms[path] + beta * ggpo.grad_norms[path])
        k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        noise = jax.random.normal(k, w.shape, jnp.float32) * jnp.sqrt(var)[..., None, :]
        return (w + noise).astype(w.dtype)

    missing = set(ggpo.weight_norms) - set(_lora_factors.flat_paths(weights))
    if missing:
        raise ValueError(
            f"ggpo_perturb: no merged weight at {sorted(missing)[:4]}; pass the merged "
            "parameters keyed by the adapters' paths."
        )
    return jax.tree_util.tree_map_with_path(add, weights)
