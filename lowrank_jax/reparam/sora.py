r"""SoRA: LoRA with a gate between the factors, sparsified by a proximal L1 step.

.. math::
    W' = W + s\,A\,\mathrm{diag}(g)\,B, \qquad A \in \mathbb{R}^{in\times r_{max}},\
    g \in \mathbb{R}^{r_{max}},\ B \in \mathbb{R}^{r_{max}\times out}, \qquad s = \alpha / r_{max}

trained with the gate's proximal gradient step (soft-thresholding, paper Eq. 5)

.. math:: g \leftarrow \mathrm{sign}(g')\max(|g'| - \xi, 0), \qquad g' = g + \Delta g_{\text{Adam}}

and an L1 term ``η·Σ|g|/#gates`` added to the loss (:func:`sora_l1`). A gate that reaches exactly
zero switches its rank-1 component off: the *effective rank* is the number of nonzero gates
(:func:`sora_rank`), and :func:`sora_prune` drops the dead components. As the reference
(``src/lora.py``, ``LowRankLinear``): ``A`` Kaiming-uniform ``U(±1/√in)``, ``B = 0`` (a no-op at
init), **``g ~ N(0, 1)``** (``torch.randn``; the paper's gate init is UNVERIFIED), ``α = 16``.

The optimizer side is :func:`sora_optimizer`: ``tx`` (the reference: AdamW, weight decay 0.1)
on ``A`` and ``B``, and ``gate_tx`` (SparseAdamW: Adam with weight decay 0 and ``sparse_lr``)
followed by :func:`prox_l1` on the gates. ``ξ`` is *not* multiplied by the learning rate (as
``sparse_optimizer.py``; a schedule can do that). The reference applies three sequential masked
updates (``g[g>ξ] -= ξ; g[g<-ξ] += ξ; g[|g|<ξ] = 0``) whose effect is a ``2ξ`` dead zone
(``ξ < |g| < 2ξ`` ends at 0, ``|g| = ξ`` is left unchanged): ``mode="reference"`` reproduces it,
``mode="exact"`` (default) is the true proximal operator. The paper's sparsifying scheduler
(stages with growing ``ξ``) is a ``threshold`` schedule, e.g. ``optax.piecewise_constant_schedule``.

Reference: Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models", EMNLP 2023.
https://arxiv.org/abs/2311.11696 (code: TsinghuaC3I/SoRA).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.reparam import _validate as check
from lowrank_jax.reparam.core import Adapters
from lowrank_jax.reparam.method import Method, f32, kaiming_uniform, normal, register
from lowrank_jax.reparam.wrapper import Reparam

__all__ = [
    "SoRA",
    "prox_l1",
    "sora",
    "sora_l1",
    "sora_optimizer",
    "sora_prune",
    "sora_rank",
]


@register
@dataclasses.dataclass(frozen=True)
class SoRA(Method):
    """``W' = W + s·A diag(g) B`` with a sparsified gate ``g`` (see the module docstring)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    gate_init: str = "normal"

    def __post_init__(self):
        check.positive_int("SoRA", "rank", self.rank)
        check.nonnegative("SoRA", "alpha", self.alpha)
        check.rate("SoRA", "dropout", self.dropout)
        check.choice("SoRA", "gate_init", self.gate_init, ("normal", "ones"))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        check.fits("SoRA", path, "rank", self.rank, min(shape[-2:]), shape)

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        *batch, n_in, n_out = w.shape
        key_a, key_g = jax.random.split(key)
        gate_shape = (*batch, self.rank)
        gate = normal(key_g, gate_shape) if self.gate_init == "normal" else jnp.ones(gate_shape)
        trainable = {
            "A": kaiming_uniform(key_a, (*batch, n_in, self.rank), n_in),
            "g": gate,
            "B": jnp.zeros((*batch, self.rank, n_out), jnp.float32),
        }
        return {}, trainable

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        gated = f32(trainable["A"]) * f32(trainable["g"])[..., None, :]
        return self.scale * (gated @ f32(trainable["B"]))

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        t = c.into(x_drop, trainable["A"].astype(x.dtype)) * trainable["g"].astype(x.dtype)
        return c.into(x, w) + self.scale * c.then(t, trainable["B"].astype(x.dtype))


def sora(
    rank: int = 8,
    alpha: float = 16.0,
    *,
    dropout: float = 0.0,
    gate_init: str = "normal",
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """SoRA: LoRA of maximal rank ``r`` with a gate ``g`` trained by a proximal L1 step.

    Args:
      rank: ``r_max`` (the reference's ``--lora_r``: 16 by default, 8 in its scripts).
      alpha: ``α``; ``s = α/r_max`` (reference: 16).
      dropout: adapter-input dropout (in :func:`~lowrank_jax.reparam.wrap` layers).
      gate_init: ``"normal"`` (``N(0, 1)``, the reference code) or ``"ones"``.
      targets, dims, dtype: see :class:`~lowrank_jax.reparam.Reparam`.

    Returns:
      A :class:`~lowrank_jax.reparam.Reparam`; trainable parameters ``r_max(in + out + 1)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((16, 8))}
      >>> _, adapters = reparam.sora(rank=4).init(jax.random.key(0), params)
      >>> reparam.num_trainable(adapters)  # 4 * (16 + 8 + 1)
      100

    Reference: Ding et al., EMNLP 2023, https://arxiv.org/abs/2311.11696.
    """
    method = SoRA(rank=rank, alpha=float(alpha), dropout=dropout, gate_init=gate_init)
    return Reparam(method, targets, dims, (), dtype)


def soft_threshold(g: jax.Array, xi: Any, mode: str = "exact") -> jax.Array:
    """The gate shrinkage: ``sign(g)·max(|g| - ξ, 0)`` (``"exact"``) or the reference's three
    sequential masked updates (``"reference"``: a ``2ξ`` dead zone, ``|g| = ξ`` unchanged)."""
    if mode == "exact":
        return jnp.sign(g) * jnp.maximum(jnp.abs(g) - xi, 0.0)
    g = jnp.where(g > xi, g - xi, g)
    g = jnp.where(g < -xi, g + xi, g)
    return jnp.where(jnp.abs(g) < xi, 0.0, g)


class ProxL1State(NamedTuple):
    count: jax.Array


def prox_l1(
    threshold: float | optax.Schedule, *, mode: str = "exact"
) -> optax.GradientTransformation:
    r"""The proximal step of ``ξ‖g‖₁`` as an optax transformation: ``u ↦ prox(g + u) - g``.

    Chain it after the gate's optimizer (the update ``u`` must be final, learning rate applied).

    .. math:: \mathrm{prox}_\xi(v) = \mathrm{sign}(v)\max(|v| - \xi, 0)

    Args:
      threshold: ``ξ``, a float or a schedule of the step count (SoRA's sparsifying scheduler).
      mode: ``"exact"`` or ``"reference"`` (SoRA's code; see :func:`soft_threshold`).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from lowrank_jax import reparam
      >>> tx = reparam.prox_l1(0.5)
      >>> g = jnp.array([-2.0, -0.2, 0.3, 1.0])
      >>> u, _ = tx.update(jnp.zeros(4), tx.init(g), g)
      >>> (g + u).tolist()
      [-1.5, 0.0, 0.0, 0.5]

    Reference: Ding et al., EMNLP 2023, Eq. 5.
    """
    check.choice("prox_l1", "mode", mode, ("exact", "reference"))
    if not callable(threshold):
        check.nonnegative("prox_l1", "threshold", threshold)

    def init(params: Any) -> ProxL1State:
        return ProxL1State(count=jnp.zeros([], jnp.int32))

    def update(updates: Any, state: ProxL1State, params: Any = None) -> tuple:
        if params is None:
            raise ValueError("prox_l1 needs params: call tx.update(updates, state, params).")
        xi = threshold(state.count) if callable(threshold) else threshold

        def one(u: jax.Array, g: jax.Array) -> jax.Array:
            target = soft_threshold(f32(g) + f32(u), xi, mode)
            return (target - f32(g)).astype(u.dtype)

        return jax.tree.map(one, updates, params), ProxL1State(optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def _is_gate(path: tuple) -> bool:
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "g"


def sora_optimizer(
    tx: optax.GradientTransformation,
    gate_tx: optax.GradientTransformation,
    threshold: float | optax.Schedule,
    *,
    mode: str = "exact",
) -> optax.GradientTransformation:
    """The SoRA optimizer over ``adapters.trainable``: ``tx`` on the factors, ``gate_tx`` then
    :func:`prox_l1` on the gates (every leaf named ``g``).

    Args:
      tx: the factors' optimizer (the reference: AdamW, ``lr``, weight decay 0.1).
      gate_tx: the gates' optimizer (the reference: Adam, ``sparse_lr``, no weight decay).
      threshold: ``ξ`` (``sparse_lambda_2``) or a schedule of it.
      mode: ``"exact"`` or ``"reference"`` thresholding.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import optax
      >>> from lowrank_jax import reparam
      >>> tx = reparam.sora_optimizer(optax.adamw(8e-4, weight_decay=0.1), optax.adam(8e-4), 3e-4)
    """
    gates = optax.chain(gate_tx, prox_l1(threshold, mode=mode))

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "gate" if _is_gate(p) else "factors", params
        )

    return optax.multi_transform({"factors": tx, "gate": gates}, labels)


def _sora_sites(adapters: Adapters) -> list:
    sites = [s for s in adapters.sites if isinstance(s.method, SoRA)]
    if not sites:
        raise ValueError("these adapters have no SoRA site; use reparam.sora(...).")
    return sites


def sora_l1(adapters: Adapters) -> jax.Array:
    """``Σ|g| / #gates`` over every SoRA gate: the reference's L1 loss term (times ``η``)."""
    gates = [f32(adapters.trainable[s.path]["g"]) for s in _sora_sites(adapters)]
    return sum(jnp.sum(jnp.abs(g)) for g in gates) / sum(g.size for g in gates)


def sora_rank(adapters: Adapters) -> dict[str, Any]:
    """``{path: number of nonzero gates}`` (an int, or an array per stacked matrix)."""
    out = {}
    for site in _sora_sites(adapters):
        counts = np.count_nonzero(np.asarray(adapters.trainable[site.path]["g"]), axis=-1)
        out[site.path] = int(counts) if counts.ndim == 0 else counts
    return out


def sora_prune(adapters: Adapters) -> Adapters:
    """Drops the components whose gate is zero (in every stacked matrix of a leaf); the scale
    ``s`` is kept (``α`` is rescaled with the rank), so the effective weights do not change."""
    trainable, sites = dict(adapters.trainable), []
    for site in adapters.sites:
        if not isinstance(site.method, SoRA):
            sites.append(site)
            continue
        t = adapters.trainable[site.path]
        g = np.asarray(t["g"]).reshape(-1, site.method.rank)
        keep = np.flatnonzero(np.any(g != 0, axis=0))
        if keep.size == 0:  # everything pruned: one zero component keeps the site valid
            keep = np.array([0])
        method = dataclasses.replace(
            site.method, rank=int(keep.size), alpha=site.method.scale * int(keep.size)
        )
        trainable[site.path] = {
            "A": t["A"][..., keep],
            "g": t["g"][..., keep],
            "B": t["B"][..., keep, :],
        }
        sites.append(site._replace(method=method))
    return Adapters(trainable, dict(adapters.frozen), tuple(sites))
