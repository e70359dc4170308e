"""Norm-based gradient scaling shared by Fira and APOLLO: the gain, the limiter, Adam's factor.

* :func:`gain` -- ``‖N_k‖ / (‖R_k‖ + 1e-8)`` per channel ``k`` of the uncompressed axis (or for
  the whole matrix): how much an adaptive optimizer amplified the projected gradient ``R``.
* :func:`limit_norm_growth` -- Fira's norm-growth limiter: the norm of a matrix's update may
  grow by at most a factor ``γ`` per step, relative to the previous *limited* norm.
* :func:`scale_by_adam_bias_correction` -- Adam's bias correction as a separate transform,
  for methods whose reference computes the gain from the *uncorrected* ``M / (√V + ε)`` and
  folds :math:`\\sqrt{1-\\beta_2^t}/(1-\\beta_1^t)` into the step size.

Reference: Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?", 2024, Eqs. 9-12. https://arxiv.org/abs/2410.01623
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.transforms._common import safe_increment

__all__ = ["ScaleByBiasCorrectionState", "scale_by_adam_bias_correction"]

GAIN_EPS = 1e-8  # added to ‖R‖ (fira, apollo-torch: a literal 1e-8)
SCALE_TYPES = ("channel", "tensor")


def compressed_axis(side: str, method: str) -> int:
    """The canonical axis of the projected gradient that holds the ``r`` coordinates."""
    if side == "in":
        return -2
    if side == "out":
        return -1
    raise ValueError(
        f"{method}: proj_type='full' compresses both axes, so no channel axis is left to "
        "scale; use 'std', 'reverse_std', 'left' or 'right'."
    )


def gain(n: jax.Array, r: jax.Array, axis: int | None) -> jax.Array:
    """``‖N‖/(‖R‖ + 1e-8)`` over ``axis`` (channel-wise) or both matrix axes (``None``).

    The result keeps the reduced axes (size 1), so it broadcasts over the full gradient.
    """
    axes = (-2, -1) if axis is None else (axis,)
    norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))
    return norm(n) / (norm(r) + GAIN_EPS)


def limit_norm_growth(
    update: jax.Array, previous: jax.Array, first: jax.Array, gamma: float
) -> tuple[jax.Array, jax.Array]:
    r"""Caps the growth of each matrix's ``‖update‖_F`` to a factor ``γ`` per step (Fira Eq. 12).

    :math:`\lambda = \max(\|S_t\|/(\|S_{t-1}\| + 10^{-8}), \gamma)/\gamma`.

    Args:
      update: ``(..., in, out)``.
      previous: ``float32[..., 1]``, the previous post-limit norm of each matrix.
      first: no limiting on the first step (the reference has no previous norm yet).
      gamma: ``γ``.

    Returns:
      ``(update / λ, ‖update‖ / λ)``; the second (``float32[..., 1]``) is the next ``previous``.
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(update.astype(jnp.float32)), axis=(-2, -1)))[..., None]
    ratio = jnp.maximum(norm / (previous + 1e-8), gamma) / gamma
    ratio = jnp.where(first, jnp.ones_like(ratio), ratio)
    return update / ratio[..., None].astype(update.dtype), norm / ratio


def init_norms(shape: tuple[int, ...]) -> jax.Array:
    """Limiter state of one leaf with canonical ``shape``: ``float32[*batch, 1]`` (one per matrix,
    never 0-d, so :func:`lowrank_jax.memory.state_bytes` counts it as the paper does)."""
    return jnp.zeros((*shape[:-2], 1), jnp.float32)


class ScaleByBiasCorrectionState(NamedTuple):
    """State of :func:`scale_by_adam_bias_correction`."""

    count: jax.Array


def scale_by_adam_bias_correction(
    b1: float = 0.9, b2: float = 0.999
) -> optax.GradientTransformation:
    r"""Multiplies every update by Adam's bias-correction factor.

    :math:`c_t = \sqrt{1-\beta_2^t}/(1-\beta_1^t)` at step :math:`t = 1, 2, \dots`

    ``chain(scale_by_adam_hf(correct_bias=False), scale_by_adam_bias_correction())`` equals
    ``scale_by_adam_hf()``; splitting them lets a method see the uncorrected ratio, as the
    Fira and APOLLO references do.

    Args:
      b1, b2: the Adam decay rates.

    Returns:
      A transformation with a step counter as state.
    """

    def init_fn(params: Any) -> ScaleByBiasCorrectionState:
        del params
        return ScaleByBiasCorrectionState(jnp.zeros([], jnp.int32))

    def update_fn(updates: Any, state: ScaleByBiasCorrectionState, params: Any = None):
        del params
        count = safe_increment(state.count)
        t = count.astype(jnp.float32)
        factor = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree.map(lambda u: (factor * u).astype(u.dtype), updates)
        return updates, ScaleByBiasCorrectionState(count)

    return optax.GradientTransformation(init_fn, update_fn)
