r"""AdaLoRA: SVD-form adapters whose triplets are pruned to a global rank budget.

.. math::
    W' = W + s\,A\,\mathrm{diag}(E)\,B, \qquad A \in \mathbb{R}^{in\times r},\
    E \in \mathbb{R}^{r},\ B \in \mathbb{R}^{r\times out}, \qquad
    s = \frac{\alpha}{\mathrm{ranknum} + 10^{-5}}

``A`` is PEFT's ``lora_A`` transposed (the right singular vectors ``Q``), ``E`` its ``lora_E``
(the singular values ``Λ``), ``B`` its ``lora_B`` transposed (the left singular vectors ``P``):
torch ``ΔW = P(Q ⊙ Λ)·s``. As PEFT: ``E = 0`` and ``A, B ~ N(0, 0.02²)`` at init (a no-op),
``ranknum = init_r`` and it is **not** updated by pruning (``s`` is fixed), ``α ≤ 0`` means
``s = r/(ranknum + 1e-5)``. The orthogonality regulariser added to the loss is

.. math:: R = w\cdot\mathrm{mean}_{A, B}\big(\lVert A^\top A - I_r\rVert_F,\
   \lVert B B^\top - I_r\rVert_F\big)

(PEFT's unsquared Frobenius norm, averaged over every ``A`` and ``B`` matrix; the paper's squared
form is UNVERIFIED). :class:`AdaLoRASchedule` is the rank allocator, a train-loop hook like
:class:`~lowrank_jax.reparam.ReLoRA` (jittable, state in a NamedTuple): per entry of ``A, E, B``
the importance ``I = |θ ⊙ ∇θ|``, its EMAs ``Ī ← β₁Ī + (1-β₁)I`` and
``Ū ← β₂Ū + (1-β₂)|I - Ī|``, the score ``Ī·Ū``; per triplet
``S_i = s(E_i) + mean_j s(A_{ji}) + mean_k s(B_{ik})``; the budget falls from
``b₀ = Σ init_r`` to ``b_T = target_r·#matrices`` on the cubic schedule
``b(t) = ⌊(b₀ - b_T)(1 - (t - t_i)/(T - t_f - t_i))³ + b_T⌋``, and every ``ΔT`` steps the ``E_i``
with ``S_i`` at or below the ``(b₀ - b)``-th smallest score (over *all* layers: ranks are
reallocated) are zeroed. At ``t = T - t_f`` the pattern is frozen and the scores reset; after it
the frozen pattern masks ``E`` every step. Call order as PEFT's docs: gradient, optimizer step,
then ``update`` with the *post-step* adapters and the *pre-step* gradients. Between mask steps
Adam can revive a masked ``E`` (as in PEFT). :func:`adalora_prune` drops the masked triplets
(``ranknum`` kept, as PEFT's ``resize_state_dict_by_rank_pattern``).

Reference: Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
ICLR 2023. https://arxiv.org/abs/2303.10512 (PEFT ``tuners/adalora``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.reparam import _validate as check
from lowrank_jax.reparam.core import Adapters
from lowrank_jax.reparam.method import Method, f32, normal, register
from lowrank_jax.reparam.wrapper import Reparam

__all__ = [
    "AdaLoRA",
    "AdaLoRASchedule",
    "AllocatorState",
    "adalora",
    "adalora_prune",
    "orthogonality_penalty",
]


@register
@dataclasses.dataclass(frozen=True)
class AdaLoRA(Method):
    """``W' = W + s·A diag(E) B`` in SVD form (see the module docstring)."""

    rank: int = 12
    alpha: float = 8.0
    ranknum: float | None = None
    dropout: float = 0.0

    def __post_init__(self):
        check.positive_int("AdaLoRA", "rank", self.rank)
        check.rate("AdaLoRA", "dropout", self.dropout)
        if self.ranknum is not None:
            check.nonnegative("AdaLoRA", "ranknum", self.ranknum)

    @property
    def scale(self) -> float:
        ranknum = self.rank if self.ranknum is None else self.ranknum
        return (self.alpha if self.alpha > 0 else float(self.rank)) / (ranknum + 1e-5)

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        check.fits("AdaLoRA", path, "rank", self.rank, min(shape[-2:]), shape)

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        *batch, n_in, n_out = w.shape
        key_a, key_b = jax.random.split(key)
        trainable = {
            "A": 0.02 * normal(key_a, (*batch, n_in, self.rank)),
            "E": jnp.zeros((*batch, self.rank), jnp.float32),
            "B": 0.02 * normal(key_b, (*batch, self.rank, n_out)),
        }
        return {}, trainable

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        scaled = f32(trainable["A"]) * f32(trainable["E"])[..., None, :]
        return self.scale * (scaled @ f32(trainable["B"]))

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        t = c.into(x_drop, trainable["A"].astype(x.dtype)) * trainable["E"].astype(x.dtype)
        return c.into(x, w) + self.scale * c.then(t, trainable["B"].astype(x.dtype))


def adalora(
    init_r: int = 12,
    alpha: float = 8.0,
    *,
    dropout: float = 0.0,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """AdaLoRA adapters (pair with :class:`AdaLoRASchedule` in the train loop).

    Args:
      init_r: the initial rank of every matrix (PEFT's default 12).
      alpha: PEFT's ``lora_alpha`` (default 8); ``s = α/(init_r + 1e-5)``.
      dropout: adapter-input dropout (in :func:`~lowrank_jax.reparam.wrap` layers).
      targets, dims, dtype: see :class:`~lowrank_jax.reparam.Reparam`.

    Returns:
      A :class:`~lowrank_jax.reparam.Reparam`; trainable parameters ``init_r(in + out + 1)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((16, 8))}
      >>> _, adapters = reparam.adalora(init_r=4).init(jax.random.key(0), params)
      >>> reparam.num_trainable(adapters)  # 4 * (16 + 8 + 1)
      100

    Reference: Zhang et al., ICLR 2023, https://arxiv.org/abs/2303.10512.
    """
    method = AdaLoRA(rank=init_r, alpha=float(alpha), dropout=dropout)
    return Reparam(method, targets, dims, (), dtype)


def _frobenius_gap(gram: jax.Array, eye: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum((gram - eye) ** 2, axis=(-2, -1)))


def orthogonality_penalty(adapters: Adapters, masks: dict | None = None) -> jax.Array:
    """``mean over A, B matrices of ‖AᵀA - I‖_F, ‖BBᵀ - I‖_F`` (unsquared, as PEFT).

    ``masks`` (``{path: bool (..., r)}``, optional) restricts each matrix to its active
    components: ``‖M^T M - diag(mask)‖`` with ``M`` the masked factor (IncreLoRA)."""
    total, count = 0.0, 0
    for site in adapters.sites:
        t = adapters.trainable[site.path]
        if "E" not in t:
            continue
        a, b = f32(t["A"]), f32(t["B"])
        eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
        if masks is not None:
            m = f32(masks[site.path])
            a, b = a * m[..., None, :], b * m[..., :, None]
            eye = eye * m[..., None, :]
        gap_a = _frobenius_gap(jnp.swapaxes(a, -1, -2) @ a, eye)
        gap_b = _frobenius_gap(b @ jnp.swapaxes(b, -1, -2), eye)
        total = total + jnp.sum(gap_a) + jnp.sum(gap_b)
        count += 2 * gap_a.size
    if count == 0:
        raise ValueError("orthogonality_penalty: no AdaLoRA/IncreLoRA site in these adapters.")
    return total / count


class AllocatorState(NamedTuple):
    """EMAs of the sensitivity and uncertainty of every trainable entry, and the frozen pattern."""

    sensitivity: dict
    uncertainty: dict
    pattern: dict


@dataclasses.dataclass(frozen=True)
class AdaLoRASchedule:
    """AdaLoRA's budget schedule and rank allocator (PEFT's ``RankAllocator``).

    Attributes:
      total_step: ``T``, the number of training steps (required, as PEFT).
      target_r: the average final rank (PEFT's default 8).
      tinit, tfinal, delta_t: warmup steps, final fine-tuning steps, masking interval.
      beta1, beta2: EMA factors of the sensitivity and the uncertainty (0.85).
      orth_reg_weight: ``w`` of :meth:`regularizer` (PEFT's default 0.5; the original 0.1).

    Example::

        schedule = reparam.AdaLoRASchedule(total_step=1000, target_r=8)
        state = schedule.init(adapters)
        # in the step: loss + schedule.regularizer(adapters); grads; optimizer update; then
        adapters, state = schedule.update(step, adapters, grads, state)
    """

    total_step: int
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self):
        for name in ("total_step", "target_r", "delta_t"):
            check.positive_int("AdaLoRASchedule", name, getattr(self, name))
        for name in ("tinit", "tfinal", "orth_reg_weight"):
            check.nonnegative("AdaLoRASchedule", name, getattr(self, name))
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(
                f"AdaLoRASchedule: tinit + tfinal = {self.tinit + self.tfinal} leaves no budget "
                f"phase in total_step={self.total_step}; use tinit + tfinal < total_step."
            )
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"AdaLoRASchedule: {name} must be in (0, 1).")

    def _sites(self, adapters: Adapters) -> list:
        sites = [s for s in adapters.sites if isinstance(s.method, AdaLoRA)]
        if not sites:
            raise ValueError("AdaLoRASchedule: no AdaLoRA site; use reparam.adalora(...).")
        return sites

    def budgets(self, adapters: Adapters) -> tuple[int, int]:
        """``(b₀, b_T)``: the initial and the target total rank (every stacked matrix counts)."""
        sites = self._sites(adapters)
        matrices = [int(np.prod(adapters.trainable[s.path]["E"].shape[:-1])) for s in sites]
        initial = sum(n * s.method.rank for n, s in zip(matrices, sites))
        return initial, self.target_r * sum(matrices)

    def budget_schedule(self, step: int, adapters: Adapters) -> tuple[int, bool]:
        """``(budget, mask now?)`` at ``step``, exactly as PEFT (float64, Python ``int``)."""
        return _budget(self, step, *self.budgets(adapters))

    def init(self, adapters: Adapters) -> AllocatorState:
        sites = self._sites(adapters)
        zeros = {s.path: jax.tree.map(jnp.zeros_like, adapters.trainable[s.path]) for s in sites}
        pattern = {
            s.path: jnp.ones(adapters.trainable[s.path]["E"].shape, bool) for s in sites
        }
        return AllocatorState(zeros, jax.tree.map(jnp.zeros_like, zeros), pattern)

    def regularizer(self, adapters: Adapters) -> jax.Array:
        """``w·orthogonality_penalty`` (add it to the loss)."""
        return self.orth_reg_weight * orthogonality_penalty(adapters)

    def _importance(self, trainable: dict, grads: dict, state: AllocatorState) -> AllocatorState:
        def ema(avg, unc, theta, grad):
            ipt = jnp.abs(f32(theta) * f32(grad))
            avg = self.beta1 * avg + (1 - self.beta1) * ipt
            return avg, self.beta2 * unc + (1 - self.beta2) * jnp.abs(ipt - avg)

        sens, unc = {}, {}
        for path in state.sensitivity:
            sens[path], unc[path] = {}, {}
            for name in state.sensitivity[path]:
                sens[path][name], unc[path][name] = ema(
                    state.sensitivity[path][name],
                    state.uncertainty[path][name],
                    trainable[path][name],
                    grads[path][name],
                )
        return state._replace(sensitivity=sens, uncertainty=unc)

    def _scores(self, state: AllocatorState) -> dict:
        out = {}
        for path, sens in state.sensitivity.items():
            s = {k: sens[k] * state.uncertainty[path][k] for k in sens}
            out[path] = s["E"] + jnp.mean(s["A"], axis=-2) + jnp.mean(s["B"], axis=-1)
        return out

    def _mask_to_budget(self, state: AllocatorState, budget: jax.Array, initial: int) -> dict:
        scores = self._scores(state)
        flat = jnp.sort(jnp.concatenate([s.ravel() for s in scores.values()]))
        k = initial - budget
        threshold = jnp.where(k >= 1, flat[jnp.clip(k - 1, 0, flat.size - 1)], -jnp.inf)
        return {path: s > threshold for path, s in scores.items()}

    def update(
        self, step: Any, adapters: Adapters, grads: dict, state: AllocatorState
    ) -> tuple[Adapters, AllocatorState]:
        """One allocator step (PEFT's ``update_and_allocate``); jittable in ``step``.

        Args:
          step: the global step (an int or a traced int).
          adapters: the adapters *after* the optimizer step.
          grads: the gradients of ``adapters.trainable`` that step.
          state: the :class:`AllocatorState`.

        Returns:
          ``(adapters with masked E, state)``.
        """
        initial, target = self.budgets(adapters)
        table = jnp.asarray(_budget_table(self, initial, target))
        end = self.total_step - self.tfinal
        step = jnp.asarray(step, jnp.int32)
        budget, mask_now = table[jnp.clip(step, 0, self.total_step)]
        trainable = adapters.trainable

        def masked(pattern: dict) -> dict:
            out = dict(trainable)
            for path, keep in pattern.items():
                out[path] = {**out[path], "E": jnp.where(keep, out[path]["E"], 0.0)}
            return out

        def allocate(state: AllocatorState) -> tuple:
            state = self._importance(trainable, grads, state)
            pattern = self._mask_to_budget(state, budget, initial)
            pattern = jax.tree.map(lambda p, q: jnp.where(mask_now == 1, p, q), pattern,
                                   state.pattern)
            keep = jax.tree.map(lambda p: jnp.logical_or(p, mask_now == 0), pattern)
            return masked(keep), state._replace(pattern=pattern)

        def finalize(state: AllocatorState) -> tuple:
            pattern = self._mask_to_budget(state, budget, initial)
            # two trees of their own: a state holding one array twice cannot be donated
            zeros = lambda: jax.tree.map(jnp.zeros_like, state.sensitivity)
            return masked(pattern), AllocatorState(zeros(), zeros(), pattern)

        def hold(state: AllocatorState) -> tuple:
            return masked(state.pattern), state

        phase = jnp.where(step < end, 0, jnp.where(step == end, 1, 2))
        trainable, state = jax.lax.switch(phase, [allocate, finalize, hold], state)
        return adapters.replace(trainable=trainable), state


def _budget(schedule: AdaLoRASchedule, step: int, initial: int, target: int) -> tuple:
    # PEFT's RankAllocator.budget_schedule, verbatim arithmetic (Python floats, int()).
    if step <= schedule.tinit:
        return initial, False
    if step > schedule.total_step - schedule.tfinal:
        return target, True
    span = schedule.total_step - schedule.tfinal - schedule.tinit
    mul = 1 - (step - schedule.tinit) / span
    return int((initial - target) * (mul**3) + target), step % schedule.delta_t == 0


@functools.cache
def _budget_table(schedule: AdaLoRASchedule, initial: int, target: int) -> np.ndarray:
    """``[(budget, mask?)]`` for every step ``0..T`` (host-side: exact integer budgets)."""
    rows = [_budget(schedule, t, initial, target) for t in range(schedule.total_step + 1)]
    return np.array(rows, np.int32)


def adalora_prune(adapters: Adapters) -> Adapters:
    """Drops the triplets whose ``E`` is zero in every stacked matrix of a leaf; ``ranknum``
    is kept, so the scale and the effective weights do not change (PEFT's resize on save)."""
    trainable, sites = dict(adapters.trainable), []
    for site in adapters.sites:
        m = site.method
        if not isinstance(m, AdaLoRA):
            sites.append(site)
            continue
        t = adapters.trainable[site.path]
        e = np.asarray(t["E"]).reshape(-1, m.rank)
        keep = np.flatnonzero(np.any(e != 0, axis=0))
        if keep.size == 0:
            keep = np.array([0])
        ranknum = m.rank if m.ranknum is None else m.ranknum
        method = dataclasses.replace(m, rank=int(keep.size), ranknum=float(ranknum))
        trainable[site.path] = {"A": t["A"][..., keep], "E": t["E"][..., keep],
                                "B": t["B"][..., keep, :]}
        sites.append(site._replace(method=method))
    return Adapters(trainable, dict(adapters.frozen), tuple(sites))
