r"""Federated aggregation of client adapters: FedAvg, FLoRA, FFA-LoRA, Fed-SB, LoRA-FAIR, DP.

Clients ``k`` hold adapters on one shared base; ``p_k = n_k / Σ n`` (dataset sizes, default
equal). The *ideal* aggregate is the centralised average of the updates ``Σ_k p_k ΔK_k``.

* :func:`fedavg` (FedIT) averages every trainable array. For LoRA (``ΔK = s A B``) this is
  biased, by exactly
  ``s Ā B̄ - s Σ_k p_k A_k B_k = -½ s Σ_{k,l} p_k p_l (A_k - A_l)(B_k - B_l)``
  (:func:`fedavg_bias`), zero iff for every pair ``A_k = A_l`` or ``B_k = B_l``. It is exact
  whenever the update is linear in the trainable arrays over a frozen part shared by all
  clients: FFA-LoRA (``A`` frozen from one seed, :func:`ffa_aggregate`) and Fed-SB (LoRA-SB's
  ``ΔK = A R B``, only ``R`` trained, :func:`fed_sb_aggregate`).
* :func:`flora_stack` (FLoRA) stacks ``A_g = [p_1 s_1 A_1, …]``, ``B_g = [B_1; …]``: exact for
  heterogeneous ranks, rank ``Σ r_k``; the server merges it into the base and clients restart.
* :func:`lora_fair` keeps FedAvg's ``Ā`` and refines ``B̄ + ΔB`` to the ideal update.
* :func:`dp_fedavg` averages clipped client updates with Gaussian noise through
  ``optax.contrib.differentially_private_aggregate`` (DP-FedAvg; FFA-LoRA's setting).

:func:`aggregation_gap` measures any aggregate against the ideal.

References:
  Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (FedIT), 2023.
  Wang et al., "FLoRA: Federated Fine-Tuning ... with Heterogeneous Low-Rank Adaptations",
  NeurIPS 2024, https://arxiv.org/abs/2409.05976
  Sun et al., "Improving LoRA in Privacy-preserving Federated Learning" (FFA-LoRA), ICLR 2024.
  Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance
  in (Private) Federated LoRA Fine-Tuning", 2025, https://arxiv.org/abs/2502.15436
  Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
  Refinement", ICCV 2025, https://arxiv.org/abs/2411.14961
  McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.reparam._algebra import adapter_list, by_path, lora_adapters, normalized
from lowrank_jax.reparam._algebra import per_matrix as _per_matrix
from lowrank_jax.reparam.core import Adapters, apply
from lowrank_jax.reparam.lora import LoRA
from lowrank_jax.reparam.method import f32
from lowrank_jax.reparam.xs import LoRAXS
from lowrank_jax.targets import path_str

__all__ = [
    "aggregation_gap",
    "dp_fedavg",
    "fed_sb_aggregate",
    "fedavg",
    "fedavg_bias",
    "ffa_aggregate",
    "flora_stack",
    "lora_fair",
]


def _clients(clients: Any, weights: Any, what: str) -> tuple[list[Adapters], list[float]]:
    items, _ = adapter_list(clients, None, what)
    sizes = [1.0] * len(items) if weights is None else list(weights)
    if len(sizes) != len(items):
        raise ValueError(f"{what}: got {len(sizes)} weights for {len(items)} clients.")
    return items, normalized(sizes, what)


def _same_sites(items: list[Adapters], what: str) -> None:
    for k, client in enumerate(items[1:], 1):
        if client.sites != items[0].sites:
            mine = {s.path: s for s in client.sites}
            for site in items[0].sites:
                if mine.get(site.path) != site:
                    raise ValueError(
                        f"{what}: client {k} differs from client 0 at leaf '{site.path}' "
                        f"({mine.get(site.path)} vs {site}); every client must hold the same "
                        f"adapter layout (method, rank, alpha) -- use flora_stack for ranks that "
                        f"differ."
                    )
            raise ValueError(f"{what}: client {k} adapts other leaves than client 0.")


def _check_frozen(items: list[Adapters], what: str) -> None:
    for path, arrays in items[0].frozen.items():
        for name, x in arrays.items():
            for k, client in enumerate(items[1:], 1):
                y = client.frozen[path][name]
                if isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
                    continue  # under jit: the caller vouches for it
                if not np.array_equal(np.asarray(x), np.asarray(y)):
                    raise ValueError(
                        f"{what}: the frozen array '{name}' at leaf '{path}' differs between "
                        f"client 0 and client {k}. Averaging the trainable arrays needs one "
                        f"frozen part for all clients: initialise every client from the same "
                        f"key (FFA-LoRA's A, LoRA-SB's A and B)."
                    )


def fedavg(clients: Any, weights: Sequence[float] | None = None) -> Adapters:
    r"""FedAvg / FedIT: ``θ = Σ_k p_k θ_k`` for every trainable array (frozen ones shared).

    For LoRA this averages ``A`` and ``B`` separately, which is biased (see
    :func:`fedavg_bias`); for FFA-LoRA and Fed-SB it is the exact average of the updates.

    Args:
      clients: client :class:`~lowrank_jax.reparam.Adapters`, one layout, one frozen part.
      weights: per-client weights (dataset sizes), normalised; default equal.

    Returns:
      The aggregated :class:`~lowrank_jax.reparam.Adapters` (client 0's frozen arrays).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((6, 4))}
      >>> _, c0 = reparam.ffa_lora(rank=2).init(jax.random.key(0), params)
      >>> c1 = c0.replace(trainable={"w": {"B": jnp.ones((2, 4))}})
      >>> reparam.fedavg([c0, c1], weights=[3, 1]).trainable["w"]["B"][0]
      Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
    """
    what = "fedavg"
    items, p = _clients(clients, weights, what)
    _same_sites(items, what)
    _check_frozen(items, what)
    trainable = jax.tree.map(
        lambda *xs: sum(pk * f32(x) for pk, x in zip(p, xs)).astype(xs[0].dtype),
        *(c.trainable for c in items),
    )
    return items[0].replace(trainable=trainable)


def ffa_aggregate(clients: Any, weights: Sequence[float] | None = None) -> Adapters:
    """FFA-LoRA aggregation: ``B = Σ_k p_k B_k`` over the shared frozen ``A`` -- exact.

    Args:
      clients: :func:`~lowrank_jax.reparam.ffa_lora` adapters (``train_a=False``) whose ``A``
        came from one key.
      weights: per-client weights, normalised; default equal.

    Returns:
      :class:`~lowrank_jax.reparam.Adapters` with ``ΔK = s A Σ_k p_k B_k = Σ_k p_k ΔK_k``.

    Reference: Sun et al., ICLR 2024, https://arxiv.org/abs/2403.12313.
    """
    for client in adapter_list(clients, None, "ffa_aggregate")[0]:
        for site in client.sites:
            if not isinstance(site.method, LoRA) or site.method.train_a:
                raise ValueError(
                    f"ffa_aggregate: leaf '{site.path}' is {site.method!r}; FFA-LoRA clients "
                    f"train B only (reparam.ffa_lora, or lora(train_a=False))."
                )
    return fedavg(clients, weights)


def fed_sb_aggregate(clients: Any, weights: Sequence[float] | None = None) -> Adapters:
    """Fed-SB aggregation: ``R = Σ_k p_k R_k`` between LoRA-SB's frozen ``A``, ``B`` -- exact.

    Communication is ``r²`` per matrix whatever the number of clients. The paper averages
    uniformly (the default here).

    Args:
      clients: :func:`~lowrank_jax.reparam.lora_sb` (or ``lora_xs``) adapters sharing ``A``, ``B``.
      weights: per-client weights, normalised; default equal.

    Returns:
      :class:`~lowrank_jax.reparam.Adapters` with ``ΔK = s A (Σ p_k R_k) B = Σ_k p_k ΔK_k``.

    Reference: Singhal et al., 2025, https://arxiv.org/abs/2502.15436.
    """
    for client in adapter_list(clients, None, "fed_sb_aggregate")[0]:
        for site in client.sites:
            if not isinstance(site.method, LoRAXS):
                raise ValueError(
                    f"fed_sb_aggregate: leaf '{site.path}' is {type(site.method).__name__}; "
                    f"Fed-SB clients are reparam.lora_sb (or lora_xs) adapters."
                )
    return fedavg(clients, weights)


def fedavg_bias(clients: Any, weights: Sequence[float] | None = None) -> dict[str, jax.Array]:
    r"""FedAvg's error on LoRA clients in closed form, per leaf (canonical layout):

    .. math:: s\bar A\bar B - s\sum_k p_k A_k B_k
       = -\tfrac12\, s \sum_{k,l} p_k p_l (A_k - A_l)(B_k - B_l)

    Args:
      clients: LoRA client adapters of one layout.
      weights: per-client weights, normalised; default equal.

    Returns:
      ``{path: bias (..., in, out)}``.
    """
    what = "fedavg_bias"
    items, p = _clients(clients, weights, what)
    _same_sites(items, what)
    out = {}
    for path, entries in by_path(items, what).items():
        total = 0.0
        for k, ek in enumerate(entries):
            for l_, el in enumerate(entries):
                if k < l_:  # the (k, l) and (l, k) terms are equal: ½·2 = 1
                    total = total + p[k] * p[l_] * ((ek.a - el.a) @ (ek.b - el.b))
        out[path] = -entries[0].scale * total
    return out


def flora_stack(clients: Any, weights: Sequence[float] | None = None) -> Adapters:
    r"""FLoRA: stacks client LoRAs of any ranks into one exact aggregate of rank ``Σ r_k``.

    .. math:: A_g = [p_1 s_1 A_1, \dots, p_K s_K A_K],\quad B_g = [B_1; \dots; B_K],
       \quad s_g = 1 \ \Rightarrow\ A_g B_g = \sum_k p_k s_k A_k B_k

    The reference folds ``p_k`` into ``A`` with a global ``α`` equal to the clients' scale;
    folding ``s_k`` too keeps clients with different ``α``/rsLoRA exact. FLoRA then merges
    the aggregate into the base (``reparam.merge``) and clients start fresh adapters on it.

    Args:
      clients: plain LoRA client adapters on one base (ranks may differ).
      weights: per-client weights, normalised; default equal.

    Returns:
      Plain LoRA :class:`~lowrank_jax.reparam.Adapters` of rank ``Σ r_k`` and scale 1.

    Reference: Wang et al., NeurIPS 2024, https://arxiv.org/abs/2409.05976.
    """
    items, p = _clients(clients, weights, "flora_stack")
    out = {}
    for path, entries in by_path(items, "flora_stack").items():
        if len(entries) != len(items):
            raise ValueError(f"flora_stack: leaf '{path}' is adapted by only some clients.")
        a = jnp.concatenate([p[e.index] * e.scale * e.a for e in entries], axis=-1)
        b = jnp.concatenate([e.b for e in entries], axis=-2)
        out[path] = (entries[0].site, a, b, None)
    return lora_adapters(out)


def lora_fair(
    clients: Any, weights: Sequence[float] | None = None, *, ridge: float = 1e-6
) -> Adapters:
    r"""LoRA-FAIR: FedAvg's ``Ā`` with a refined ``B̄ + ΔB`` closest to the ideal update.

    .. math:: ΔB = \arg\min_{ΔB} \lVert \bar A(\bar B + ΔB) - \textstyle\sum_k p_k A_k B_k
       \rVert_F^2 + λ \lVert ΔB \rVert_F^2
       = (\bar A^\top \bar A + λ I)^{-1} \bar A^\top \big(\textstyle\sum_k p_k A_k B_k
       - \bar A \bar B\big)

    with ``λ = ridge · tr(ĀᵀĀ)/r``; computed factored (``ĀᵀA_k`` is ``r × r_k``), never
    forming the ideal ``in × out`` update. The paper's server objective is a similarity term
    plus ``λ‖ΔB‖``; its exact similarity and solver were not available (no public code), so
    this is the least-squares reading, the best ``B`` for the fixed ``Ā``. The refined pair is
    both the global adapter and the next round's client start.

    Args:
      clients: LoRA client adapters of one layout.
      weights: per-client weights, normalised; default equal.
      ridge: relative regulariser ``λ`` (0: the plain least-squares fit).

    Returns:
      :class:`~lowrank_jax.reparam.Adapters` of the clients' layout.

    Reference: Bian et al., ICCV 2025, https://arxiv.org/abs/2411.14961.
    """
    what = "lora_fair"
    items, p = _clients(clients, weights, what)
    _same_sites(items, what)
    averaged = fedavg(items, p)
    trainable = dict(averaged.trainable)
    for path, entries in by_path(items, what).items():
        a_bar = sum(pk * e.a for pk, e in zip(p, entries))
        b_bar = sum(pk * e.b for pk, e in zip(p, entries))
        at_target = sum(pk * (jnp.swapaxes(a_bar, -1, -2) @ e.a) @ e.b for pk, e in zip(p, entries))
        gram = jnp.swapaxes(a_bar, -1, -2) @ a_bar
        r = gram.shape[-1]
        lam = ridge * jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None] / r
        rhs = at_target - gram @ b_bar
        correction = _per_matrix(
            lambda g, y: jnp.linalg.lstsq(g, y)[0], gram + lam * jnp.eye(r), rhs
        )
        refined = dict(trainable[path])
        refined["B"] = (b_bar + correction).astype(refined["B"].dtype)
        trainable[path] = refined
    return averaged.replace(trainable=trainable)


def aggregation_gap(
    params: Any, aggregated: Adapters, clients: Any, weights: Sequence[float] | None = None
) -> dict[str, jax.Array]:
    r"""``‖ΔK_agg - Σ_k p_k ΔK_k‖_F / ‖Σ_k p_k ΔK_k‖_F`` per leaf (0: exact aggregation).

    Works for any method: the updates are ``apply(params, ·) - params``. Jittable (the values
    are scalar arrays).

    Args:
      params: the shared base parameters.
      aggregated: the server's adapters.
      clients: the client adapters.
      weights: per-client weights, normalised; default equal.

    Returns:
      ``{path: relative error}`` over the aggregate's leaves.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((6, 4))}
      >>> _, c0 = reparam.lora(rank=2).init(jax.random.key(0), params)
      >>> c1 = c0.replace(trainable={"w": {"A": c0.trainable["w"]["A"], "B": jnp.ones((2, 4))}})
      >>> gap = reparam.aggregation_gap(params, reparam.flora_stack([c0, c1]), [c0, c1])
      >>> bool(gap["w"] < 1e-6)
      True
    """
    items, p = _clients(clients, weights, "aggregation_gap")
    base = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def updates(adapters: Adapters) -> dict:
        flat = jax.tree_util.tree_flatten_with_path(apply(params, adapters))[0]
        return {path_str(kp): f32(x) - f32(base[path_str(kp)]) for kp, x in flat}

    got = updates(aggregated)
    ideal = [updates(c) for c in items]
    out = {}
    for site in aggregated.sites:
        want = sum(pk * u[site.path] for pk, u in zip(p, ideal))
        error = jnp.linalg.norm(got[site.path] - want)
        out[site.path] = error / jnp.maximum(jnp.linalg.norm(want), 1e-30)
    return out


def dp_fedavg(
    server: Adapters,
    clients: Any,
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    key: jax.Array,
) -> Adapters:
    r"""DP-FedAvg: the mean of clipped client updates plus Gaussian noise (central DP).

    .. math:: θ' = θ + \frac1K \Big(\sum_k \operatorname{clip}_C(θ_k - θ)
       + \mathcal N(0, σ^2 C^2 I)\Big)

    through ``optax.contrib.differentially_private_aggregate`` (each client's trainable update
    is one "example", clipped to global norm ``C``). With FFA-LoRA only ``B`` is noised and
    the noise enters ``ΔK`` linearly; with LoRA it also multiplies into ``A B``.

    Args:
      server: the global adapters the clients started from this round.
      clients: their trained adapters (same layout and frozen part).
      l2_norm_clip: ``C``.
      noise_multiplier: ``σ``.
      key: PRNG key of this round's noise.

    Returns:
      The new global :class:`~lowrank_jax.reparam.Adapters`.

    Reference: McMahan et al., ICLR 2018, https://arxiv.org/abs/1710.06963.
    """
    what = "dp_fedavg"
    items, _ = adapter_list(clients, None, what)
    _same_sites([server, *items], what)
    _check_frozen([server, *items], what)
    stacked = jax.tree.map(
        lambda g, *xs: jnp.stack([f32(x) - f32(g) for x in xs]),
        server.trainable,
        *(c.trainable for c in items),
    )
    tx = optax.contrib.differentially_private_aggregate(l2_norm_clip, noise_multiplier, key)
    mean, _ = tx.update(stacked, tx.init(server.trainable))
    trainable = jax.tree.map(lambda g, u: (f32(g) + u).astype(g.dtype), server.trainable, mean)
    return server.replace(trainable=trainable)
