"""optax transforms with the exact arithmetic of the PyTorch reference optimizers.

galore-torch, fira and apollo-torch build on HuggingFace's (deprecated) ``AdamW`` and
``Adafactor``, which differ from optax's ``scale_by_adam`` / ``adafactor`` in small but
visible ways (where ``eps`` enters, where weight decay is applied). These transforms reproduce
them so that the aliases in :mod:`lowrank_jax.optimizers` match the references within float32
round-off on the same gradient stream.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import kernels
from lowrank_jax.sharding import auto_sharded
from lowrank_jax.transforms._common import check_float_tree, safe_increment

__all__ = [
    "ScaleByAdafactorHFState",
    "decoupled_weight_decay",
    "scale_by_adafactor_hf",
    "scale_by_adam_hf",
]


def scale_by_adam_hf(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    correct_bias: bool = True,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Adam as in HuggingFace's ``AdamW`` (and galore-torch): eps before bias correction.

    .. math::
        m_t = \beta_1 m + (1-\beta_1) g,\quad v_t = \beta_2 v + (1-\beta_2) g^2,\quad
        u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t} + \epsilon}

    Equivalent to optax's ``scale_by_adam`` with a time-varying
    :math:`\epsilon_t = \epsilon/\sqrt{1-\beta_2^t}`.

    Args:
      b1, b2: moment decay rates.
      eps: added to :math:`\sqrt{v_t}` (galore-torch default ``1e-6``).
      correct_bias: apply the bias-correction factor (``False`` is BERT-style Adam).
      mu_dtype: optional dtype of the first moment.

    Returns:
      A transformation whose state is ``optax.ScaleByAdamState(count, mu, nu)``.
    """

    def init_fn(params: Any) -> optax.ScaleByAdamState:
        check_float_tree(params, "scale_by_adam_hf")
        mu = optax.tree.zeros_like(params, dtype=mu_dtype)
        nu = optax.tree.zeros_like(params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates: Any, state: optax.ScaleByAdamState, params: Any = None):
        del params
        count = safe_increment(state.count)
        t = count.astype(jnp.float32)
        factor = jnp.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else jnp.float32(1)
        # One fused pass per leaf: a Pallas kernel on GPU/TPU, plain jnp elsewhere.
        outs = jax.tree.map(
            lambda g, m, v: kernels.adam_hf_update(g, m, v, b1=b1, b2=b2, eps=eps, factor=factor),
            updates,
            state.mu,
            state.nu,
        )
        is_out = lambda x: isinstance(x, kernels.AdamUpdate)
        update, mu, nu = (
            jax.tree.map(lambda o, i=i: o[i], outs, is_leaf=is_out) for i in range(3)
        )
        return update, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdafactorHFState(NamedTuple):
    """State of :func:`scale_by_adafactor_hf` (``MaskedNode`` where a leaf has no such stat)."""

    count: jax.Array
    exp_avg: Any  # first moment (beta1 set), else None
    exp_avg_sq_row: Any  # factored leaves: (..., rows)
    exp_avg_sq_col: Any  # factored leaves: (..., cols)
    exp_avg_sq: Any  # unfactored leaves: full shape


def scale_by_adafactor_hf(
    learning_rate: optax.ScalarOrSchedule,
    *,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    beta1: float | None = None,
) -> optax.GradientTransformation:
    r"""Adafactor as HuggingFace/galore-torch with ``relative_step=False, scale_parameter=False``.

    Per step :math:`t`: :math:`\hat\beta_{2t} = 1 - t^{c}` (``c = decay_rate``),
    :math:`u = g^2 + \epsilon_1`; factored (``ndim >= 2``) row/column EMAs of :math:`u` give
    :math:`U = g / \sqrt{(r / \bar r)\, c}`; the update is clipped to RMS ``clip_threshold``,
    multiplied by the learning rate, and then (if ``beta1``) averaged into the first moment --
    so the first moment holds the *lr-scaled* update, as in the reference.

    Unlike optax's ``adafactor``, the learning rate is applied inside (before the first
    moment), and the output is the positive step (negate it before ``apply_updates``).
    ``eps[1]`` only matters for ``scale_parameter=True``, which is not supported here because
    it needs the full parameter (GaLore's HF integration also forces it off).
    """
    eps1 = eps[0]  # eps[1] only scales by the parameter RMS (scale_parameter=True).

    def init_fn(params: Any) -> ScaleByAdafactorHFState:
        # The reference upcasts gradients to float32 and keeps its statistics in float32.
        def stat(x: Any, shape: tuple[int, ...] | None) -> Any:
            return optax.MaskedNode() if shape is None else jnp.zeros(shape, jnp.float32)

        factored = lambda x: jnp.ndim(x) >= 2
        return ScaleByAdafactorHFState(
            count=jnp.zeros([], jnp.int32),
            exp_avg=optax.tree.zeros_like(params, jnp.float32) if beta1 is not None else None,
            exp_avg_sq_row=jax.tree.map(
                lambda x: stat(x, x.shape[:-1] if factored(x) else None), params
            ),
            exp_avg_sq_col=jax.tree.map(
                lambda x: stat(x, x.shape[:-2] + x.shape[-1:] if factored(x) else None), params
            ),
            exp_avg_sq=jax.tree.map(lambda x: stat(x, None if factored(x) else x.shape), params),
        )

    def update_fn(updates: Any, state: ScaleByAdafactorHFState, params: Any = None):
        del params
        count = safe_increment(state.count)
        beta2t = 1.0 - count.astype(jnp.float32) ** decay_rate
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def leaf(g: Any, row: Any, col: Any, sq: Any) -> _LeafOut:
            if isinstance(g, optax.MaskedNode):
                return _LeafOut(g, row, col, sq)
            g32 = g.astype(jnp.float32)
            u = jnp.square(g32) + eps1
            if g.ndim >= 2:
                row = beta2t * row + (1 - beta2t) * jnp.mean(u, axis=-1)
                col = beta2t * col + (1 - beta2t) * jnp.mean(u, axis=-2)
                r_factor = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))
                step = r_factor[..., :, None] * jax.lax.rsqrt(col)[..., None, :] * g32
            else:
                sq = beta2t * sq + (1 - beta2t) * u
                step = jax.lax.rsqrt(sq) * g32
            rms = jnp.linalg.norm(step) / jnp.sqrt(jnp.float32(step.size))
            step = step / jnp.maximum(rms / clip_threshold, 1.0)
            return _LeafOut(step * lr, row, col, sq)

        outs = jax.tree.map(
            leaf,
            updates,
            state.exp_avg_sq_row,
            state.exp_avg_sq_col,
            state.exp_avg_sq,
            is_leaf=lambda x: isinstance(x, optax.MaskedNode),
        )
        is_out = lambda x: isinstance(x, _LeafOut)
        step, row, col, sq = (
            jax.tree.map(lambda o, i=i: o[i], outs, is_leaf=is_out) for i in range(4)
        )
        exp_avg = state.exp_avg
        if beta1 is not None:
            exp_avg = jax.tree.map(lambda m, s: beta1 * m + (1 - beta1) * s, exp_avg, step)
            step = exp_avg
        step = jax.tree.map(lambda s, g: s.astype(g.dtype), step, updates)
        return step, ScaleByAdafactorHFState(count, exp_avg, row, col, sq)

    return auto_sharded(optax.GradientTransformation(init_fn, update_fn))


class _LeafOut(NamedTuple):
    step: Any
    row: Any
    col: Any
    sq: Any


class DecoupledWeightDecayState(NamedTuple):
    count: jax.Array


def decoupled_weight_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    *,
    after_update: bool,
    mask: Any = None,
) -> optax.GradientTransformation:
    r"""Adds decoupled weight decay ``-lr·wd·W`` to final (already signed, lr-scaled) updates.

    ``after_update=True`` decays the *updated* weights, as HF ``AdamW`` / galore-torch do
    (:math:`W \leftarrow (W + u)(1 - \eta\lambda)`); ``False`` decays the weights before the
    update, as HF ``Adafactor`` does (:math:`W \leftarrow W - \eta\lambda W + u`). The learning
    rate is *not* multiplied by GaLore's ``scale``.

    Args:
      learning_rate: the same scalar or schedule as the optimizer's (indexed by the step count).
      weight_decay: :math:`\lambda`.
      after_update: where the decay is applied (see above).
      mask: optional bool tree or callable selecting decayed leaves (default: all).
    """

    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return optax.identity()  # no decay: no pass over the parameters at all

    def init_fn(params: Any) -> DecoupledWeightDecayState:
        del params
        return DecoupledWeightDecayState(jnp.zeros([], jnp.int32))

    def update_fn(updates: Any, state: DecoupledWeightDecayState, params: Any = None):
        if params is None:
            raise ValueError(
                "decoupled_weight_decay needs the parameters: call update(updates, state, params)."
            )
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        base = jax.tree.map(lambda u, p: p + u, updates, params) if after_update else params
        decayed = jax.tree.map(
            lambda u, w: (u - lr * weight_decay * w).astype(u.dtype), updates, base
        )
        if mask is not None:
            m = mask(params) if callable(mask) else mask
            decayed = jax.tree.map(lambda keep, d, u: d if keep else u, m, decayed, updates)
        return decayed, DecoupledWeightDecayState(safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
