r"""MoS: mixture of shards -- per-layer LoRA factors assembled from a pool shared across layers.

For a leaf of ``L`` stacked layers (``[L, in, out]``; a 2-D leaf is ``L = 1``) with ``l`` shards per
vector (``shards``), equivalent rank ``r_v`` and private rank ``r_p``, two pools are trained:

.. math::
    \mathcal{A} \in \mathbb{R}^{P\times in/l}, \quad \mathcal{B} \in \mathbb{R}^{P\times out/l},
    \qquad P = r_v\,L\,l

and layer ``ℓ`` uses rank ``r`` (> ``r_v``) factors whose ``k``-th vector concatenates the ``l``
shards ``idx[k·l .. k·l+l-1]`` ("vector sharding"):

.. math:: W'_\ell = W_\ell + s\,A_\ell B_\ell, \qquad A_\ell[:, k] = [\mathcal{A}_{i_{kl}};\dots;
   \mathcal{A}_{i_{kl+l-1}}],\quad B_\ell[k] = [\mathcal{B}_{j_{kl}};\dots], \qquad s = \alpha/r

The index vectors (``r·l`` per layer, fixed at init -- the paper's "router"; stored in the
``frozen`` tree, as the reference's ``lora_pair_mask{,_B}``) are: the first ``(r - r_p)·l`` a random
draw without replacement from the shared region ``[0, S)``, ``S = (r_v - r_p)·L·l``, drawn
independently for ``A`` and ``B`` ("pair dissociation") and per layer; the last ``r_p·l`` the
layer's private range ``[S + ℓ·r_p·l, S + (ℓ+1)·r_p·l)`` ("shard privatization"), the same for
``A`` and ``B``. With ``r_p = r_v`` there is no shared region and ``r`` must equal ``r_v``. Init as
the reference: ``𝒜`` Kaiming-uniform with fan-in ``in`` (``U(±1/√in)``), ``ℬ = 0`` (a no-op); its
random scaling vector (``lora_A_vec``) is asserted off in the released code and not implemented.
Trainable parameters ``r_v·L·(in + out)`` per leaf: a rank-``r_v`` LoRA's, while every layer
adapts at rank ``r``. The pools receive the summed gradients of every layer that indexes a shard.

Sharing is across the layers of one leaf (one projection type of a stacked model: the reference
keeps one pool per projection type for all layers); separate leaves have separate pools.
:func:`mos_to_lora` exports the de-sharded per-layer factors as a plain LoRA (the reference's
``save_tied_lora``).

Reference: Wang et al., "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture
of Shards", ICLR 2025. https://arxiv.org/abs/2410.00938 (code: Forence1999/MoS,
``modules/Tied_LoRA.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.reparam import _validate as check
from lowrank_jax.reparam.core import Adapters
from lowrank_jax.reparam.lora import LoRA
from lowrank_jax.reparam.method import Method, f32, kaiming_uniform, register
from lowrank_jax.reparam.wrapper import Reparam, overrides_from_patterns

__all__ = ["MoS", "mos", "mos_to_lora"]


@register
@dataclasses.dataclass(frozen=True)
class MoS(Method):
    """Per-layer factors gathered from shard pools shared by a leaf's layers (module docstring)."""

    rank: int = 8
    equivalent_rank: int = 2
    private_rank: int = 1
    shards: int = 2
    alpha: float = 8.0
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("rank", "equivalent_rank", "shards"):
            check.positive_int("MoS", name, getattr(self, name))
        if isinstance(self.private_rank, bool) or not isinstance(self.private_rank, int):
            raise ValueError(f"MoS: private_rank must be an int >= 0, got {self.private_rank!r}.")
        check.nonnegative("MoS", "private_rank", self.private_rank)
        check.nonnegative("MoS", "alpha", self.alpha)
        check.rate("MoS", "dropout", self.dropout)
        if self.private_rank > min(self.rank, self.equivalent_rank):
            raise ValueError(
                f"MoS: private_rank={self.private_rank} must not exceed rank={self.rank} or "
                f"equivalent_rank={self.equivalent_rank}."
            )
        if self.private_rank == self.equivalent_rank and self.rank != self.equivalent_rank:
            raise ValueError(
                f"MoS: with private_rank == equivalent_rank there are no shared shards, so rank "
                f"must equal equivalent_rank={self.equivalent_rank} (got {self.rank})."
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        *batch, n_in, n_out = shape
        if n_in % self.shards or n_out % self.shards:
            raise ValueError(
                f"MoS: shards={self.shards} must divide in={n_in} and out={n_out} of leaf "
                f"'{path}'; pick a common divisor or exclude the leaf with `targets=`."
            )
        layers = int(np.prod(batch))
        shared = (self.equivalent_rank - self.private_rank) * layers
        if self.rank - self.private_rank > shared:
            raise ValueError(
                f"MoS: leaf '{path}' has {layers} layer(s), so its shared pool holds "
                f"{shared} vector(s) but rank - private_rank = {self.rank - self.private_rank} "
                f"are drawn per layer; lower rank, raise equivalent_rank, or stack more layers "
                f"into the leaf (scan_layers=True)."
            )

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        *batch, n_in, n_out = w.shape
        layers, shards = int(np.prod(batch)), self.shards
        pool = self.equivalent_rank * layers * shards
        key_a, key_ia, key_ib = jax.random.split(key, 3)
        shared = (self.equivalent_rank - self.private_rank) * layers * shards
        drawn = (self.rank - self.private_rank) * shards
        private = self.private_rank * shards
        ell = np.arange(layers)[:, None]
        own = shared + ell * private + np.arange(private)[None, :]  # (layers, r_p·l)

        def indices(k: jax.Array) -> jax.Array:
            keys = jax.random.split(k, layers)
            perm = jax.vmap(lambda kk: jax.random.permutation(kk, max(shared, 1)))(keys)
            prefix = perm[:, :drawn] if shared else jnp.zeros((layers, 0), jnp.int32)
            both = jnp.concatenate([prefix.astype(jnp.int32), jnp.asarray(own, jnp.int32)], 1)
            return both.reshape(*batch, self.rank * shards)

        trainable = {
            "A_pool": kaiming_uniform(key_a, (pool, n_in // shards), n_in),
            "B_pool": jnp.zeros((pool, n_out // shards), jnp.float32),
        }
        return {"idx_A": indices(key_ia), "idx_B": indices(key_ib)}, trainable

    def factors(self, frozen: dict, trainable: dict) -> tuple[jax.Array, jax.Array]:
        """``(A_ℓ: (..., in, r), B_ℓ: (..., r, out))`` gathered from the pools."""
        idx_a, idx_b = frozen["idx_A"], frozen["idx_B"]
        batch = idx_a.shape[:-1]
        a = f32(trainable["A_pool"])[idx_a].reshape(*batch, self.rank, -1)  # row k: l shards
        b = f32(trainable["B_pool"])[idx_b].reshape(*batch, self.rank, -1)
        return jnp.swapaxes(a, -1, -2), b

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        a, b = self.factors(frozen, trainable)
        return self.scale * (a @ b)

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        a, b = self.factors(frozen, trainable)
        low = c.then(c.into(x_drop, a.astype(x.dtype)), b.astype(x.dtype))
        return c.into(x, w) + self.scale * low


def mos(
    rank: int = 8,
    equivalent_rank: int = 2,
    *,
    private_rank: int = 1,
    shards: int = 2,
    alpha: float | None = None,
    dropout: float = 0.0,
    rank_pattern: dict[str, int] | None = None,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """MoS: rank-``r`` per-layer LoRA factors from shard pools of a rank-``r_v`` budget.

    Args:
      rank: ``r``, each layer's rank.
      equivalent_rank: ``r_v`` (the reference's ``valid_param_lora_r``): the pool budget.
      private_rank: ``r_p`` (``valid_param_private_r``): vectors private to each layer.
      shards: ``l`` (``num_chunk_per_vec``): shards per vector; must divide in and out.
      alpha: ``s = α/r``; default ``rank`` (``s = 1``).
      dropout: adapter-input dropout (in :func:`~lowrank_jax.reparam.wrap` layers).
      rank_pattern: ``{regex: rank}`` per-path rank (first match).
      targets, dims, dtype: see :class:`~lowrank_jax.reparam.Reparam`.

    Returns:
      A :class:`~lowrank_jax.reparam.Reparam`; trainable parameters ``r_v·L·(in + out)`` per
      leaf of ``L`` stacked layers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"layers": {"q_proj": {"kernel": jnp.ones((4, 16, 8))}}}  # 4 stacked layers
      >>> _, adapters = reparam.mos(rank=4, equivalent_rank=2).init(jax.random.key(0), params)
      >>> reparam.num_trainable(adapters)  # 2 * 4 * (16 + 8), while every layer has rank 4
      192

    Reference: Wang et al., ICLR 2025, https://arxiv.org/abs/2410.00938.
    """
    method = MoS(
        rank=rank,
        equivalent_rank=equivalent_rank,
        private_rank=private_rank,
        shards=shards,
        alpha=float(rank if alpha is None else alpha),
        dropout=dropout,
    )
    overrides = overrides_from_patterns(rank=rank_pattern)
    return Reparam(method, targets, dims, overrides, dtype)


def mos_to_lora(adapters: Adapters) -> Adapters:
    """The de-sharded per-layer factors as plain LoRA adapters (same effective weights;
    exportable with :func:`~lowrank_jax.reparam.to_peft`)."""
    trainable, frozen, sites = dict(adapters.trainable), dict(adapters.frozen), []
    found = False
    for site in adapters.sites:
        m = site.method
        if not isinstance(m, MoS):
            sites.append(site)
            continue
        found = True
        a, b = m.factors(adapters.frozen[site.path], adapters.trainable[site.path])
        trainable[site.path], frozen[site.path] = {"A": a, "B": b}, {}
        sites.append(site._replace(method=LoRA(rank=m.rank, alpha=m.alpha, dropout=m.dropout)))
    if not found:
        raise ValueError("mos_to_lora: no MoS site in these adapters; use reparam.mos(...).")
    return Adapters(trainable, frozen, tuple(sites))
