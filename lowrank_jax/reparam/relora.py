r"""ReLoRA: high-rank training from low-rank updates by periodic merge-and-restart.

Every ``T`` steps: merge ``s·AB`` into the base (float32 accumulation), re-initialise the
adapters (``A`` random, ``B = 0``, so the model does not change), and prune the optimizer state
of the adapters -- by magnitude, keeping the largest ``1 - ratio`` of each moment tensor (the
paper prunes 99%) -- so the next cycle's updates are not dominated by the old subspace. A jagged
cosine schedule re-warms the learning rate after each restart. The sum of the merged updates
has rank up to ``cycles × r``.

Train-loop API (all jittable; ``opt_state`` is ``tx``'s state over ``adapters.trainable``)::

    relora = reparam.ReLoRA(reparam.lora(rank=8), every=1000)
    tx = optax.adamw(reparam.jagged_cosine_schedule(1e-3, total, 100, 1000, 50))
    ...
    params, adapters, opt_state = relora.maybe_restart(step, key, params, adapters, opt_state, tx)

Reference: Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates", ICLR 2024.
https://arxiv.org/abs/2307.05695
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.reparam.core import Adapters, merge
from lowrank_jax.reparam.method import uniform
from lowrank_jax.reparam.wrapper import Reparam

__all__ = ["ReLoRA", "jagged_cosine_schedule", "prune_optimizer_state"]


def _prune(x: jax.Array, ratio: float, how: str, key: jax.Array) -> jax.Array:
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0:
        return x
    if how == "zero":
        return jnp.zeros_like(x)
    if how == "random":
        return jnp.where(uniform(key, x.shape, 1.0) >= 2.0 * ratio - 1.0, x, 0)
    threshold = jnp.quantile(jnp.abs(x).astype(jnp.float32).ravel(), ratio)
    return jnp.where(jnp.abs(x) > threshold, x, 0)


def prune_optimizer_state(
    tx: optax.GradientTransformation,
    opt_state: Any,
    *,
    ratio: float = 0.99,
    how: str = "magnitude",
    key: jax.Array | None = None,
) -> Any:
    """Prunes every parameter-shaped tensor of ``opt_state`` (Adam's ``mu``, ``nu``, ...).

    Args:
      tx: the optimizer whose state it is (used to tell parameter-shaped leaves from counts).
      opt_state: its state.
      ratio: the fraction of entries zeroed per tensor.
      how: ``"magnitude"`` (the paper: zero all but the largest-magnitude ``1 - ratio``),
        ``"random"`` (zero a random ``ratio``; needs ``key``) or ``"zero"`` (full reset).
      key: PRNG key for ``how="random"``.

    Returns:
      The pruned state; counters and other non-parameter leaves are untouched.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from lowrank_jax import reparam
      >>> tx = optax.adam(1e-3)
      >>> state = tx.init({"B": jnp.zeros(4)})
      >>> state = (state[0]._replace(mu={"B": jnp.array([0.1, -3.0, 0.2, 2.0])}), state[1])
      >>> reparam.prune_optimizer_state(tx, state, ratio=0.5)[0].mu["B"].tolist()
      [0.0, -3.0, 0.0, 2.0]
    """
    if how not in ("magnitude", "random", "zero"):
        raise ValueError(f"how must be 'magnitude', 'random' or 'zero', got {how!r}.")
    if how == "random" and key is None:
        raise ValueError("how='random' needs a key.")
    counter = [0]

    def one(x: Any) -> Any:
        counter[0] += 1
        sub = None if key is None else jax.random.fold_in(key, counter[0])
        return _prune(x, ratio, how, sub)

    return optax.tree_utils.tree_map_params(tx, one, opt_state)


@dataclasses.dataclass(frozen=True)
class ReLoRA:
    """Merge-and-restart around a LoRA-type :class:`~lowrank_jax.reparam.Reparam`.

    Attributes:
      reparam: the reparam whose ``init`` re-creates the adapters at each restart.
      every: ``T``, steps between restarts.
      prune_ratio: fraction of each optimizer-state tensor zeroed at a restart.
      prune: ``"magnitude"``, ``"random"`` or ``"zero"`` (see :func:`prune_optimizer_state`).
    """

    reparam: Reparam
    every: int
    prune_ratio: float = 0.99
    prune: str = "magnitude"

    def restart(
        self, key: jax.Array, params: Any, adapters: Adapters, opt_state: Any, tx: Any
    ) -> tuple[Any, Adapters, Any]:
        """Merges, re-initialises and prunes; returns ``(params, adapters, opt_state)``."""
        merged, _ = merge(params, adapters)
        key_init, key_prune = jax.random.split(key)
        merged, fresh = self.reparam.init(key_init, merged)
        if jax.tree.structure(fresh) != jax.tree.structure(adapters):
            raise ValueError(
                "ReLoRA: re-initialised adapters differ in structure from the current ones; "
                "use the same reparam (and params tree) as the initial init."
            )
        opt_state = prune_optimizer_state(
            tx, opt_state, ratio=self.prune_ratio, how=self.prune, key=key_prune
        )
        return merged, fresh, opt_state

    def maybe_restart(
        self,
        step: jax.Array,
        key: jax.Array,
        params: Any,
        adapters: Adapters,
        opt_state: Any,
        tx: Any,
    ) -> tuple[Any, Adapters, Any]:
        """:meth:`restart` when ``step > 0`` and ``step % every == 0`` (``lax.cond``), else
        the inputs unchanged; one compile for the whole run."""
        due = jnp.logical_and(step > 0, step % self.every == 0)
        sub = jax.random.fold_in(key, step)
        return jax.lax.cond(
            due,
            lambda ops: self.restart(sub, *ops, tx),
            lambda ops: ops,
            (params, adapters, opt_state),
        )


def jagged_cosine_schedule(
    peak_value: float,
    total_steps: int,
    warmup_steps: int,
    restart_every: int,
    restart_warmup_steps: int,
    min_ratio: float = 0.1,
) -> optax.Schedule:
    r"""ReLoRA's jagged cosine: one cosine decay to ``min_ratio·peak``, a linear warmup at the
    start, and a short linear re-warmup after every restart.

    .. math:: \eta_t = \eta\,(\rho + (1-\rho)\tfrac12(1+\cos\pi p_t))\cdot
       \min(1, \tfrac{t}{t_w})\cdot \min(1, \tfrac{t \bmod T}{t_r})_{[t \ge T]}
    """

    def schedule(step: Any) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((t - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        cosine = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        warm = jnp.minimum(1.0, t / max(warmup_steps, 1))
        since = jnp.mod(t, restart_every)
        rewarm = jnp.minimum(1.0, since / max(restart_warmup_steps, 1))
        rewarm = jnp.where(t >= restart_every, rewarm, 1.0)
        return peak_value * cosine * warm * rewarm

    return schedule
