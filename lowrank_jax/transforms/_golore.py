"""GoLore: GaLore whose projectors switch from SVD to random bases late in training."""

from __future__ import annotations

from typing import Any

import jax
import optax

from lowrank_jax import projection
from lowrank_jax.projection import Projector
from lowrank_jax.targets import Targets
from lowrank_jax.transforms._galore import GaLoreState, scaled_back_projection
from lowrank_jax.transforms._lowrank import (
    _SECOND_MOMENT_FIELDS,
    LeafPlan,
    ProjectedCore,
)

__all__ = ["golore"]


def _restore_fields(new: Any, old: Any, names: frozenset) -> Any:
    """``new`` with every NamedTuple field named in ``names`` taken from ``old``."""
    if isinstance(new, tuple) and hasattr(new, "_fields"):
        fields = [
            getattr(old, f)
            if f in names
            else _restore_fields(getattr(new, f), getattr(old, f), names)
            for f in new._fields
        ]
        return type(new)(*fields)
    if isinstance(new, (tuple, list)):
        return type(new)(_restore_fields(a, b, names) for a, b in zip(new, old))
    if isinstance(new, dict):
        return {k: _restore_fields(v, old[k], names) for k, v in new.items()}
    return new


class _SwitchingCore(ProjectedCore):
    """The projected core with a traced choice of basis at each refresh: SVD before step
    ``random_after``, a seeded random orthonormal basis from then on; and (optionally) a
    reprojection that rotates only the first moments."""

    def __init__(self, *args: Any, random_after: Any, keep_second_moments: bool, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.random_after = random_after
        self.keep_second_moments = keep_second_moments
        self._random_phase: jax.Array | None = None

    def update(self, updates: Any, state: Any, params: Any, leaf_fn: Any, **kwargs: Any):
        # read by _new_projector while this update is traced (inside the refresh's cond/map)
        self._random_phase = state.count >= self.random_after
        try:
            return super().update(updates, state, params, leaf_fn, **kwargs)
        finally:
            self._random_phase = None

    def _new_projector(self, plan: LeafPlan, g: jax.Array, old: Projector, key: Any) -> Projector:
        def random() -> Projector:
            return projection.compute_projector(
                g, plan.side, plan.rank, "random", key, self._dtype(g)
            )

        def svd() -> Projector:
            return ProjectedCore._new_projector(self, plan, g, old, key)

        return jax.lax.cond(self._random_phase, random, svd)

    def _reproject(self, state: Any, *args: Any) -> Any:
        rotated = super()._reproject(state, *args)
        if not self.keep_second_moments:
            return rotated
        return _restore_fields(rotated, state, _SECOND_MOMENT_FIELDS)


def golore(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    random_after: int | jax.Array,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 0.25,
    rotate_first_moment: bool = True,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    projector_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore whose refreshes draw random orthonormal bases from step ``random_after`` on (GoLore).

    The update is GaLore's, :math:`\Delta W_t = \alpha P_t\,\mathrm{inner}(P_t^\top G_t)`; only
    the basis computed at a refresh (:math:`t \equiv 0 \bmod T`) changes with the phase:

    .. math::
        P_t = \begin{cases} \text{top-}r \text{ left singular vectors of } G_t &
        t < \tau \\ Q(Z_t),\ Z_t \sim \mathcal N(0, 1)^{d \times r} & t \ge \tau\end{cases}

    with :math:`Q` the orthonormal factor (Haar on the Stiefel manifold, as GoLore's
    :math:`Z(Z^\top Z)^{-1/2}`) and :math:`\tau` = ``random_after`` (GoLore's
    ``rand_ratio · num_training_steps``; the switch takes effect at the first refresh at or after
    :math:`\tau`). Late in training the gradient is dominated by noise and its SVD subspace
    stops tracking the true gradient; a random subspace is unbiased in expectation.

    At every refresh after the first, ``rotate_first_moment=True`` carries the first moment into
    the new basis, :math:`M \leftarrow P_\text{new}^\top P_\text{old} M`, and keeps the second
    moment as is -- what GoLore's code intends (its ``adamw.py`` binds the rotated moment to a
    local variable and so keeps the old-basis one; ``False`` reproduces that).

    Works layer-wise (the state is GaLore's, per matrix; random bases come from per-matrix keys).

    Args:
      inner: the optax transformation run in the low-rank space (e.g. ``scale_by_adam_hf()``).
      rank: ``r`` (a Python int).
      random_after: ``τ``, the first step whose refresh draws a random basis (may be traced).
      update_proj_gap: ``T``, steps between refreshes.
      scale: ``α``.
      rotate_first_moment: rotate the first moment into each new basis (see above).
      proj_type, targets, dims, projector_dtype, seed: as :func:`~lowrank_jax.galore`
        (``seed`` seeds the random bases).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`~lowrank_jax.GaLoreState`.

    Example:
      >>> import jax.numpy as jnp, optax, lowrank_jax as lr
      >>> tx = lr.golore(optax.scale_by_adam(), rank=2, random_after=100)
      >>> tx.init({"w": jnp.ones((8, 4))}).lowrank_state.mu["w"].shape
      (8, 2)

    References:
      He et al., "Subspace Optimization for Large Language Models with Convergence Guarantees"
      (GoLore), ICML 2025, Algorithm 2. https://arxiv.org/abs/2410.11289
    """
    if isinstance(random_after, bool) or (
        isinstance(random_after, (int, float))
        and (not float(random_after).is_integer() or random_after < 0)
    ):
        raise ValueError(f"golore: random_after must be a non-negative step, got {random_after!r}.")
    core = _SwitchingCore(
        inner,
        method="golore",
        rank=rank,
        update_proj_gap=update_proj_gap,
        proj_type=proj_type,
        basis="svd",
        targets=targets,
        dims=dims,
        on_refresh="reproject" if rotate_first_moment else "keep",
        projector_dtype=projector_dtype,
        seed=seed,
        random_after=random_after,
        keep_second_moments=True,
    )

    return scaled_back_projection(core, GaLoreState, scale)
