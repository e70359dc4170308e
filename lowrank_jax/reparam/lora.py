"""LoRA and the methods that differ from it only by initialisation or by what is trained.

.. math:: W' = W + s\\,A B, \\qquad A \\in \\mathbb{R}^{in \\times r},\\
   B \\in \\mathbb{R}^{r \\times out}, \\qquad s = \\alpha / r
   \\ (\\text{rsLoRA: } \\alpha/\\sqrt{r})

PEFT's ``lora_A.weight`` is ``Aᵀ`` ``(r, in)`` and ``lora_B.weight`` is ``Bᵀ`` ``(out, r)``.
Initialisations: ``"kaiming"`` (PEFT's default: ``A ~ U(±1/√in)``, ``B = 0``), ``"gaussian"``
(``A ~ N(0, 1/r²)``), ``"pissa"``/``"pissa_niter_K"``, ``"olora"``, ``"loraga"`` (gradients) and
``"eva"`` (activations) -- see :mod:`lowrank_jax.reparam.inits`. FFA-LoRA trains ``B`` only.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021. arXiv:2106.09685.
  Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023.
  Sun et al., "Improving LoRA in Privacy-preserving Federated Learning" (FFA-LoRA), ICLR 2024.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.reparam import inits
from lowrank_jax.reparam.core import Adapters
from lowrank_jax.reparam.method import (
    Method,
    check_rate,
    f32,
    kaiming_uniform,
    normal,
    positive_int,
    register,
)
from lowrank_jax.reparam.wrapper import Reparam, overrides_from_patterns

__all__ = ["LoRA", "eva", "ffa_lora", "lora", "loraga", "olora", "pissa", "to_base_lora"]

_INITS = ("kaiming", "gaussian", "pissa", "olora", "loraga", "eva")
_RESIDUAL = ("pissa", "olora", "loraga")


def _init_name(init: str) -> str:
    return "pissa" if init.startswith("pissa_niter_") else init


@register
@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """``W' = W + s·A@B`` (see the module docstring). Fields are the hyperparameters."""

    rank: int = 8
    alpha: float = 8.0
    rslora: bool = False
    dropout: float = 0.0
    init_weights: str = "kaiming"
    train_a: bool = True
    ga_direction: str = "ArB2r"
    ga_scale: str = "stable"
    ga_gamma: float = 16.0
    eva_rho: float = 2.0
    eva_whiten: bool = False
    eva_adjust_alpha: bool = True

    def __post_init__(self):
        super().__post_init__()
        if _init_name(self.init_weights) not in _INITS:
            raise ValueError(
                f"LoRA init must be one of {_INITS} or 'pissa_niter_K'; got {self.init_weights!r}."
            )

    @property
    def calibration(self) -> str | None:  # type: ignore[override]
        return {"loraga": "gradients", "eva": "activations"}.get(self.init_weights)

    @property
    def scale(self) -> float:
        return self.alpha / (np.sqrt(self.rank) if self.rslora else self.rank)

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        *_, n_in, n_out = shape
        need = 2 * self.rank if self.init_weights == "loraga" else self.rank
        if need > min(n_in, n_out) or self.rank < 1:
            what = "2·rank" if self.init_weights == "loraga" else "rank"
            raise ValueError(
                f"{type(self).__name__}: {what}={need} does not fit leaf '{path}' with an "
                f"(in, out) = ({n_in}, {n_out}) matrix; use a rank <= {min(n_in, n_out)} there "
                f"(rank_pattern={{'{path}': ...}}) or exclude it with `targets=`."
            )

    def factors(self, key: jax.Array, w: jax.Array, stats: Any) -> tuple[jax.Array, jax.Array]:
        """``(A, B)`` at init for canonical ``w``."""
        *batch, n_in, n_out = w.shape
        r, init = self.rank, _init_name(self.init_weights)
        if init == "kaiming":
            return kaiming_uniform(key, (*batch, n_in, r), n_in), jnp.zeros((*batch, r, n_out))
        if init == "gaussian":
            a = normal(key, (*batch, n_in, r)) / r
            return a, jnp.zeros((*batch, r, n_out))
        if init == "pissa":
            _, _, niter = self.init_weights.partition("_niter_")
            niter = int(niter) if niter else None
            return inits.pissa_factors(w, r, self.scale, niter=niter, key=key)
        if init == "olora":
            return inits.olora_factors(w, r)
        if init == "loraga":
            return inits.loraga_factors(
                stats, w, r, self.scale,
                direction=self.ga_direction, how=self.ga_scale, gamma=self.ga_gamma,
            )
        return inits.eva_factors(stats, r, n_out, whiten=self.eva_whiten)

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        a, b = self.factors(key, w, stats)
        if self.train_a:
            return {}, {"A": a, "B": b}
        return {"A": a}, {"B": b}

    def plan(self, stats, shapes) -> dict[str, dict]:
        if self.init_weights != "eva" or self.eva_rho == 1.0:
            return {}
        ranks = inits.eva_ranks(stats, shapes, self.rank, self.eva_rho)
        plan = {}
        for path, r in ranks.items():
            if r != self.rank:
                alpha = self.alpha * r / self.rank if self.eva_adjust_alpha else self.alpha
                plan[path] = {"rank": r, "alpha": alpha}
        return plan

    def _ab(self, frozen: dict, trainable: dict) -> tuple[jax.Array, jax.Array]:
        return {**frozen, **trainable}["A"], trainable["B"]

    def residual(self, w: jax.Array, frozen: dict, trainable: dict) -> jax.Array:
        if _init_name(self.init_weights) not in _RESIDUAL:
            return w
        a, b = self._ab(frozen, trainable)
        return (f32(w) - self.scale * (f32(a) @ f32(b))).astype(w.dtype)

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        a, b = self._ab(frozen, trainable)
        return self.scale * (f32(a) @ f32(b))

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        a, b = self._ab(frozen, trainable)
        low = c.then(c.into(x_drop, a.astype(x.dtype)), b.astype(x.dtype))
        return c.into(x, w) + self.scale * low


def lora(
    rank: int = 8,
    alpha: float | None = None,
    *,
    rslora: bool = False,
    dropout: float = 0.0,
    init: str = "kaiming",
    train_a: bool = True,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
    **init_options: Any,
) -> Reparam:
    r"""LoRA: ``W' = W + s·A@B`` with ``s = α/r`` (or ``α/√r`` with ``rslora``).

    Args:
      rank: ``r``.
      alpha: ``α``; default ``rank`` (``s = 1``). PEFT's default is ``r = α = 8``.
      rslora: rank-stabilised scaling ``α/√r``.
      dropout: dropout rate on the adapter input (in :func:`~lowrank_jax.reparam.wrap` layers;
        the weight-space :func:`~lowrank_jax.reparam.apply` has no activations to drop).
      init: ``"kaiming"``, ``"gaussian"``, ``"pissa"``, ``"pissa_niter_K"``, ``"olora"``,
        ``"loraga"`` or ``"eva"``.
      train_a: ``False`` freezes ``A`` (FFA-LoRA).
      rank_pattern, alpha_pattern: ``{regex: value}`` per-path rank / alpha (first match).
      targets, dims, dtype: see :class:`~lowrank_jax.reparam.Reparam`.
      **init_options: ``ga_direction``, ``ga_scale``, ``ga_gamma`` (LoRA-GA), ``eva_rho``,
        ``eva_whiten``, ``eva_adjust_alpha`` (EVA).

    Returns:
      A :class:`~lowrank_jax.reparam.Reparam`; trainable parameters ``r(in + out)`` per matrix.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"q_proj": {"kernel": jnp.ones((16, 8))}}
      >>> params, adapters = reparam.lora(rank=4, alpha=8).init(jax.random.key(0), params)
      >>> reparam.num_trainable(adapters)  # 4 * (16 + 8)
      96

    References:
      Hu et al., 2021, https://arxiv.org/abs/2106.09685.
    """
    check_lora_args(_init_name(init), rank, alpha, dropout, rank_pattern)
    method = LoRA(
        rank=rank,
        alpha=float(rank if alpha is None else alpha),
        rslora=rslora,
        dropout=dropout,
        init_weights=init,
        train_a=train_a,
        **init_options,
    )
    overrides = overrides_from_patterns(rank=rank_pattern, alpha=alpha_pattern)
    return Reparam(method, targets, dims, overrides, dtype)


def check_lora_args(
    method: str,
    rank: Any,
    alpha: Any,
    dropout: Any,
    rank_pattern: dict[str, Any] | None,
) -> None:
    """The arguments every LoRA-shaped constructor shares, checked when it is called (not at
    ``init``): ``rank`` an integer >= 1 (so are ``rank_pattern``'s values), ``alpha`` a number,
    ``dropout`` in ``[0, 1)``.

    Raises:
      TypeError, ValueError: one line naming the argument.
    """
    method = "lora" if method in ("kaiming", "gaussian") else method
    positive_int(method, "rank", rank)
    for pattern, value in (rank_pattern or {}).items():
        positive_int(method, f"rank_pattern[{pattern!r}]", value)
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)):
        raise TypeError(f"{method}: alpha must be a number, got {alpha!r}")
    check_rate(method, "dropout", dropout)


def pissa(rank: int = 8, alpha: float | None = None, *, niter: int | None = None, **kw) -> Reparam:
    """PiSSA: LoRA started from the top-``r`` singular triplets, residual base ``W - s·A@B``.

    ``niter`` uses a randomized SVD with that many power iterations (``pissa_niter_K``).
    Reference: Meng et al., 2024, https://arxiv.org/abs/2404.02948.
    """
    return lora(rank, alpha, init="pissa" if niter is None else f"pissa_niter_{niter}", **kw)


def olora(rank: int = 8, alpha: float | None = None, **kw) -> Reparam:
    """OLoRA: LoRA started from the QR factors of the weight, residual base.

    Reference: Büyükakyüz, 2024, https://arxiv.org/abs/2406.01775.
    """
    return lora(rank, alpha, init="olora", **kw)


def loraga(rank: int = 8, alpha: float | None = None, **kw) -> Reparam:
    """LoRA-GA: LoRA started from the SVD of the mean full gradient (needs ``calibration``).

    Reference: Wang et al., 2024, https://arxiv.org/abs/2407.05000.
    """
    return lora(rank, alpha, init="loraga", **kw)


def eva(rank: int = 8, alpha: float | None = None, **kw) -> Reparam:
    """EVA: ``A`` from the principal directions of each layer's inputs, ranks redistributed by
    explained variance (``eva_rho``, default 2). Needs ``calibration`` with activations.

    Reference: Paischer et al., 2024, https://arxiv.org/abs/2410.07170.
    """
    return lora(rank, alpha, init="eva", **kw)


def ffa_lora(rank: int = 8, alpha: float | None = None, **kw) -> Reparam:
    """FFA-LoRA: LoRA with ``A`` frozen at its random init; only ``B`` (``r·out``) trains.

    Reference: Sun et al., ICLR 2024, https://arxiv.org/abs/2403.12313.
    """
    return lora(rank, alpha, train_a=False, **kw)


def to_base_lora(adapters: Adapters, initial: Adapters) -> Adapters:
    """Turns residual-init LoRA/DoRA adapters (PiSSA, OLoRA, LoRA-GA) into plain ones of rank
    ``2r`` on the *original* base: ``s(AB - A_0B_0) = s [A, A_0][B; -B_0]``.

    A residual-init adapter only means something next to its residual base ``W - sA_0B_0``;
    this is how to ship it without that base (PEFT's ``path_initial_model_for_weight_conversion``).

    Args:
      adapters: the trained adapters.
      initial: the adapters as ``init`` returned them (same sites).

    Returns:
      :class:`Adapters` with ``init_weights="kaiming"`` methods (no residual) and the same scale.
    """
    if adapters.sites != initial.sites:
        raise ValueError("to_base_lora: `initial` must be the init-time adapters of these sites.")
    trainable, sites = {}, []
    for site in adapters.sites:
        m = site.method
        if not isinstance(m, LoRA):
            raise ValueError(f"to_base_lora: leaf '{site.path}' is {type(m).__name__}, not LoRA.")
        a, b = m._ab(adapters.frozen[site.path], adapters.trainable[site.path])
        a0, b0 = m._ab(initial.frozen[site.path], initial.trainable[site.path])
        r2 = 2 * m.rank
        alpha = m.scale * (np.sqrt(r2) if m.rslora else r2)
        new = dataclasses.replace(
            m, rank=r2, alpha=float(alpha), init_weights="kaiming", train_a=True
        )
        trainable[site.path] = {
            **adapters.trainable[site.path],  # DoRA's magnitude carries over unchanged
            "A": jnp.concatenate([a, a0], axis=-1),
            "B": jnp.concatenate([b, -b0], axis=-2),
        }
        sites.append(site._replace(method=new))
    return Adapters(trainable, {s.path: {} for s in sites}, tuple(sites))
