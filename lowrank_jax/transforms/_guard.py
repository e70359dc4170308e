"""Skipping a non-finite train step inside the projected core instead of around the update.

The train step (:func:`lowrank_jax.train.make_train_step`) skips a step whose loss or gradients
are not finite. Around an elementwise optimizer (AdamW) a ``lax.cond`` over the whole update
does it for free: each leaf is updated in place. Around a projected-gradient method it does
not: the gradients are the cond's operands, so they stay alive until the last leaf is done and
the full-size projected-back updates cannot take their buffers (+3.2 GB of temporaries for
GaLore at ``llama_1b``, float32).

So the step first traces the update inside :func:`nonfinite_guard`. A
:class:`~lowrank_jax.transforms._lowrank.ProjectedCore` that finds the guard open applies it
itself, where it is cheap:

- the low-rank state (small) is kept by a select, and the update is computed unconditionally,
  so the projected-back updates reuse the gradients' buffers as without a guard;
- the untargeted leaves (embeddings, head, norms: elementwise updates) go through a
  ``lax.cond``, as the whole AdamW step does;
- the projector refresh and the step count do not advance on a skipped step.

It records the state leaves it has guarded (:meth:`Guard.own`); the step selects the other
state leaves (the small states of the rest of the chain: schedule counts, hyperparameters)
and zeroes the updates, so a skipped step leaves the parameters and the whole state exactly as
they were. When no core claims the guard (any other optax transformation), the step discards
that trace and falls back to the ``lax.cond`` around the update.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.kernels import _dispatch


class Guard:
    """The open guard of one train step: the ``finite`` flag and the state leaves owned."""

    def __init__(self, finite: jax.Array):
        self.finite = finite
        self.used = False
        # a core whose update is elementwise (APOLLO): on a TPU the whole-update cond is leaner
        self.whole_cond_on_tpu = False
        self._owned: dict[int, Any] = {}  # id -> leaf (held, so the ids stay unique)

    def own(self, tree: Any) -> Any:
        """Marks every leaf of ``tree`` as already guarded; returns ``tree``."""
        self.used = True
        self._owned.update((id(x), x) for x in jax.tree.leaves(tree))
        return tree

    def owns(self, leaf: Any) -> bool:
        return self._owned.get(id(leaf)) is leaf

    def keep(self, new: Any, old: Any) -> Any:
        """``new`` where the step is finite, else ``old`` (leafwise select)."""
        return jax.tree.map(lambda n, o: jnp.where(self.finite, n, o), new, old)


_GUARD: contextvars.ContextVar[Guard | None] = contextvars.ContextVar(
    "nonfinite_guard", default=None
)


@contextlib.contextmanager
def nonfinite_guard(finite: jax.Array) -> Iterator[Guard]:
    """Within the block, projected-gradient cores skip their update when ``finite`` is False."""
    guard = Guard(finite)
    token = _GUARD.set(guard)
    try:
        yield guard
    finally:
        _GUARD.reset(token)


def current() -> Guard | None:
    """The guard open in this context, if any."""
    return _GUARD.get()


def cond(guard: Guard, step: Callable[[], tuple[Any, Any]], old_state: Any) -> tuple[Any, Any]:
    """``step()`` (``(updates, new_state)``) when the step is finite, else zero updates and
    ``old_state``, through a ``lax.cond`` (the state is updated in place)."""
    shapes = jax.eval_shape(step)[0]
    skip = lambda: (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), old_state)
    return jax.lax.cond(guard.finite, step, skip)


# Where an elementwise update is guarded by a select rather than a cond (see elementwise).
SELECT_PLATFORMS = ("tpu",)


def elementwise(
    guard: Guard, step: Callable[[], tuple[Any, Any]], old_state: Any, then: Any = None
) -> tuple[Any, Any, Any]:
    """:func:`cond` for an elementwise update (Adam on the untargeted leaves), except on a TPU,
    where a select keeps it in place better: ``llama_60m``, bf16, one v5e chip, GaLore's peak
    is 411.8 MB with the select against 459.6 MB with the cond (XLA:CPU at ``llama_1b``,
    float32: 7.56 GB of temporaries with the select, 7.34 with the cond).

    An update that runs a Pallas kernel (the fused 8-bit Adam, which writes the moments into
    their own buffers) always takes the cond: a select needs the old moments kept beside the
    new ones, so XLA copies them before the kernel (8-bit GaLore at ``llama_60m`` on the v5e:
    504.6 MB with the select, 422.5 with the cond; Q-GaLore 522.5 and 430.7).

    Returns ``(updates, new_state, then)``. ``then`` (the projected leaves' gradients) is
    returned through an optimization barrier with the new state, so this update is done before
    anything computed from ``then``: the untargeted leaves' gradients (the embedding's, the last
    of the backward pass) die before the projected-back updates are made instead of waiting
    through them, as the guard's dependence on every gradient otherwise makes them do.
    GaLore at ``llama_60m`` on the v5e: 391.6 MB against 411.7 (AdamW 459.8; no guard 385.9);
    Fira 398.0 against 429.2. Not after a Pallas kernel: 8-bit GaLore 473.8 MB with the
    barrier against 422.5 without, Q-GaLore 457.6 against 430.7."""
    with _dispatch.record_choices() as in_place:
        jax.eval_shape(step)
    if in_place:
        updates, new_state = cond(guard, step, old_state)
        return updates, new_state, then

    def select() -> tuple[Any, Any]:
        updates, new_state = step()
        return updates, guard.keep(new_state, old_state)

    by_select = {platform: select for platform in SELECT_PLATFORMS}
    updates, new_state = jax.lax.platform_dependent(
        default=lambda: cond(guard, step, old_state), **by_select
    )
    if then is not None:
        new_state, then = jax.lax.optimization_barrier((new_state, then))
    return updates, new_state, then


def guarded_apply(
    tx: Any, grads: Any, opt_state: Any, params: Any, finite: jax.Array
) -> tuple[Any, Any]:
    """``(params, opt_state)`` after ``tx``'s update, or both as they were when ``finite`` is
    False: through the projected cores' own guard when ``tx`` has one, else through a
    ``lax.cond`` around the whole update."""
    with nonfinite_guard(finite) as guard:
        updates, new_state = tx.update(grads, opt_state, params)

    def apply() -> tuple[Any, Any]:
        updates, new_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state

    whole = lambda: jax.lax.cond(finite, apply, lambda: (params, opt_state))
    if not guard.used:
        return whole()
    own = lambda: _finish(guard, params, updates, new_state, opt_state)
    if guard.whole_cond_on_tpu and _dispatch.lowering_target() == "tpu":
        # APOLLO, llama_60m, bf16, one v5e chip: peak 371 MB with the whole-update cond, 500
        # with the core's guard (XLA:CPU, llama_1b, float32: 10.73 against 8.60 GB). Decided
        # when tracing: a lax.platform_dependent between the two measured 516 MB.
        return whole()
    return own()


def _finish(guard: Guard, params: Any, updates: Any, new_state: Any, old_state: Any):
    """``(params, state)`` after a guarded update: the updates zeroed and the state leaves the
    cores did not own selected back when the step is not finite."""
    zero = lambda u: jnp.where(guard.finite, u, jnp.zeros_like(u))
    params = optax.apply_updates(params, jax.tree.map(zero, updates))
    state = jax.tree.map(
        lambda n, o: n if n is o or guard.owns(n) else jnp.where(guard.finite, n, o),
        new_state,
        old_state,
    )
    return params, state
