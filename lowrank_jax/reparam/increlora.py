r"""IncreLoRA: SVD-form adapters whose rank *grows* where the importance is highest.

.. math::
    W' = W + \frac{\alpha}{\mathrm{ranknum} + 10^{-5}}\,A\,\mathrm{diag}(E_{\text{eff}})\,B,
    \qquad \mathrm{ranknum} = \#\text{active components}

the AdaLoRA triplet form (``A: (in, R)``, ``E: (R,)``, ``B: (R, out)``) over ``R`` preallocated
slots (``rank``): the first ``active`` are trained, the next ``reserve`` (the reference's
``incre_rank_num``, "advance learning") have ``A, B`` trained with ``E`` pinned at ``10⁻⁵``, the
rest are off (``E_eff = 0``). ``active`` is an int array in the ``frozen`` tree, one per stacked
matrix, so growth never changes a shape or retraces. Init as the reference: ``E = 0``,
``A, B ~ N(0, 0.02²)``; ``α = 16``; the first ``init_rank`` (``lora_r``, 1 in the README) active.
Growing raises ``ranknum``, so every existing component's scale ``α/ranknum`` drops at a growth
step (the output jumps, as in the reference).

:class:`IncreLoRASchedule` is the train-loop hook. The importance of a matrix is
``Σ|ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW)`` (the reference's backward hook on ``ΔW``; the gradient is that
of the effective weight, which :func:`increlora_value_and_grad` returns together with the
parameter gradients), smoothed as AdaLoRA (``Ī``, ``Ū``, ``β₁ = β₂ = 0.85``, score ``Ī·Ū``).
While the total rank is below the target (``target_rank`` per matrix on average), every
``incre_interval`` steps after ``init_warmup`` the ``k = min(top_h, target - total)`` highest
scores (ties included; matrices without room excluded) gain ``reserve`` components: their reserve
slots become active starting from ``E = 10⁻⁵`` and the next slots become the reserve. When the
target is reached the reserve ``E`` drops to 0. Deviations, all documented: the reference draws
fresh ``A, B`` for each new reserve, here the slots keep their init values (only decoupled weight
decay moves an unused slot); it zeros the reserve only when the total *equals* the target, here
at or above; its orthogonality term (:meth:`IncreLoRASchedule.regularizer`, weight 0.1) acts on
each appended piece separately (a norm per rank-1 piece), here on the active block as AdaLoRA.

Reference: Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning", 2023 (arXiv id 2308.12043 UNVERIFIED; code
FeiyuZhang98/IncreLoRA ``loralib/increlora.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.reparam import _validate as check
from lowrank_jax.reparam.adalora import orthogonality_penalty
from lowrank_jax.reparam.core import Adapters, apply
from lowrank_jax.reparam.method import Method, f32, normal, register
from lowrank_jax.reparam.wrapper import Reparam
from lowrank_jax.targets import path_str

__all__ = [
    "IncreLoRA",
    "IncreLoRASchedule",
    "IncreState",
    "increlora",
    "increlora_num_trainable",
    "increlora_ranks",
    "increlora_value_and_grad",
]

RESERVE_E = 1e-5


@register
@dataclasses.dataclass(frozen=True)
class IncreLoRA(Method):
    """AdaLoRA-form adapter over ``rank`` slots of which ``frozen["active"]`` are in use."""

    rank: int = 8
    init_rank: int = 1
    alpha: float = 16.0
    reserve: int = 1
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("rank", "init_rank", "reserve"):
            check.positive_int("IncreLoRA", name, getattr(self, name))
        check.rate("IncreLoRA", "dropout", self.dropout)
        if self.init_rank > self.rank:
            raise ValueError(
                f"IncreLoRA: init_rank={self.init_rank} exceeds rank={self.rank} (the slots); "
                f"use rank >= init_rank + the growth you allow."
            )

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        check.fits("IncreLoRA", path, "rank", self.rank, min(shape[-2:]), shape)

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        *batch, n_in, n_out = w.shape
        key_a, key_b = jax.random.split(key)
        trainable = {
            "A": 0.02 * normal(key_a, (*batch, n_in, self.rank)),
            "E": jnp.zeros((*batch, self.rank), jnp.float32),
            "B": 0.02 * normal(key_b, (*batch, self.rank, n_out)),
        }
        frozen = {
            "active": jnp.full(tuple(batch), self.init_rank, jnp.int32),
            "reserve": jnp.asarray(self.reserve, jnp.int32),
        }
        return frozen, trainable

    def gates(self, frozen: dict, trainable: dict) -> tuple[jax.Array, jax.Array]:
        """``(E_eff (..., R), scale (...,))``: trained, pinned reserve or off, and α/ranknum."""
        active = frozen["active"][..., None]
        index = jnp.arange(self.rank)
        pinned = jnp.where(index < active + frozen["reserve"], RESERVE_E, 0.0)
        e = jnp.where(index < active, f32(trainable["E"]), pinned)
        alpha = self.alpha if self.alpha > 0 else float(self.rank)
        return e, alpha / (f32(frozen["active"]) + 1e-5)

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        e, scale = self.gates(frozen, trainable)
        scaled = f32(trainable["A"]) * e[..., None, :]
        return scale[..., None, None] * (scaled @ f32(trainable["B"]))

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        e, scale = self.gates(frozen, trainable)
        t = c.into(x_drop, trainable["A"].astype(x.dtype)) * e.astype(x.dtype)
        low = c.then(t, trainable["B"].astype(x.dtype))
        return c.into(x, w) + scale.astype(x.dtype)[..., None] * low


def increlora(
    rank: int = 8,
    init_rank: int = 1,
    alpha: float = 16.0,
    *,
    reserve: int = 1,
    dropout: float = 0.0,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """IncreLoRA adapters (pair with :class:`IncreLoRASchedule` in the train loop).

    Args:
      rank: ``R``, the preallocated slots: the largest rank a matrix can grow to.
      init_rank: the initial rank of every matrix (the reference's ``lora_r``).
      alpha: ``α``; the scale is ``α/(ranknum + 1e-5)``.
      reserve: components added per growth (the reference maps the average target rank
        ``{2: 1, 4: 2, 6: 3, 8: 4}``), trained in advance as the reserve.
      dropout, targets, dims, dtype: as :func:`~lowrank_jax.reparam.adalora`.

    Returns:
      A :class:`~lowrank_jax.reparam.Reparam`; ``R(in + out + 1)`` stored per matrix, of which
      ``r(in + out + 1) + reserve·(in + out)`` train at rank ``r``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((16, 8))}
      >>> _, adapters = reparam.increlora(rank=4, init_rank=1).init(jax.random.key(0), params)
      >>> reparam.increlora_ranks(adapters)
      {'w': 1}

    Reference: Zhang et al., 2023, FeiyuZhang98/IncreLoRA.
    """
    method = IncreLoRA(
        rank=rank, init_rank=init_rank, alpha=float(alpha), reserve=reserve, dropout=dropout
    )
    return Reparam(method, targets, dims, (), dtype)


def _sites(adapters: Adapters) -> list:
    sites = [s for s in adapters.sites if isinstance(s.method, IncreLoRA)]
    if not sites:
        raise ValueError("no IncreLoRA site in these adapters; use reparam.increlora(...).")
    return sites


def increlora_ranks(adapters: Adapters) -> dict[str, Any]:
    """``{path: active rank}`` (an int, or an array per stacked matrix)."""
    out = {}
    for site in _sites(adapters):
        active = np.asarray(adapters.frozen[site.path]["active"])
        out[site.path] = int(active) if active.ndim == 0 else active
    return out


def increlora_num_trainable(adapters: Adapters) -> int:
    """The scalars that train now: ``r(in + out + 1) + reserve·(in + out)`` per matrix at rank
    ``r`` (the reference's parameter groups; ``num_trainable`` counts all ``R`` slots)."""
    total = 0
    for site in _sites(adapters):
        n_in, n_out = site.canonical_shape[-2:]
        active = np.asarray(adapters.frozen[site.path]["active"])
        room = site.method.rank - active
        reserve = np.minimum(int(adapters.frozen[site.path]["reserve"]), room)
        total += int(np.sum(active * (n_in + n_out + 1) + reserve * (n_in + n_out)))
    return total


def increlora_value_and_grad(
    loss_fn: Callable[[Any], jax.Array], params: Any, adapters: Adapters
) -> tuple[jax.Array, dict, dict]:
    """``(loss, grads of adapters.trainable, {path: importance score per matrix})``.

    ``loss_fn`` takes the effective parameters (``reparam.apply(params, adapters)``). The score
    is the reference's ``Σ|ΔW ⊙ ∂L/∂ΔW| / √numel`` at these adapters (before the step).
    """
    effective, pullback = jax.vjp(
        lambda t: apply(params, adapters.replace(trainable=t)), adapters.trainable
    )
    loss, weight_grads = jax.value_and_grad(loss_fn)(effective)
    (grads,) = pullback(weight_grads)
    flat = {path_str(kp): g for kp, g in jax.tree_util.tree_flatten_with_path(weight_grads)[0]}
    scores = {}
    for site in _sites(adapters):
        g = f32(site.canonical(flat[site.path]))
        d = site.method.delta(g, adapters.frozen[site.path], adapters.trainable[site.path])
        numel = g.shape[-1] * g.shape[-2]
        scores[site.path] = jnp.sum(jnp.abs(d * g), axis=(-2, -1)) / np.sqrt(numel)
    return loss, grads, scores


class IncreState(NamedTuple):
    """EMAs of each matrix's importance (sensitivity and uncertainty)."""

    sensitivity: dict
    uncertainty: dict


@dataclasses.dataclass(frozen=True)
class IncreLoRASchedule:
    """IncreLoRA's rank growth (the reference's ``RankAllocator.update_and_increase``).

    Attributes:
      target_rank: the average final rank per matrix (``target_total_rank`` overrides the total).
      init_warmup, incre_interval: no growth before ``init_warmup``; then every interval.
      top_h: matrices selected per growth step.
      beta1, beta2: EMA factors (0.85).
      orth_reg_weight: ``w`` of :meth:`regularizer` (the reference's 0.1).
      target_total_rank: the final total rank (default ``target_rank × #matrices``).

    Example::

        schedule = reparam.IncreLoRASchedule(target_rank=2, init_warmup=100, incre_interval=50)
        state = schedule.init(adapters)
        loss, grads, scores = reparam.increlora_value_and_grad(loss_fn, params, adapters)
        # optimizer step on adapters.trainable, then
        adapters, state = schedule.update(step, adapters, scores, state)
    """

    target_rank: int = 2
    init_warmup: int = 1000
    incre_interval: int = 1000
    top_h: int = 2
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    target_total_rank: int | None = None

    def __post_init__(self):
        for name in ("target_rank", "incre_interval", "top_h"):
            check.positive_int("IncreLoRASchedule", name, getattr(self, name))
        check.nonnegative("IncreLoRASchedule", "init_warmup", self.init_warmup)
        check.nonnegative("IncreLoRASchedule", "orth_reg_weight", self.orth_reg_weight)
        if self.target_total_rank is not None:
            check.positive_int("IncreLoRASchedule", "target_total_rank", self.target_total_rank)
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"IncreLoRASchedule: {name} must be in (0, 1).")

    def target(self, adapters: Adapters) -> int:
        """The final total rank."""
        if self.target_total_rank is not None:
            return self.target_total_rank
        count = sum(int(np.prod(adapters.frozen[s.path]["active"].shape)) for s in _sites(adapters))
        return self.target_rank * count

    def init(self, adapters: Adapters) -> IncreState:
        shapes = {s.path: adapters.frozen[s.path]["active"].shape for s in _sites(adapters)}
        # separate arrays: a state holding one array twice cannot be donated to a jitted step
        zeros = lambda: {path: jnp.zeros(shape) for path, shape in shapes.items()}
        return IncreState(zeros(), zeros())

    def regularizer(self, adapters: Adapters) -> jax.Array:
        """``w·`` the orthogonality penalty of the active components (add it to the loss)."""
        masks = {}
        for site in _sites(adapters):
            active = adapters.frozen[site.path]["active"][..., None]
            masks[site.path] = jnp.arange(site.method.rank) < active
        only = adapters.replace(
            trainable={p: adapters.trainable[p] for p in masks},
            sites=tuple(s for s in adapters.sites if s.path in masks),
        )
        return self.orth_reg_weight * orthogonality_penalty(only, masks)

    def update(
        self, step: Any, adapters: Adapters, scores: dict, state: IncreState
    ) -> tuple[Adapters, IncreState]:
        """One growth-schedule step; jittable in ``step``.

        Args:
          step: the global step.
          adapters: the adapters after the optimizer step.
          scores: the importance scores from :func:`increlora_value_and_grad` this step.
          state: the :class:`IncreState`.

        Returns:
          ``(adapters, state)``, grown where due.
        """
        sites = _sites(adapters)
        target = self.target(adapters)
        actives = {s.path: adapters.frozen[s.path]["active"] for s in sites}
        total = sum(jnp.sum(a) for a in actives.values())
        growing = total < target

        sens, unc = {}, {}
        for s in sites:
            p = s.path
            avg = self.beta1 * state.sensitivity[p] + (1 - self.beta1) * scores[p]
            new_unc = self.beta2 * state.uncertainty[p] + (1 - self.beta2) * jnp.abs(
                scores[p] - avg
            )
            sens[p] = jnp.where(growing, avg, state.sensitivity[p])
            unc[p] = jnp.where(growing, new_unc, state.uncertainty[p])

        due = growing & (step > self.init_warmup) & (step % self.incre_interval == 0)
        room = {s.path: actives[s.path] + s.method.reserve <= s.method.rank for s in sites}
        importance = {p: jnp.where(room[p], sens[p] * unc[p], -jnp.inf) for p in sens}
        flat = jnp.sort(jnp.concatenate([v.ravel() for v in importance.values()]))[::-1]
        k = jnp.clip(jnp.minimum(self.top_h, target - total), 1, flat.size)
        threshold = flat[k - 1]

        trainable, frozen = dict(adapters.trainable), dict(adapters.frozen)
        for s in sites:
            p = s.path
            chosen = due & room[p] & (importance[p] >= threshold)
            active = actives[p]
            index = jnp.arange(s.method.rank)
            new = (index >= active[..., None]) & (index < active[..., None] + s.method.reserve)
            e = jnp.where(chosen[..., None] & new, RESERVE_E, trainable[p]["E"])
            trainable[p] = {**trainable[p], "E": e}
            frozen[p] = {**frozen[p], "active": active + s.method.reserve * chosen}
        grown = sum(jnp.sum(frozen[s.path]["active"]) for s in sites)
        for s in sites:
            reserve = jnp.where(grown >= target, 0, s.method.reserve).astype(jnp.int32)
            frozen[s.path] = {**frozen[s.path], "reserve": reserve}
        return adapters.replace(trainable=trainable, frozen=frozen), IncreState(sens, unc)
