"""GaLore: gradient low-rank projection around any optax transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from lowrank_jax import projection
from lowrank_jax.sharding import auto_sharded
from lowrank_jax.targets import Targets
from lowrank_jax.transforms._adaptive import AdaptiveRefresh
from lowrank_jax.transforms._lowrank import LeafStep, ProjectedCore

__all__ = ["GaLoreState", "galore"]


class GaLoreState(NamedTuple):
    """State of :func:`galore`.

    Attributes:
      count: number of updates applied so far (``int32``); refreshes happen when
        ``count % update_proj_gap == 0``.
      key: ``uint32[2]`` key data for the randomized and random bases.
      projectors: a :class:`~lowrank_jax.projection.Projector` per targeted leaf
        (``optax.MaskedNode()`` elsewhere). Bases are ``(..., dim, r)``.
      lowrank_state: the inner transformation's state over the projected gradients.
      fullrank_state: the inner transformation's state over the untargeted leaves.
      refresh_state: with ``adaptive_refresh``, a per-leaf
        :class:`~lowrank_jax.transforms.RefreshState` (per-matrix gaps and SVD counts);
        ``None`` otherwise.
    """

    count: jax.Array
    key: jax.Array
    projectors: Any
    lowrank_state: Any
    fullrank_state: Any
    refresh_state: Any = None


def galore(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 0.25,
    proj_type: str = "std",
    basis: str = "svd",
    targets: Targets = None,
    dims: Any = None,
    on_refresh: str = "keep",
    projector_dtype: Any = None,
    seed: int = 0,
    adaptive_refresh: AdaptiveRefresh | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``inner`` on low-rank projections of the targeted gradients (GaLore).

    For a targeted matrix with gradient :math:`G` and projector :math:`P` (refreshed from the
    current gradient at steps :math:`0, T, 2T, \dots`):

    .. math::
        R_t = P^\top G_t, \qquad N_t = \mathrm{inner}(R_t), \qquad
        \Delta W_t = \alpha\, P N_t

    (for the *out* side, :math:`R = G P` and :math:`\Delta W = \alpha N P^\top`). ``inner`` only
    ever sees low-rank shapes, so its state (Adam's moments, ...) is low-rank. Untargeted leaves
    go through ``inner`` at full shape, unscaled -- exactly as galore-torch's non-GaLore param
    groups. ``inner`` is called with ``params=None`` for the projected leaves, so put weight decay
    outside (see :func:`lowrank_jax.galore_adamw`).

    Args:
      inner: any optax transformation, e.g. ``optax.scale_by_adam()``.
      rank: projection rank ``r``; clipped to ``min(in, out)`` per matrix with a warning.
        Must be a Python int (under ``optax.inject_hyperparams`` use ``static_args``).
      update_proj_gap: ``T``, steps between projector refreshes.
      scale: ``α``, multiplies the projected-back update of targeted leaves only.
      proj_type: which axis is compressed, as galore-torch: ``"std"`` (the smaller one; the in
        axis of a square matrix), ``"reverse_std"``, ``"right"`` (in), ``"left"`` (out) or
        ``"full"`` (both). Defined on the in/out axes, so a Flax ``(in, out)`` kernel gives the
        same result as galore-torch on the ``(out, in)`` weight.
      basis: ``"svd"`` (exact, float32), ``"randomized"`` (range finder; matmuls only, shards
        well, much cheaper) or ``"random"`` (seeded orthonormal Gaussian, no decomposition).
      targets: which leaves are projected; default every float ``ndim >= 2`` leaf that is not an
        embedding, head, norm or bias (:mod:`lowrank_jax.targets`).
      dims: :class:`~lowrank_jax.MatrixDims` per leaf; other axes are batch axes (one projector
        per matrix of a scan-stacked ``[L, in, out]`` kernel).
      on_refresh: what happens to the inner state at a refresh: ``"keep"`` (galore-torch),
        ``"reset"`` (re-initialise it) or ``"reproject"`` (rotate the moments into the new
        basis; GaLore issue #54).
      projector_dtype: dtype of the stored bases; ``None`` keeps the gradient dtype, as
        galore-torch does. Decompositions always run in float32.
      seed: seed of the key for ``basis="randomized" | "random"``.
      adaptive_refresh: Q-GaLore's lazy refresh, e.g. ``AdaptiveRefresh(threshold=0.4)``: each
        matrix has its own gap (starting at ``update_proj_gap``) that doubles once the mean
        cosine similarity of its first basis vector over the last ``queue_size`` refreshes
        reaches ``threshold``; matrices that are not due compute no SVD.
        :func:`~lowrank_jax.transforms.svd_count` reads how many were computed. ``None``
        (default) refreshes every matrix every ``update_proj_gap`` steps.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`GaLoreState`.

    Example:
      >>> import jax.numpy as jnp, optax, lowrank_jax as lr
      >>> params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
      >>> tx = lr.galore(optax.scale_by_adam(), rank=2, update_proj_gap=10)
      >>> state = tx.init(params)
      >>> state.lowrank_state.mu["w"].shape  # (in=8, out=4): std compresses out
      (8, 2)

    References:
      Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
      ICML 2024 (Algorithm 2). https://arxiv.org/abs/2403.03507
    """
    core = ProjectedCore(
        inner,
        method="galore",
        rank=rank,
        update_proj_gap=update_proj_gap,
        proj_type=proj_type,
        basis=basis,
        targets=targets,
        dims=dims,
        on_refresh=on_refresh,
        projector_dtype=projector_dtype,
        seed=seed,
        adaptive_refresh=adaptive_refresh,
    )

    return scaled_back_projection(core, GaLoreState, scale)


def scaled_back_projection(
    core: ProjectedCore, state_type: type, scale: float | jax.Array
) -> optax.GradientTransformationExtraArgs:
    """The transformation of ``core`` that maps each low-rank update back as
    ``scale · project_back(N, P)`` (GaLore's rule, shared by GoLore and Q-GaLore); its state is
    ``state_type(**core.init(params))``."""

    def init_fn(params: Any) -> Any:
        return state_type(**core.init(params))

    def back(leaf: LeafStep, aux: None) -> tuple[jax.Array, None]:
        return projection.project_back(leaf.lowrank_update, leaf.projector) * scale, aux

    def update_fn(
        updates: Any, state: Any, params: Any = None, **extra_args: Any
    ) -> tuple[Any, Any]:
        return core.update(updates, state, params, back, **extra_args)

    return auto_sharded(optax.GradientTransformationExtraArgs(init_fn, update_fn))
