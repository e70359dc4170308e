"""GradNormLoRP: weight-normalised matrices whose direction is trained by GaLore."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import projection
from lowrank_jax.targets import Targets
from lowrank_jax.transforms._lowrank import LeafStep, ProjectedCore
from lowrank_jax.transforms._torch_style import scale_by_adam_hf

__all__ = ["GradNormLoRPState", "WeightNormLeaf", "gradnorm_lorp_adamw", "weight_norm"]

_EPS = 1e-12


class WeightNormLeaf(NamedTuple):
    """One weight-normalised matrix: ``W = g · v / ‖v‖`` per output unit (canonical layout).

    Attributes:
      v: the direction, ``(..., in, out)`` (a full-size copy, as the reference).
      g: the magnitudes, ``(..., 1, out)``.
      g_mu, g_nu: Adam moments of ``g``.
    """

    v: jax.Array
    g: jax.Array
    g_mu: jax.Array
    g_nu: jax.Array


class GradNormLoRPState(NamedTuple):
    """State of :func:`gradnorm_lorp_adamw`: GaLore's fields plus the weight-norm leaves.

    Attributes:
      count, key, projectors, lowrank_state, fullrank_state, refresh_state: as
        :class:`~lowrank_jax.GaLoreState` (the low-rank state is over ``∇v``).
      norm_state: per targeted leaf a :class:`WeightNormLeaf` (``MaskedNode`` elsewhere).
    """

    count: jax.Array
    key: jax.Array
    projectors: Any
    lowrank_state: Any
    fullrank_state: Any
    norm_state: Any
    refresh_state: Any = None


def _norm(v: jax.Array) -> jax.Array:
    """``‖v‖`` per output unit (over the in axis), ``(..., 1, out)``, with ``ε = 1e-12``."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=-2, keepdims=True) + _EPS**2)


def weight_norm(v: jax.Array, g: jax.Array) -> jax.Array:
    r"""``W = g · v / ‖v‖``, the norm over the in axis of a canonical ``(..., in, out)`` ``v``
    (a PyTorch output row), so scaling ``v`` by ``c > 0`` leaves ``W`` unchanged."""
    return g * v / _norm(v)


def gradnorm_lorp_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    reference_quirks: bool = False,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""GradNormLoRP-AdamW: weight normalisation, with GaLore on the direction's gradient.

    Every targeted matrix is :math:`W = g\,v/\|v\|` (per output unit; :math:`v` and :math:`g`
    live in the state, :math:`W` follows them). With :math:`G = \partial L/\partial W`,
    :math:`\hat v = v/\|v\|` and the exact weight-norm gradients (Salimans & Kingma)

    .. math::
        \nabla g = \hat v^\top G,\qquad
        \nabla v = \frac{g}{\|v\|}\bigl(G - \hat v\,(\hat v^\top G)\bigr),

    :math:`\nabla v` is projected to rank ``r`` (GaLore, refreshed every ``T`` steps) and HF
    Adam runs on :math:`P^\top\nabla v` and on :math:`\nabla g`:

    .. math::
        v \leftarrow v - \eta\,\alpha\,P\,\mathrm{AdamHF}(P^\top \nabla v),\quad
        g \leftarrow g - \eta\,\mathrm{AdamHF}(\nabla g),\quad
        (v, g) \leftarrow (v, g)(1 - \eta\lambda),\quad W = g\,v/\|v\|

    ``reference_quirks=True`` reproduces the authors' ``LowRankWeightNormAdamW`` instead: ``g``
    is reset to :math:`\|v\|` at every step (a learned magnitude survives one step) and
    :math:`\nabla v = G\,g/\|v\|` without the projection term; the norm has :math:`\epsilon =
    10^{-12}` either way (the reference divides by zero on zero rows). Untargeted leaves get
    HF AdamW (the reference weight-normalises them too, without projection).

    The state per ``m x n`` matrix is the reference's: ``mn`` (``v``) + ``m`` (``g``) + GaLore's
    ``r·min + 2r·max`` + ``2m`` (Adam on ``g``). Works layer-wise (per-matrix state).

    Args:
      learning_rate: scalar or schedule (reference default 1e-3).
      rank, update_proj_gap, scale, proj_type, targets, dims, seed: GaLore's
        (:func:`~lowrank_jax.galore`; reference: T 200, α 1).
      b1, b2, eps: HF Adam constants (``eps`` 1e-6 before bias correction).
      weight_decay: ``λ``, on ``v`` and ``g`` after the update.
      reference_quirks: reproduce the reference code (see above).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`GradNormLoRPState`.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> params = {"w": jnp.ones((16, 8))}
      >>> state = lr.gradnorm_lorp_adamw(1e-3, rank=2).init(params)
      >>> state.norm_state["w"].v.shape, state.norm_state["w"].g.shape
      ((16, 8), (1, 8))

    References:
      Huang et al., "Gradient Weight-normalized Low-rank Projection for Efficient LLM
      Training" (GradNormLoRP), AAAI 2025. https://arxiv.org/abs/2412.19616
    """
    core = ProjectedCore(
        scale_by_adam_hf(b1, b2, eps),
        method="gradnorm_lorp",
        rank=rank,
        update_proj_gap=update_proj_gap,
        proj_type=proj_type,
        basis="svd",
        targets=targets,
        dims=dims,
        on_refresh="keep",
        projector_dtype=None,
        seed=seed,
    )

    def init_fn(params: Any) -> GradNormLoRPState:
        def leaf(plan: Any) -> WeightNormLeaf:
            small = lambda: jnp.zeros((*plan.shape[:-2], 1, plan.shape[-1]), jnp.float32)
            return WeightNormLeaf(jnp.zeros(plan.shape, jnp.float32), small(), small(), small())

        treedef, leaves, plans = core.plan(params)
        norms = treedef.flatten_up_to(core.init_leaves(params, leaf))
        for i, (p, x) in enumerate(zip(plans, leaves)):
            if p is not None:  # v = W, g = ‖W‖: the same weights, reparameterised
                # a copy: a state that aliased the parameters could not be donated with them
                w = jnp.array(p.dims.to_canonical(x), jnp.float32, copy=True)
                norms[i] = norms[i]._replace(v=w, g=_norm(w))
        return GradNormLoRPState(**core.init(params), norm_state=treedef.unflatten(norms))

    def update_fn(
        updates: Any, state: GradNormLoRPState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, GradNormLoRPState]:
        if params is None:
            raise ValueError(
                "gradnorm_lorp_adamw needs the parameters: update(grads, state, params)."
            )
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        t = (state.count + 1).astype(jnp.float32)
        treedef, leaves, plans = core.plan(updates)
        norm_leaves = core.flatten_state(treedef, plans, state.norm_state)
        grad_g, current, direction_grads = {}, {}, []
        for p, grad, wn, w in zip(plans, leaves, norm_leaves, treedef.flatten_up_to(params)):
            if p is None:
                direction_grads.append(grad)
                continue
            current[p.path] = p.dims.to_canonical(w).astype(jnp.float32)
            g_c = p.dims.to_canonical(grad).astype(jnp.float32)
            nu = _norm(wn.v)
            gain = nu if reference_quirks else wn.g
            v_hat = wn.v / nu
            grad_g[p.path] = jnp.sum(v_hat * g_c, axis=-2, keepdims=True)
            gv = gain / nu * (g_c if reference_quirks else g_c - v_hat * grad_g[p.path])
            direction_grads.append(p.dims.from_canonical(gv).astype(grad.dtype))

        def step(leaf: LeafStep, wn: WeightNormLeaf) -> tuple[jax.Array, WeightNormLeaf]:
            g = _norm(wn.v) if reference_quirks else wn.g
            n_v = projection.project_back(leaf.lowrank_update.astype(jnp.float32), leaf.projector)
            dg = grad_g[leaf.plan.path]
            g_mu = b1 * wn.g_mu + (1 - b1) * dg
            g_nu = b2 * wn.g_nu + (1 - b2) * dg * dg
            n_g = jnp.sqrt(1 - b2**t) / (1 - b1**t) * g_mu / (jnp.sqrt(g_nu) + eps)
            v_new = wn.v - lr * scale * n_v
            g_new = g - lr * n_g
            v_new, g_new = v_new * (1 - lr * weight_decay), g_new * (1 - lr * weight_decay)
            # exact: the change of g·v/‖v‖ (zero at lr = 0); quirks: the reference overwrites
            # the weights with g·v/‖v‖ from this step's (v, g), whatever they were
            before = current[leaf.plan.path] if reference_quirks else weight_norm(wn.v, g)
            delta = weight_norm(v_new, g_new) - before
            return delta, WeightNormLeaf(v_new, g_new, g_mu, g_nu)

        out, new_state = core.update(
            treedef.unflatten(direction_grads), state, params, step, aux="norm_state", **extra_args
        )
        out_leaves, param_leaves = treedef.flatten_up_to(out), treedef.flatten_up_to(params)
        final = []
        for p, u, w in zip(plans, out_leaves, param_leaves):
            if p is not None:
                final.append(u)
                continue
            u = -lr * u  # HF AdamW on the other leaves: decay of the updated weights
            final.append((u - lr * weight_decay * (w + u)).astype(w.dtype) if weight_decay else u)
        return treedef.unflatten(final), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
