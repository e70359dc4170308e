r"""Mixtures of LoRA experts: one routed-adapter layer, four published configurations.

A routed layer replaces an ``nnx.Linear`` and adds ``E`` LoRA experts weighted per *token*:

.. math:: y = x W + b + \sum_{e=1}^{E} g_e(x)\, s_e\, (\tilde x A_e) B_e

(``x̃``: ``x`` after adapter dropout). The gates depend on the token, so this is an
activation-level computation, never a weight rewrite (nothing merges). The experts are stacked
``A: (E, in, r)``, ``B: (E, r, out)`` and computed in two batched matmuls (``E·r`` columns),
with the gates applied between them. :class:`Routing` selects the gate rule:

* ``"softmax"``: ``p = softmax(x W_g / T)``; keep the top ``k``; renormalise (MoLA,
  MeteoRA; ``k = E``: a dense softmax mixture).
* ``"sigmoid"`` with every rank an expert (SMoRA): scores ``σ(x W_g) + β`` with a
  non-trainable bias ``β``; keep the top ``k`` ranks; ``g = kept / Σ kept · k``; ``s = α/k``.
  In training (``deterministic=False``, ``model.train()``) each call moves
  ``β_i += u·sign(mean(load) - load_i)`` (aux-loss-free balancing).
* ``"external"`` (X-LoRA): the gates come from :class:`~lowrank_jax.reparam.XLoRA`'s scaling
  head; optional top-``k`` masking and re-softmax (PEFT's ``top_k_lora`` /
  ``enable_softmax_topk``).

Inside :func:`collect_routing` every routed layer records its Switch-style load-balancing
loss ``E Σ_e f_e P̄_e`` (``f_e``: share of the top-``k`` assignments, ``P̄_e``: mean gate
probability; 1 when balanced), its expert load and its router logits (MeteoRA's
:func:`gate_loss`) -- inside ``jax.jit`` too.

Configurations: :func:`xlora` (frozen experts, external scalings), :func:`mola` (more experts
in higher layers), :func:`smora` (each rank an expert, top-``k`` ranks per token),
:func:`meteora` (gated task adapters, top-2); :func:`wrap_experts` installs them.

References:
  Buehler & Buehler, "X-LoRA: Mixture of Low-Rank Adapter Experts", 2024, arXiv:2402.07148.
  Gao et al., "Higher Layers Need More LoRA Experts" (MoLA), 2024, arXiv:2402.08562.
  Zhao et al., "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA" (SMoRA),
  2025, arXiv:2501.15103.
  Xu et al., "MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models", ICLR 2025,
  arXiv:2405.13053.
  Fedus et al., "Switch Transformers", JMLR 2022 (the balance loss).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lowrank_jax.reparam.method import kaiming_uniform

__all__ = [
    "PerLayer",
    "RoutedLoRA",
    "RouterBias",
    "Routing",
    "RoutingRecord",
    "collect_routing",
    "gate_loss",
    "meteora",
    "mola",
    "routed_layers",
    "smora",
    "wrap_experts",
    "xlora",
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


@dataclasses.dataclass(frozen=True)
class PerLayer:
    """Per-layer routings (MoLA): layer ``i`` (from ``pattern`` in the kernel path) uses
    ``routings[i]``."""

    routings: tuple
    pattern: str = r"layers/(\d+)/"

    def for_path(self, path: str) -> Routing:
        match = re.search(self.pattern, path)
        if match is None or int(match.group(1)) >= len(self.routings):
            raise ValueError(
                f"per-layer routing: leaf '{path}' has no layer index < {len(self.routings)} "
                f"matching {self.pattern!r}; narrow targets= or give one routing per layer."
            )
        return self.routings[int(match.group(1))]


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
        param = nnx.LoRAParam if routing.train_experts else _frozen()
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


def _frozen() -> type:
    from lowrank_jax.reparam.nnx import FrozenAdapter

    return FrozenAdapter


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


def xlora(num_experts: int, *, top_k: int | None = None, softmax_topk: bool = False) -> Routing:
    """X-LoRA layers: frozen experts (from trained adapters), gates from the scaling head.

    Reference: Buehler & Buehler, 2024, https://arxiv.org/abs/2402.07148; PEFT ``xlora``.
    """
    return Routing(num_experts=num_experts, rank=1, gating="external", top_k=top_k,
                   softmax_topk=softmax_topk, train_experts=False)  # fmt: skip


def mola(
    experts: Sequence[int] = (2, 4, 6, 8),
    *,
    num_layers: int | None = None,
    rank: int = 8,
    alpha: float | None = None,
    top_k: int = 2,
    dropout: float = 0.0,
    pattern: str = r"layers/(\d+)/",
) -> PerLayer:
    """MoLA: softmax top-``k`` routing with more experts in higher layers.

    The layers are split into ``len(experts)`` contiguous groups, group ``j`` getting
    ``experts[j]`` experts (the paper's "2468": 8 layers each with 2, 4, 6, 8 of 32).

    Args:
      experts: experts per layer group, bottom to top.
      num_layers: the model's layers (default ``len(experts)``: one group per layer).
      rank, alpha, top_k, dropout: per expert; ``top_k`` is capped at a group's experts.
      pattern: regex whose group 1 is the layer index in a kernel path.

    Reference: Gao et al., 2024, https://arxiv.org/abs/2402.08562.
    """
    num_layers = num_layers or len(experts)
    if num_layers < len(experts):
        raise ValueError(f"mola: {num_layers} layers cannot hold {len(experts)} groups.")
    groups = np.array_split(np.arange(num_layers), len(experts))
    per_layer = [0] * num_layers
    for count, group in zip(experts, groups):
        for i in group:
            per_layer[i] = count
    return PerLayer(
        tuple(
            Routing(num_experts=n, rank=rank, alpha=alpha, top_k=min(top_k, n), dropout=dropout)
            for n in per_layer
        ),
        pattern,
    )


def smora(
    rank: int = 64, *, top_k: int = 8, alpha: float | None = None,
    bias_update_rate: float = 1e-5, dropout: float = 0.0,
) -> Routing:  # fmt: skip
    """SMoRA: every rank-1 component an expert; sigmoid router, top-``k`` ranks per token,
    aux-loss-free bias balancing, scale ``α/k``.

    Reference: Zhao et al., 2025, https://arxiv.org/abs/2501.15103.
    """
    return Routing(num_experts=rank, rank=rank, alpha=alpha, gating="sigmoid", top_k=top_k,
                   rank_experts=True, bias_update_rate=bias_update_rate,
                   dropout=dropout)  # fmt: skip


def meteora(
    num_tasks: int, *, top_k: int = 2, rank: int = 8, train_experts: bool = True
) -> Routing:
    """MeteoRA: task LoRAs behind a softmax top-``k`` gate (``k = 2``), trained with
    :func:`gate_loss` against the task labels.

    Reference: Xu et al., ICLR 2025, https://arxiv.org/abs/2405.13053.
    """
    return Routing(num_experts=num_tasks, rank=rank, top_k=min(top_k, num_tasks),
                   train_experts=train_experts)  # fmt: skip


def _resolve(routing: Routing | PerLayer | Callable, path: str) -> Routing:
    if isinstance(routing, Routing):
        return routing
    if isinstance(routing, PerLayer):
        return routing.for_path(path)
    return routing(path)


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _expert_factors(experts: Sequence[Any], what: str) -> dict[str, tuple]:
    """``{path: (A (E, in, r_max), B (E, r_max, out))}`` from trained LoRA adapters, each
    expert's scale folded into its ``B`` and its rank zero-padded to ``r_max`` (exact)."""
    from lowrank_jax.reparam._algebra import by_path

    table = by_path(list(experts), what)
    out = {}
    for path, entries in table.items():
        if len(entries) != len(experts):
            raise ValueError(
                f"{what}: leaf '{path}' is adapted by {len(entries)} of the {len(experts)} expert "
                f"adapters; every expert must cover the same leaves."
            )
        r = max(e.a.shape[-1] for e in entries)
        pad = lambda x, axis, r=r: jnp.pad(x, [(0, r - x.shape[axis]) if i == axis % x.ndim
                                              else (0, 0) for i in range(x.ndim)])  # fmt: skip
        if entries[0].a.ndim != 2:
            raise ValueError(f"{what}: leaf '{path}' is stacked; experts adapt plain layers.")
        out[path] = (
            jnp.stack([pad(e.a, -1) for e in entries]),
            jnp.stack([pad(e.scale * e.b, -2) for e in entries]),
        )
    return out


def wrap_experts(
    model: Any,
    routing: Routing | PerLayer | Callable[[str], Routing],
    *,
    targets: Any = None,
    experts: Sequence[Any] | None = None,
    rngs: nnx.Rngs | None = None,
) -> Any:
    """Replaces targeted ``nnx.Linear`` layers of ``model`` with :class:`RoutedLoRA` layers.

    Args:
      model: an NNX module with unstacked layers.
      routing: a :class:`Routing` for every layer, a :class:`PerLayer` (MoLA) or a callable
        ``path -> Routing``.
      targets: which kernels (as :class:`~lowrank_jax.reparam.Reparam`'s: a regex, list,
        callable...; default every float matrix that is not an embedding, head or norm).
        With ``experts``, their leaves.
      experts: trained plain LoRA :class:`~lowrank_jax.reparam.Adapters`, one per expert (X-LoRA,
        MeteoRA tasks); ranks may differ (zero-padded) and scales fold into ``B``.
      rngs: ``nnx.Rngs`` (``params``: fresh experts and routers; ``dropout``).

    Returns:
      The wrapped model (sharing variables with ``model``); the routed layers' kernels keep their
      paths under ``.../<layer>/base/kernel``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lowrank_jax import reparam
      >>> class Net(nnx.Module):
      ...   def __init__(self): self.up = nnx.Linear(8, 16, rngs=nnx.Rngs(0))
      ...   def __call__(self, x): return self.up(x)
      >>> net = reparam.wrap_experts(Net(), reparam.smora(rank=4, top_k=2), rngs=nnx.Rngs(1))
      >>> net(jnp.ones((2, 3, 8))).shape
      (2, 3, 16)
    """
    from lowrank_jax.reparam.lora import LoRA
    from lowrank_jax.reparam.wrapper import Reparam

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    factors = {} if experts is None else _expert_factors(experts, "wrap_experts")
    if experts is not None and targets is None:
        paths = sorted(factors, key=_natural)
    else:
        paths = sorted((s.path for s in Reparam(LoRA(rank=1), targets).sites(params)), key=_natural)
        missing = sorted(set(paths) - set(factors)) if experts is not None else []
        if missing:
            raise ValueError(f"wrap_experts: the expert adapters do not cover {missing}.")
    index = {p: i for i, p in enumerate(paths)}
    done: set[str] = set()

    def swap(path: tuple, node: Any) -> Any:
        kernel = "/".join(str(p) for p in path) + "/kernel"
        if kernel not in index or not isinstance(node, nnx.Module):
            return node
        if not isinstance(node, nnx.Linear):
            raise ValueError(
                f"wrap_experts: leaf '{kernel}' belongs to a {type(node).__name__}; routed "
                f"experts adapt nnx.Linear layers. Narrow targets=."
            )
        rt = _resolve(routing, kernel)
        if kernel in factors and factors[kernel][0].shape[0] != rt.num_experts:
            rt = dataclasses.replace(rt, num_experts=factors[kernel][0].shape[0])
        done.add(kernel)
        return RoutedLoRA(node, rt, experts=factors.get(kernel), path=kernel,
                          index=index[kernel], rngs=rngs)  # fmt: skip

    wrapped = nnx.recursive_map(swap, model)
    missing = sorted(set(paths) - done, key=_natural)
    if missing:
        raise ValueError(
            f"wrap_experts: these targets are not nnx.Linear kernels: {missing}. Narrow targets=."
        )
    return wrapped


def routed_layers(model: Any) -> list[RoutedLoRA]:
    """The :class:`RoutedLoRA` layers of ``model``, in layer order."""
    layers = [n for _, n in nnx.iter_graph(model) if isinstance(n, RoutedLoRA)]
    return sorted(layers, key=lambda n: _natural(n.path))
