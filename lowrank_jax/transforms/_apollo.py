"""APOLLO: the raw gradient scaled channel-wise by gains estimated in a random low-rank space."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.projection import Projector
from lowrank_jax.sharding import auto_sharded
from lowrank_jax.targets import Targets
from lowrank_jax.transforms._lowrank import LeafPlan, LeafStep, ProjectedCore
from lowrank_jax.transforms._norm_scaling import (
    SCALE_TYPES,
    compressed_axis,
    gain,
    init_norms,
    limit_norm_growth,
)

__all__ = ["APOLLO_PROJECTIONS", "ApolloState", "apollo", "gaussian_projection"]

APOLLO_PROJECTIONS = ("random", "svd")
# (path, basis shape (..., dim, r), key) -> basis
ProjectionFn = Callable[[str, tuple[int, ...], jax.Array], jax.Array]


class ApolloState(NamedTuple):
    """State of :func:`apollo`.

    Attributes:
      count: updates applied so far (``int32``).
      key: ``uint32[2]`` key data; with ``proj="random"`` the projections are regenerated from
        it every step (one key per matrix, from the period ``⌊t/T⌋``, the leaf's path and the
        matrix's index), never stored.
      projectors: ``None`` for regenerated projections; with ``proj="svd"`` the stored bases
        (:class:`~lowrank_jax.projection.Projector` per targeted leaf).
      lowrank_state: the inner state over the projected gradients (the auxiliary moments).
      fullrank_state: the inner state over the untargeted leaves.
      limiter_norms: post-limit update norm per matrix (``float32[*batch, 1]``;
        ``MaskedNode`` elsewhere; ``None`` with ``limiter=None``).
    """

    count: jax.Array
    key: jax.Array
    projectors: Any
    lowrank_state: Any
    fullrank_state: Any
    limiter_norms: Any


def gaussian_projection(path: str, shape: tuple[int, ...], key: jax.Array) -> jax.Array:
    """APOLLO's random projection: i.i.d. :math:`\\mathcal N(0, 1/r)` entries (not orthonormal)."""
    del path
    return jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[-1])


def apollo(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 1.0,
    scale_type: str = "channel",
    proj: str | ProjectionFn = "random",
    limiter: float | None = 1.01,
    scale_front: bool = False,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    projector_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales the raw gradient by the gain ``inner`` applies in a random rank-``r`` space (APOLLO).

    With :math:`R = P^\top G` (a Gaussian :math:`P` with :math:`\mathcal N(0, 1/r)` entries,
    redrawn every ``T`` steps, compressing the smaller axis like GaLore's ``std``), :math:`N` the
    output of ``inner`` on :math:`R`, and :math:`s_k = \|N_k\| / (\|R_k\| + 10^{-8})` per channel
    :math:`k` of the uncompressed axis (``scale_type="tensor"``: one
    :math:`s = \|N\|_F / (\|R\|_F + 10^{-8})` per matrix, APOLLO-Mini):

    .. math::
        U = \sqrt{c}\; \mathrm{limit}_\gamma(s \odot G)

    where :math:`\mathrm{limit}_\gamma` is Fira's norm-growth limiter on the whole update and
    :math:`c` is ``scale`` (so the paper's :math:`\alpha = \sqrt{c}`; Mini uses ``scale=128``).
    Nothing is projected back: :math:`P` only serves to estimate the gain, so the optimizer
    state is the two low-rank moments plus one norm per matrix. With ``proj="random"`` the
    projection is regenerated from the key in the state each step instead of stored (the
    paper's accounting: ``2·r·max(m, n) + 2`` per matrix; apollo-torch stores it).

    The reference computes :math:`s` from Adam's *uncorrected* :math:`M/(\sqrt V+\epsilon)` and
    applies the bias correction to the whole step: give an uncorrected Adam here and scale
    afterwards, as :func:`lowrank_jax.apollo_adamw` does. Random matrices cannot match torch's
    generator; parity with apollo-torch holds for ``proj="svd"`` or an injected ``proj``.

    Args:
      inner: an optax transformation, e.g. ``scale_by_adam_hf(correct_bias=False)``.
      rank: ``r`` (a Python int); 1 for APOLLO-Mini.
      update_proj_gap: ``T``, steps between new projections.
      scale: ``c``; the update is multiplied by :math:`\sqrt c`.
      scale_type: ``"channel"`` (APOLLO) or ``"tensor"`` (APOLLO-Mini).
      proj: ``"random"`` (regenerated Gaussian), ``"svd"`` (GaLore's stored SVD basis, which
        apollo-torch also offers) or a callable ``(path, shape, key) -> basis`` returning the
        ``(..., dim, r)`` projection of a leaf for the period whose key is given (regenerated,
        never stored; used to inject a given matrix).
      limiter: ``γ`` of the norm-growth limiter (reference: 1.01); ``None`` disables it
        (apollo-torch's ``disable_nl=True``).
      scale_front: multiply by :math:`\sqrt c` before the limiter instead of after
        (apollo-torch's option; equal up to the limiter's ``1e-8``).
      proj_type: the compressed axis, as galore (``"full"`` is rejected: no channel axis).
        apollo-torch takes the channel axis from the gradient's shape, which equals ours for
        ``"std"`` (its default and the only one its scripts use); for ``"left"``/``"right"`` on
        the other orientation it fails with a shape error.
      targets, dims, projector_dtype, seed: as :func:`~lowrank_jax.galore`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an :class:`ApolloState`.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> tx = lr.apollo(lr.scale_by_adam_hf(correct_bias=False), rank=2)
      >>> state = tx.init({"w": jnp.ones((8, 4))})
      >>> state.projectors is None, state.lowrank_state.mu["w"].shape
      (True, (8, 2))

    References:
      Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025, Algorithm 1.
      https://arxiv.org/abs/2412.05270
    """
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"apollo: scale_type must be one of {SCALE_TYPES}, got {scale_type!r}.")
    if proj_type == "full":
        compressed_axis("both", "apollo")
    if not callable(proj) and proj not in APOLLO_PROJECTIONS:
        raise ValueError(
            f"apollo: proj must be one of {APOLLO_PROJECTIONS} or a callable "
            f"(path, shape, key) -> basis, got {proj!r}. (proj chooses the matrix; "
            "proj_type chooses the compressed axis.)"
        )
    if isinstance(limiter, (int, float)) and not limiter >= 1.0:
        raise ValueError(f"apollo: limiter (γ) must be >= 1 or None, got {limiter!r}.")

    def regenerate(plan: LeafPlan, key_of: Callable[[Any], jax.Array]) -> Projector:
        *batch, n_in, n_out = plan.shape
        dim = n_in if plan.side == "in" else n_out
        if proj == "random":  # one key per matrix: a layer slice draws what the stack draws
            n = math.prod(batch)
            draw = lambda m: gaussian_projection(plan.path, (dim, plan.rank), key_of(m))
            basis = jax.vmap(draw)(jnp.arange(n)).reshape(*batch, dim, plan.rank)
        else:
            basis = jnp.asarray(proj(plan.path, (*batch, dim, plan.rank), key_of(0)))
        if basis.shape != (*batch, dim, plan.rank):
            raise ValueError(
                f"apollo: proj returned shape {basis.shape} for leaf '{plan.path}'; expected "
                f"{(*batch, dim, plan.rank)} (batch axes, the compressed dimension, rank)."
            )
        dtype = projector_dtype or jnp.float32
        basis = basis.astype(dtype)
        return Projector(basis, None) if plan.side == "in" else Projector(None, basis)

    core = ProjectedCore(
        inner,
        method="apollo",
        rank=rank,
        update_proj_gap=update_proj_gap,
        proj_type=proj_type,
        basis="svd",
        targets=targets,
        dims=dims,
        on_refresh="keep",
        projector_dtype=projector_dtype,
        seed=seed,
        basis_fn=None if proj == "svd" else regenerate,
        elementwise_update=True,
    )

    def init_fn(params: Any) -> ApolloState:
        norms = None if limiter is None else core.init_leaves(params, lambda p: init_norms(p.shape))
        return ApolloState(**core.init(params), limiter_norms=norms)

    def update_fn(
        updates: Any, state: ApolloState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, ApolloState]:
        first = state.count == 0
        root = jnp.sqrt(jnp.asarray(scale, jnp.float32))

        def full_update(leaf: LeafStep, norm: Any) -> tuple[jax.Array, Any]:
            g = leaf.grad
            axis = None if scale_type == "tensor" else compressed_axis(leaf.plan.side, "apollo")
            u = g * gain(leaf.lowrank_update, leaf.lowrank_grad, axis).astype(g.dtype)
            if scale_front:
                u = u * root.astype(g.dtype)
            if limiter is not None:
                u, norm = limit_norm_growth(u, norm, first, limiter)
            if not scale_front:
                u = u * root.astype(g.dtype)
            return u, norm

        aux = None if limiter is None else "limiter_norms"
        return core.update(updates, state, params, full_update, aux=aux, **extra_args)

    return auto_sharded(optax.GradientTransformationExtraArgs(init_fn, update_fn))
