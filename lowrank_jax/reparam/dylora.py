r"""DyLoRA: LoRA trained at a rank sampled every step, usable at any rank afterwards.

.. math::
    W'_b = W + \frac{\alpha}{b}\,A_{[:, :b]}\,B_{[:b, :]}, \qquad
    A \in \mathbb{R}^{in\times r_{max}},\ B \in \mathbb{R}^{r_{max}\times out},\
    b \in \{r_{min}, \dots, r_{max}\}

(the reference multiplies both truncated factors by ``√(r_max/b)`` on top of LoRA's
``α/r_max``: the effective scale is ``α/b``, that of a rank-``b`` LoRA). Each training step draws
one ``b`` uniformly for every layer (:func:`dylora_sample_rank`; the reference's
``on_step_begin`` callback draws from ``{1..r_max}``) and trains the nested truncation. In the
reference's *frozen* mode (``frozen_lower=True``, its official script) components
``1..b-1`` are detached, so only the ``b``-th column of ``A`` and row of ``B`` receive gradients;
``frozen_lower=False`` trains all of ``1..b``. As there, the detached entries still get *zero*
gradients, so AdamW's momentum and decoupled weight decay keep moving them (mask the updates with
``optax.masked`` for a true freeze).

``b`` is an int32 array in the ``frozen`` tree (not a Python int), so a jitted step with a
freshly sampled ``b`` never retraces; :func:`dylora_set_rank` fixes it for evaluation and merging
(set it explicitly before a merge or an export: the last sampled ``b`` persists, as in the
reference), and :func:`dylora_truncate` exports a plain rank-``b`` LoRA (PEFT-compatible).
Init as loralib: ``A`` Kaiming-uniform ``U(±1/√in)``, ``B = 0`` (a no-op at any ``b``); defaults
``r_max = 8``, ``α = 16`` (the reference's RoBERTa scripts).

Reference: Valipour et al., "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using
Dynamic Search-Free Low-Rank Adaptation", EACL 2023. https://arxiv.org/abs/2210.07558
(code: huawei-noah/Efficient-NLP, ``DyLoRA/``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.reparam import _validate as check
from lowrank_jax.reparam.core import Adapters
from lowrank_jax.reparam.lora import LoRA
from lowrank_jax.reparam.method import Method, f32, kaiming_uniform, register
from lowrank_jax.reparam.wrapper import Reparam

__all__ = ["DyLoRA", "dylora", "dylora_sample_rank", "dylora_set_rank", "dylora_truncate"]


@register
@dataclasses.dataclass(frozen=True)
class DyLoRA(Method):
    """``W' = W + (α/b)·A[:, :b] B[:b]`` with the rank ``b`` held in ``frozen["b"]``."""

    rank: int = 8
    alpha: float = 16.0
    min_rank: int = 1
    frozen_lower: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        check.positive_int("DyLoRA", "rank", self.rank)
        check.positive_int("DyLoRA", "min_rank", self.min_rank)
        check.nonnegative("DyLoRA", "alpha", self.alpha)
        check.rate("DyLoRA", "dropout", self.dropout)
        if self.min_rank > self.rank:
            raise ValueError(
                f"DyLoRA: min_rank={self.min_rank} exceeds rank={self.rank} (r_max); use "
                f"min_rank <= rank."
            )

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        check.fits("DyLoRA", path, "rank", self.rank, min(shape[-2:]), shape)

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        *batch, n_in, n_out = w.shape
        trainable = {
            "A": kaiming_uniform(key, (*batch, n_in, self.rank), n_in),
            "B": jnp.zeros((*batch, self.rank, n_out), jnp.float32),
        }
        return {"b": jnp.asarray(self.rank, jnp.int32)}, trainable

    def truncated(self, frozen: dict, trainable: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(A masked to its first b columns, B, α/b)``; in frozen mode only column ``b``
        carries gradients."""
        b = jnp.clip(frozen["b"], 1, self.rank)
        a = trainable["A"]
        index = jnp.arange(self.rank)
        if self.frozen_lower:
            a = jnp.where(index == b - 1, a, jax.lax.stop_gradient(a))
        a = jnp.where(index < b, a, 0.0)
        b_factor = trainable["B"]
        if self.frozen_lower:
            row = (index == b - 1)[:, None]
            b_factor = jnp.where(row, b_factor, jax.lax.stop_gradient(b_factor))
        return a, b_factor, self.alpha / b.astype(jnp.float32)

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        a, b, scale = self.truncated(frozen, trainable)
        return scale * (f32(a) @ f32(b))

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        a, b, scale = self.truncated(frozen, trainable)
        low = c.then(c.into(x_drop, a.astype(x.dtype)), b.astype(x.dtype))
        return c.into(x, w) + scale.astype(x.dtype) * low


def dylora(
    rank: int = 8,
    alpha: float = 16.0,
    *,
    min_rank: int = 1,
    frozen_lower: bool = True,
    dropout: float = 0.0,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """DyLoRA: LoRA of maximal rank ``r_max`` trained on nested truncations ``b ≤ r_max``.

    Args:
      rank: ``r_max``.
      alpha: ``α``; the scale at rank ``b`` is ``α/b``.
      min_rank: ``r_min``, the smallest rank :func:`dylora_sample_rank` draws.
      frozen_lower: train only the ``b``-th component each step (the reference's script).
      dropout: adapter-input dropout (in :func:`~lowrank_jax.reparam.wrap` layers).
      targets, dims, dtype: see :class:`~lowrank_jax.reparam.Reparam`.

    Returns:
      A :class:`~lowrank_jax.reparam.Reparam`; trainable parameters ``r_max(in + out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((16, 8))}
      >>> _, adapters = reparam.dylora(rank=4).init(jax.random.key(0), params)
      >>> adapters = reparam.dylora_sample_rank(jax.random.key(1), adapters)  # each step
      >>> reparam.num_trainable(reparam.dylora_truncate(adapters, 2))  # a rank-2 LoRA
      48

    Reference: Valipour et al., EACL 2023, https://arxiv.org/abs/2210.07558.
    """
    method = DyLoRA(
        rank=rank,
        alpha=float(alpha),
        min_rank=min_rank,
        frozen_lower=frozen_lower,
        dropout=dropout,
    )
    return Reparam(method, targets, dims, (), dtype)


def _dylora_sites(adapters: Adapters) -> list:
    sites = [s for s in adapters.sites if isinstance(s.method, DyLoRA)]
    if not sites:
        raise ValueError("these adapters have no DyLoRA site; use reparam.dylora(...).")
    return sites


def dylora_set_rank(adapters: Adapters, rank: Any) -> Adapters:
    """Every DyLoRA site at rank ``min(rank, r_max)`` (an int or a traced int array)."""
    frozen = dict(adapters.frozen)
    for site in _dylora_sites(adapters):
        b = jnp.minimum(jnp.asarray(rank, jnp.int32), site.method.rank)
        frozen[site.path] = {**frozen[site.path], "b": b}
    return adapters.replace(frozen=frozen)


def dylora_sample_rank(key: jax.Array, adapters: Adapters) -> Adapters:
    """One rank ``b ~ U{r_min..r_max}`` for every site (jittable: ``b`` is an array)."""
    sites = _dylora_sites(adapters)
    low = min(s.method.min_rank for s in sites)
    high = max(s.method.rank for s in sites)
    return dylora_set_rank(adapters, jax.random.randint(key, (), low, high + 1))


def dylora_truncate(adapters: Adapters, rank: int) -> Adapters:
    """Plain LoRA adapters of rank ``min(rank, r_max)`` with DyLoRA's scale ``α/b``: the same
    effective weights as ``dylora_set_rank(adapters, rank)``, exportable with ``to_peft``."""
    check.positive_int("dylora_truncate", "rank", rank)
    _dylora_sites(adapters)
    trainable, sites = dict(adapters.trainable), []
    frozen = dict(adapters.frozen)
    for site in adapters.sites:
        m = site.method
        if not isinstance(m, DyLoRA):
            sites.append(site)
            continue
        b = min(rank, m.rank)
        t = adapters.trainable[site.path]
        trainable[site.path] = {"A": t["A"][..., :b], "B": t["B"][..., :b, :]}
        frozen[site.path] = {}
        sites.append(site._replace(method=LoRA(rank=b, alpha=m.alpha, dropout=m.dropout)))
    return Adapters(trainable, frozen, tuple(sites))
