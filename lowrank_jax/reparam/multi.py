"""Several named adapters on one base: switch, weighted merge, unmerge, delete.

An :class:`AdapterSet` is immutable: every method returns a new set. It keeps the invariants
that PEFT users trip over (peft#3498, #1355, #3763, #3608):

* at most one *merged group* (the active adapters, with their weights) is folded into
  ``params`` at a time, and its :class:`~lowrank_jax.reparam.MergeRecord` makes the unmerge
  exact -- several DoRA adapters included, because each one's norm is taken on the base;
* merging twice is a no-op; deleting or deactivating a merged adapter unmerges first;
* :meth:`AdapterSet.forward_params` always equals ``apply(base, active, weights)``, merged or
  not.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lowrank_jax.reparam.core import Adapters, MergeRecord, _contributions, apply, merge, unmerge

__all__ = ["AdapterSet"]


@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """Named adapters on one base; see the module docstring.

    Attributes:
      params: the base weights, with the merged group folded in when ``merged`` is non-empty.
      adapters: ``name -> Adapters``.
      active: the names that take part in :meth:`forward_params`, in order.
      weights: one weight per active name.
      merged: the names currently folded into ``params`` (empty or equal to ``active``).
      record: the merge record of the merged group.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((8, 4))}
      >>> _, a = reparam.lora(rank=2).init(jax.random.key(0), params)
      >>> _, b = reparam.dora(rank=2).init(jax.random.key(1), params)
      >>> bank = reparam.AdapterSet(params).add("a", a).add("b", b)
      >>> bank = bank.activate("a", "b", weights=(0.5, 0.5)).merge()  # weighted merge
      >>> bank.merged
      ('a', 'b')
    """

    params: Any
    adapters: Mapping[str, Adapters] = dataclasses.field(default_factory=dict)
    active: tuple = ()
    weights: tuple = ()
    merged: tuple = ()
    record: MergeRecord | None = None

    def add(self, name: str, adapters: Adapters) -> AdapterSet:
        """Adds ``adapters`` under ``name`` (not activated)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} exists; delete it first or pick another name.")
        _contributions(self.params, [(adapters, 1.0)])
        return dataclasses.replace(self, adapters={**self.adapters, name: adapters})

    def activate(self, *names: str, weights: Sequence[float] | None = None) -> AdapterSet:
        """Switches the active adapters (none: the bare base); a merged group not kept active,
        or kept with other weights, is unmerged first."""
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise ValueError(f"no adapter named {missing}; have {sorted(self.adapters)}.")
        weights = tuple(1.0 for _ in names) if weights is None else tuple(weights)
        if len(weights) != len(names):
            raise ValueError(f"got {len(weights)} weights for {len(names)} adapters.")
        out = self
        if self.merged and (names, weights) != (self.active, self.weights):
            out = self.unmerge()
        return dataclasses.replace(out, active=tuple(names), weights=weights)

    def forward_params(self) -> Any:
        """The weights to run: the base with every active adapter applied."""
        if not self.active or self.merged:
            return self.params
        return apply(self.params, self._active(), weights=self.weights)

    def merge(self) -> AdapterSet:
        """Folds the active adapters (with their weights) into ``params``; idempotent."""
        if self.merged or not self.active:
            return self
        params, record = merge(self.params, self._active(), weights=self.weights)
        return dataclasses.replace(self, params=params, merged=self.active, record=record)

    def unmerge(self) -> AdapterSet:
        """Restores the base weights exactly (within one rounding of their dtype)."""
        if not self.merged:
            return self
        group = [self.adapters[n] for n in self.merged]
        params = unmerge(self.params, group, self.record)
        return dataclasses.replace(self, params=params, merged=(), record=None)

    def delete(self, name: str) -> AdapterSet:
        """Removes ``name``; unmerges first if it is merged."""
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; have {sorted(self.adapters)}.")
        out = self.unmerge() if name in self.merged else self
        keep = [(n, w) for n, w in zip(out.active, out.weights) if n != name]
        return dataclasses.replace(
            out,
            adapters={n: a for n, a in out.adapters.items() if n != name},
            active=tuple(n for n, _ in keep),
            weights=tuple(w for _, w in keep),
        )

    def base(self) -> Any:
        """The base weights with nothing merged."""
        return self.unmerge().params

    def save(self, folder: str) -> None:
        """Writes each adapter to ``folder/<name>`` (see :func:`lowrank_jax.reparam.save`)."""
        from lowrank_jax.reparam.io import save

        for name, adapters in self.adapters.items():
            save(os.path.join(folder, name), adapters)

    def _active(self) -> list[Adapters]:
        return [self.adapters[n] for n in self.active]
