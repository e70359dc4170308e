"""Fira: GaLore's low-rank update plus the norm-scaled full-rank residual."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from lowrank_jax import projection
from lowrank_jax.sharding import auto_sharded
from lowrank_jax.targets import Targets
from lowrank_jax.transforms._adaptive import AdaptiveRefresh
from lowrank_jax.transforms._lowrank import LeafStep, ProjectedCore
from lowrank_jax.transforms._norm_scaling import (
    SCALE_TYPES,
    compressed_axis,
    gain,
    init_norms,
    limit_norm_growth,
)

__all__ = ["FIRA_VARIANTS", "FiraState", "fira"]

FIRA_VARIANTS = ("code", "paper")


class FiraState(NamedTuple):
    """State of :func:`fira`: GaLore's state plus one limiter norm per matrix.

    Attributes:
      count, key, projectors, lowrank_state, fullrank_state, refresh_state: as
        :class:`~lowrank_jax.GaLoreState`.
      limiter_norms: per targeted leaf, the post-limit Frobenius norm of the previous residual
        update of each matrix, ``float32[*batch, 1]`` (``MaskedNode`` elsewhere; ``None`` when
        the limiter is off).
    """

    count: jax.Array
    key: jax.Array
    projectors: Any
    lowrank_state: Any
    fullrank_state: Any
    limiter_norms: Any
    refresh_state: Any = None


def fira(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 1.0,
    limiter: float | None = 1.01,
    variant: str = "code",
    scale_type: str = "channel",
    proj_type: str = "std",
    basis: str = "svd",
    targets: Targets = None,
    dims: Any = None,
    on_refresh: str = "keep",
    projector_dtype: Any = None,
    seed: int = 0,
    adaptive_refresh: AdaptiveRefresh | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore plus the residual ``G − PPᵀG`` rescaled per channel by ``‖N_k‖/‖R_k‖`` (Fira).

    With :math:`R = P^\top G` (projected as :func:`~lowrank_jax.galore`), :math:`N` the output
    of ``inner`` on :math:`R` and :math:`\phi_k = \|N_k\| / (\|R_k\| + 10^{-8})` for each channel
    :math:`k` of the uncompressed axis (Fira Eq. 11; one scalar per matrix with
    ``scale_type="tensor"``, Eq. 10):

    .. math::
        \text{code:}\quad S = \phi \odot (G - \alpha P R),\qquad \Delta = \alpha P N + S

        \text{paper:}\quad S = \phi \odot (G - P R),\qquad \Delta = \alpha (P N + S)

    and the norm-growth limiter (Eq. 12) replaces :math:`S_t` by :math:`S_t / \lambda` with
    :math:`\lambda = \max(\|S_t\| / (\|S_{t-1}\| + 10^{-8}), \gamma) / \gamma`, where
    :math:`\|S_{t-1}\|` is the previous *limited* norm (no limiting on the first step).

    ``variant="code"`` (default) is what the ``fira`` package (``FiraAdamW``) computes and what
    produced the published numbers: its ``project_back`` multiplies by ``α``, so the residual
    keeps :math:`(1-\alpha) P R` of the in-subspace gradient and ``α`` does not scale ``S``.
    ``variant="paper"`` is Algorithm 1 of the paper: the exact residual :math:`(I - PP^\top)G`,
    and ``α`` scales both terms (the two formulas coincide when ``α = 1``).

    ``inner`` sees only low-rank shapes (and the untargeted leaves at full shape, unscaled and
    unlimited). The reference computes :math:`\phi` from Adam's *uncorrected*
    :math:`M/(\sqrt V + \epsilon)` and applies the bias correction to the whole step; to
    reproduce it, give an uncorrected Adam here and scale afterwards, as
    :func:`lowrank_jax.fira_adamw` does.

    Args:
      inner: an optax transformation, e.g. ``scale_by_adam_hf(correct_bias=False)``.
      rank: projection rank ``r`` (a Python int).
      update_proj_gap: ``T``, steps between projector refreshes (SVD of the gradient).
      scale: ``α`` (the package's ``alpha``; its scripts use 0.25 below 1B, 0.0625 at 1B/7B).
      limiter: ``γ`` of the norm-growth limiter (the reference hard-codes 1.01); ``None`` turns
        it off (the paper's "w/o limiter" ablation).
      variant: ``"code"`` or ``"paper"`` (see above).
      scale_type: ``"channel"`` (Eq. 11, default) or ``"tensor"`` (one ``φ`` per matrix).
      proj_type, basis, targets, dims, on_refresh, projector_dtype, seed, adaptive_refresh:
        as :func:`~lowrank_jax.galore`. ``proj_type="full"`` is rejected: it leaves no channel
        axis (the reference fails on it too).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`FiraState`.

    Example:
      >>> import jax.numpy as jnp, optax, lowrank_jax as lr
      >>> tx = lr.fira(lr.scale_by_adam_hf(correct_bias=False), rank=2)
      >>> params = {"w": jnp.ones((8, 4))}
      >>> updates, state = tx.update({"w": jnp.ones((8, 4))}, tx.init(params))
      >>> state.limiter_norms["w"].shape, updates["w"].shape
      ((1,), (8, 4))

    References:
      Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
      Constraint?", NeurIPS 2025, Algorithm 1. https://arxiv.org/abs/2410.01623
    """
    if variant not in FIRA_VARIANTS:
        raise ValueError(f"fira: variant must be one of {FIRA_VARIANTS}, got {variant!r}.")
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"fira: scale_type must be one of {SCALE_TYPES}, got {scale_type!r}.")
    if proj_type == "full":
        compressed_axis("both", "fira")
    if isinstance(limiter, (int, float)) and not limiter >= 1.0:
        raise ValueError(f"fira: limiter (γ) must be >= 1 or None, got {limiter!r}.")
    core = ProjectedCore(
        inner,
        method="fira",
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

    def init_fn(params: Any) -> FiraState:
        norms = None if limiter is None else core.init_leaves(params, lambda p: init_norms(p.shape))
        return FiraState(**core.init(params), limiter_norms=norms)

    def update_fn(
        updates: Any, state: FiraState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, FiraState]:
        first = state.count == 0

        def full_update(leaf: LeafStep, norm: Any) -> tuple[jax.Array, Any]:
            g, r, n, q = leaf.grad, leaf.lowrank_grad, leaf.lowrank_update, leaf.projector
            axis = None if scale_type == "tensor" else compressed_axis(leaf.plan.side, "fira")
            phi = gain(n, r, axis).astype(g.dtype)
            in_subspace = projection.project_back(r, q)
            if variant == "code":
                in_subspace = in_subspace * scale
            residual = (g - in_subspace) * phi
            if limiter is not None:
                residual, norm = limit_norm_growth(residual, norm, first, limiter)
            back = projection.project_back(n, q)
            if variant == "code":
                return back * scale + residual, norm
            return (back + residual) * scale, norm

        aux = None if limiter is None else "limiter_norms"
        return core.update(updates, state, params, full_update, aux=aux, **extra_args)

    return auto_sharded(optax.GradientTransformationExtraArgs(init_fn, update_fn))
