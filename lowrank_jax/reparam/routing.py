r"""The routed-adapter layer behind the mixtures of LoRA experts (:mod:`.experts`).

:class:`RoutedLoRA` replaces an ``nnx.Linear`` and adds ``E`` LoRA experts weighted per token,

.. math:: y = x W + b + \sum_{e=1}^{E} g_e(x)\, s_e\, (\tilde x A_e) B_e

stacked ``A: (E, in, r)``, ``B: (E, r, out)`` and computed in two batched matmuls (``E·r``
columns) with the gates between them; :class:`Routing` picks the gate rule (see
:mod:`lowrank_jax.reparam.experts` for the rules and the published configurations).
:func:`collect_routing` gathers each layer's balance loss, load and router logits.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lowrank_jax.reparam.method import kaiming_uniform
from lowrank_jax.reparam.nnx import FrozenAdapter

__all__ = [
    "GATINGS",
    "RoutedLoRA",
    "RouterBias",
    "Routing",
    "RoutingRecord",
    "collect_routing",
    "gate_loss",
]

GATINGS = ("softmax", "sigmoid", "external")


class RouterBias(nnx.Variable):
    """SMoRA's routing bias ``β``: updated by the balancing rule, never by the optimizer."""


@dataclasses.dataclass(frozen=True)
class Routing:
    """One routed layer's configuration (see the module docstring).

    Attributes:
      num_experts: ``E`` (for ``rank_experts``: ``rank``, every rank-1 term an expert).
      rank: ``r`` per expert (``rank_experts``: the total rank).
      alpha: ``α``; the expert scale is ``α/r`` (``rank_experts``: ``α/k``). Default ``r``.
      gating: ``"softmax"``, ``"sigmoid"`` or ``"external"``.
      top_k: experts kept per token (``None``: all).
      renormalize: renormalise the kept softmax gates to sum 1.
      softmax_topk: re-softmax the kept external gates (X-LoRA's ``enable_softmax_topk``).
      rank_experts: every rank-1 component is an expert (SMoRA).
      bias_update_rate: ``u`` of SMoRA's bias update (``0``: no update).
      temperature: ``T`` of the softmax router.
      train_experts: ``False`` keeps the experts frozen (X-LoRA).
      dropout: adapter-input dropout rate.
    """

    num_experts: int = 4
    rank: int = 8
    alpha: float | None = None
    gating: str = "softmax"
    top_k: int | None = None
    renormalize: bool = True
    softmax_topk: bool = False
    rank_experts: bool = False
    bias_update_rate: float = 0.0
    temperature: float = 1.0
    train_experts: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        problems = []
        if self.gating not in GATINGS:
            problems.append(f"gating must be one of {GATINGS}, got {self.gating!r}")
        if self.num_experts < 1 or self.rank < 1:
            problems.append(f"need num_experts, rank >= 1, got {self.num_experts}, {self.rank}")
        if self.rank_experts and self.num_experts != self.rank:
            problems.append("rank_experts needs num_experts == rank (one expert per rank)")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if problems:
            raise ValueError("Routing: " + "; ".join(problems) + ".")

    @property
    def expert_rank(self) -> int:
        return 1 if self.rank_experts else self.rank

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        if self.rank_experts:
            return alpha / (self.top_k or self.rank)
        return alpha / self.rank


class RoutingRecord(NamedTuple):
    """What one routed layer reports inside :func:`collect_routing`."""

    path: str
    balance: jax.Array  # E Σ f_e P̄_e (1 when balanced)
    load: jax.Array  # (E,) share of the top-k assignments per expert
    logits: jax.Array | None  # (..., E) router logits (None for external gates)


class _Records(list):
    def balance_loss(self) -> jax.Array:
        """The sum over layers of the balance losses (MoLA's ``obalance`` term before ×0.001)."""
        return sum((r.balance for r in self), jnp.float32(0.0))


_RECORDS: contextvars.ContextVar[_Records | None] = contextvars.ContextVar("routing", default=None)
_EXTERNAL: contextvars.ContextVar[dict | None] = contextvars.ContextVar("xlora", default=None)


@contextlib.contextmanager
def collect_routing() -> Iterator[_Records]:
    """Collects a :class:`RoutingRecord` from every routed layer called in the block.

    Use it inside the (jitted) loss function; ``records.balance_loss()`` sums the layers'.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lowrank_jax import reparam
      >>> layer = reparam.RoutedLoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
      ...                            reparam.mola(experts=(2,), rank=2, top_k=1).routings[0],
      ...                            rngs=nnx.Rngs(1))
      >>> with reparam.collect_routing() as records:
      ...     _ = layer(jnp.ones((5, 4)))
      >>> len(records), records[0].load.shape
      (1, (2,))
    """
    records = _Records()
    token = _RECORDS.set(records)
    try:
        yield records
    finally:
        _RECORDS.reset(token)


def _top_k_mask(scores: jax.Array, k: int | None) -> jax.Array:
    if k is None or k == scores.shape[-1]:
        return jnp.ones(scores.shape, bool)
    idx = jax.lax.top_k(scores, k)[1]
    return jnp.any(jax.nn.one_hot(idx, scores.shape[-1], dtype=bool), axis=-2)


class RoutedLoRA(nnx.Module):
    """An ``nnx.Linear`` plus ``E`` routed LoRA experts (see the module docstring).

    Args:
      base: the layer (kept as ``self.base``).
      routing: its :class:`Routing`.
      experts: optional ``(A: (E, in, r), B: (E, r, out))`` to start from (trained adapters,
        their scales already folded into ``B``; then the expert scale is 1). Default: fresh
        experts, ``A`` Kaiming-uniform and ``B = 0`` (a no-op at init).
      path: the kernel path (for messages and records).
      index: the layer's position among X-LoRA's layers (external gating).
      rngs: ``nnx.Rngs`` with ``params`` (fresh experts, router) and ``dropout`` streams.
    """

    def __init__(
        self,
        base: nnx.Linear,
        routing: Routing,
        *,
        experts: tuple | None = None,
        path: str = "",
        index: int = 0,
        rngs: nnx.Rngs | None = None,
    ):
        if not isinstance(base, nnx.Linear):
            raise ValueError(
                f"leaf '{path}': routed experts adapt nnx.Linear layers, not {type(base).__name__}."
            )
        n_in, n_out = base.kernel.shape
        e, r = routing.num_experts, routing.expert_rank
        self.base, self.routing, self.path, self.index = base, routing, path, index
        if experts is None:
            if rngs is None:
                raise ValueError(f"leaf '{path}': fresh experts need rngs=nnx.Rngs(...).")
            a = kaiming_uniform(rngs.params(), (e, n_in, r), n_in)
            b = jnp.zeros((e, r, n_out))
            self.expert_scale = routing.scale
        else:
            a, b = (jnp.asarray(x, jnp.float32) for x in experts)
            if a.shape[:2] != (e, n_in) or b.shape[::2] != (e, n_out) or a.shape[2] != b.shape[1]:
                raise ValueError(
                    f"leaf '{path}': experts A{a.shape}, B{b.shape} do not fit E={e} experts of "
                    f"a ({n_in}, {n_out}) kernel; need A (E, in, r) and B (E, r, out)."
                )
            self.expert_scale = 1.0
        param = nnx.LoRAParam if routing.train_experts else FrozenAdapter
        self.lora_a, self.lora_b = param(a), param(b)
        if routing.gating != "external":
            if rngs is None:
                raise ValueError(f"leaf '{path}': a router needs rngs=nnx.Rngs(...).")
            self.router = nnx.LoRAParam(kaiming_uniform(rngs.params(), (n_in, e), n_in))
        if routing.gating == "sigmoid":
            self.bias = RouterBias(jnp.zeros((e,), jnp.float32))
        self.deterministic = False
        self.dropout = nnx.Dropout(routing.dropout, rngs=rngs) if routing.dropout else None

    def gates(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """``(gates (..., E), probabilities (..., E), kept mask, router logits or None)``."""
        rt = self.routing
        if rt.gating == "external":
            context = _EXTERNAL.get()
            if context is None:
                raise ValueError(
                    f"leaf '{self.path}' has X-LoRA (external) gates: call the model through "
                    f"reparam.XLoRA, which supplies them."
                )
            probs = context["scalings"][..., self.index, :].astype(jnp.float32)
            kept = _top_k_mask(probs, rt.top_k)
            g = probs * kept
            if rt.softmax_topk:
                nonzero = g != 0
                g = jnp.where(nonzero, jax.nn.softmax(jnp.where(nonzero, g, -jnp.inf), -1), 0.0)
            return g * context["weight"], probs, kept, None
        logits = x.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        if rt.gating == "softmax":
            probs = jax.nn.softmax(logits / rt.temperature, axis=-1)
            kept = _top_k_mask(probs, rt.top_k)
            g = probs * kept
            if rt.renormalize and rt.top_k is not None:
                g = g / jnp.sum(g, axis=-1, keepdims=True)
            return g, probs, kept, logits
        probs = jax.nn.sigmoid(logits)
        scores = probs + self.bias[...]  # the reference keeps β in the gate values too
        kept = _top_k_mask(scores, rt.top_k)
        g = scores * kept
        g = g / jnp.sum(g, axis=-1, keepdims=True) * (rt.top_k or rt.num_experts)
        return g, probs, kept, logits

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        if out_sharding is not None:
            raise ValueError("routed layers do not take out_sharding; shard the inputs instead.")
        rt = self.routing
        y = self.base(x)
        context = _EXTERNAL.get()
        if rt.gating == "external" and context is not None and context["scalings"] is None:
            return y  # X-LoRA's scaling pass: the experts are off
        g, probs, kept, logits = self.gates(x)
        a, b = self.lora_a[...], self.lora_b[...]
        e, n_in, r = a.shape
        x_drop = self.dropout(x, deterministic=self.deterministic) if self.dropout else x
        low = x_drop @ jnp.moveaxis(a, 0, 1).reshape(n_in, e * r).astype(x.dtype)
        low = low.reshape(*low.shape[:-1], e, r) * g[..., None].astype(x.dtype)
        low = low.reshape(*low.shape[:-2], e * r) @ b.reshape(e * r, -1).astype(x.dtype)
        tokens = kept.reshape(-1, e)
        load = jnp.sum(tokens, axis=0) / jnp.maximum(jnp.sum(tokens), 1)
        if rt.gating == "sigmoid" and rt.bias_update_rate and not self.deterministic:
            count = jnp.sum(tokens, axis=0).astype(jnp.float32)
            self.bias[...] = self.bias[...] + rt.bias_update_rate * jnp.sign(
                jnp.mean(count) - count
            )
        records = _RECORDS.get()
        if records is not None:
            p = probs.reshape(-1, e)
            mean_p = jnp.mean(p / jnp.sum(p, axis=-1, keepdims=True), axis=0)
            records.append(RoutingRecord(self.path, e * jnp.sum(load * mean_p), load, logits))
        return y + (self.expert_scale * low).astype(y.dtype)


def gate_loss(records: Sequence[RoutingRecord], labels: jax.Array) -> jax.Array:
    r"""MeteoRA's gate loss: the mean token cross-entropy of every layer's router logits
    against the task label (``labels``: ``(batch,)`` or ``(batch, seq)`` task ids).

    .. math:: \mathcal L_g = \frac1{L}\sum_{l} \operatorname{mean}_t
       \operatorname{CE}(\text{logits}_{l,t}, \text{task}_t)

    The reference adds ``50·L_g`` to the language-model loss (it also shifts the labels one
    token with the next-token targets; pass them shifted).
    """
    rows = [r for r in records if r.logits is not None]
    if not rows:
        raise ValueError("gate_loss: no routed layer with a router was called in the block.")
    total = jnp.float32(0.0)
    for r in rows:
        lab = labels if labels.ndim == r.logits.ndim - 1 else labels[:, None]
        lab = jnp.broadcast_to(lab, r.logits.shape[:-1])
        total = total + jnp.mean(optax.softmax_cross_entropy_with_integer_labels(r.logits, lab))
    return total / len(rows)
