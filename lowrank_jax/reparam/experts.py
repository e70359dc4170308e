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

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.reparam._algebra import by_path
from lowrank_jax.reparam.lora import LoRA
from lowrank_jax.reparam.routing import RoutedLoRA, Routing
from lowrank_jax.reparam.wrapper import Reparam

__all__ = ["PerLayer", "meteora", "mola", "routed_layers", "smora", "wrap_experts", "xlora"]


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
