r"""Serving many LoRA adapters in one batch (S-LoRA's computation): an adapter per row.

.. math:: y_t = x_t W + b + s_i\,(x_t A_i) B_i, \qquad i = \text{the adapter of } t\text{'s row}

:func:`adapter_bank` stacks ``N`` plain LoRA adapters per leaf into ``A: (N+1, in, r_max)``,
``B: (N+1, r_max, out)`` -- ranks zero-padded to the largest (or to ``rank``), scales folded
into ``B``, slot ``N`` all zero for rows without an adapter (PEFT's ``"__base__"``); zero
padding is exact. :func:`wrap_batched` puts the bank into an NNX model (``nnx.Linear``
layers); inside :func:`use_adapters` every row of the batch runs its own adapter in one
forward, through :func:`lowrank_jax.kernels.lora_batched.lora_batched` (Triton kernels on a
GPU, the jnp reference elsewhere). Switching adapters is new ids (or a new bank of the same
shapes), never a retrace.

References:
  Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters", MLSys 2024.
  Chen et al., "Punica: Multi-Tenant LoRA Serving", MLSys 2024.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.kernels.lora_batched import lora_batched
from lowrank_jax.reparam._algebra import adapter_list, by_path
from lowrank_jax.reparam.nnx import FrozenAdapter

__all__ = ["AdapterBank", "BatchedLoRA", "adapter_bank", "use_adapters", "wrap_batched"]

BASE = "__base__"
_IDS: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("adapter_ids", default=None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """Stacked adapters: ``a[path]: (N+1, in, r)``, ``b[path]: (N+1, r, out)`` (scales folded,
    slot ``N`` zero); ``names`` (static) gives each slot's adapter.

    :meth:`ids` maps names (``"__base__"`` or ``None``: no adapter) to slot indices.
    """

    a: dict
    b: dict
    names: tuple = dataclasses.field(metadata={"static": True})

    def ids(self, names: Sequence[str | None]) -> jax.Array:
        """Slot indices of ``names`` (``"__base__"``/``None``: the zero slot)."""
        table = {n: i for i, n in enumerate(self.names)}
        out = []
        for n in names:
            if n is None or n == BASE:
                out.append(len(self.names))
            elif n in table:
                out.append(table[n])
            else:
                raise ValueError(f"no adapter named {n!r} in the bank; have {list(self.names)}.")
        return jnp.asarray(out, jnp.int32)

    @property
    def rank(self) -> int:
        return int(next(iter(self.a.values())).shape[-1])


def adapter_bank(
    adapters: Mapping[str, Any] | Sequence[Any], *, rank: int | None = None
) -> AdapterBank:
    """Stacks plain LoRA adapters (one base, 2-D kernels) for batched serving.

    Args:
      adapters: ``name -> Adapters`` (or a sequence: named ``"0"``, ``"1"``, ...).
      rank: pad every rank to this (default: the largest; a power of 2 lets the GPU kernel
        run, see :func:`lowrank_jax.kernels.lora_batched.lora_batched`).

    Returns:
      An :class:`AdapterBank`; a leaf missing from an adapter gets zeros there.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"q": {"kernel": jnp.ones((8, 8))}}
      >>> bank = reparam.adapter_bank({
      ...     "en": reparam.lora(rank=2).init(jax.random.key(0), params)[1],
      ...     "de": reparam.lora(rank=4).init(jax.random.key(1), params)[1]})
      >>> bank.a["q/kernel"].shape, bank.ids(["de", "__base__", "en"]).tolist()
      ((3, 8, 4), [1, 2, 0])
    """
    names = [str(n) for n in adapters] if isinstance(adapters, Mapping) else None
    items, _ = adapter_list(adapters, None, "adapter_bank")
    names = names or [str(i) for i in range(len(items))]
    table = by_path(items, "adapter_bank")
    r = max(e.a.shape[-1] for entries in table.values() for e in entries)
    if rank is not None:
        if rank < r:
            raise ValueError(f"adapter_bank: rank={rank} is below the largest adapter rank {r}.")
        r = rank
    a_out, b_out = {}, {}
    for path, entries in table.items():
        site = entries[0].site
        if len(site.canonical_shape) != 2:
            raise ValueError(
                f"adapter_bank: leaf '{path}' has shape {site.shape}; batched serving adapts "
                f"2-D kernels (nnx.Linear)."
            )
        n_in, n_out = site.canonical_shape
        a = np.zeros((len(items) + 1, n_in, r), np.float32)
        b = np.zeros((len(items) + 1, r, n_out), np.float32)
        for e in entries:
            k = e.a.shape[-1]
            a[e.index, :, :k] = np.asarray(e.a)
            b[e.index, :k, :] = e.scale * np.asarray(e.b)
        a_out[path], b_out[path] = jnp.asarray(a), jnp.asarray(b)
    return AdapterBank(a_out, b_out, tuple(names))


@contextlib.contextmanager
def use_adapters(ids: jax.Array) -> Iterator[None]:
    """Inside the block, batched layers give row ``j`` of the batch adapter slot ``ids[j]``.

    Use it inside the jitted function (the ids may be traced):

    Example::

        @nnx.jit
        def forward(model, x, ids):
            with reparam.use_adapters(ids):
                return model(x)

        y = forward(model, x, bank.ids(["en", "__base__", "de"]))
    """
    token = _IDS.set(jnp.asarray(ids))
    try:
        yield
    finally:
        _IDS.reset(token)


class BatchedLoRA(nnx.Module):
    """An ``nnx.Linear`` plus a bank of adapters, one chosen per batch row (see the module).

    Args:
      base: the layer.
      a, b: its bank slices ``(N+1, in, r)``, ``(N+1, r, out)`` (kept as ``FrozenAdapter``).
      path: the kernel path (for messages).
      mode: kernel mode of :func:`~lowrank_jax.kernels.lora_batched.lora_batched`.
    """

    def __init__(self, base: nnx.Linear, a: jax.Array, b: jax.Array, *, path: str = "",
                 mode: str | None = None):  # fmt: skip
        self.base, self.path, self.mode = base, path, mode
        self.bank_a, self.bank_b = FrozenAdapter(a), FrozenAdapter(b)

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        if out_sharding is not None:
            raise ValueError("batched layers do not take out_sharding; shard the inputs instead.")
        y = self.base(x)
        ids = _IDS.get()
        if ids is None:
            raise ValueError(
                f"leaf '{self.path}' serves a bank of adapters: call the model inside "
                f"reparam.use_adapters(ids) with one adapter slot per batch row."
            )
        if ids.shape != x.shape[:1]:
            raise ValueError(
                f"leaf '{self.path}': use_adapters got ids of shape {ids.shape} for a batch of "
                f"{x.shape[0]} rows; give one slot per row."
            )
        tokens = x.reshape(-1, x.shape[-1])
        per_token = jnp.repeat(ids.astype(jnp.int32), tokens.shape[0] // x.shape[0])
        low = lora_batched(tokens, self.bank_a[...], self.bank_b[...], per_token, mode=self.mode)
        return y + low.reshape(*y.shape).astype(y.dtype)


def wrap_batched(model: Any, bank: AdapterBank, *, mode: str | None = None) -> Any:
    """Replaces the ``nnx.Linear`` layers of ``model`` that ``bank`` adapts by
    :class:`BatchedLoRA` layers; call the result inside :func:`use_adapters`.

    Args:
      model: an NNX module (unstacked ``nnx.Linear`` layers at the bank's leaves).
      bank: from :func:`adapter_bank` on this model's parameters.
      mode: kernel mode (default: the one in force when the model runs).

    Returns:
      The wrapped model (sharing variables with ``model``).
    """
    done: set[str] = set()

    def swap(path: tuple, node: Any) -> Any:
        kernel = "/".join(str(p) for p in path) + "/kernel"
        if kernel not in bank.a or not isinstance(node, nnx.Module):
            return node
        if not isinstance(node, nnx.Linear) or node.kernel.shape != bank.a[kernel].shape[1:2] + (
            bank.b[kernel].shape[-1],
        ):
            raise ValueError(
                f"wrap_batched: leaf '{kernel}' is not an nnx.Linear of the bank's shape; the "
                f"bank was built for another model."
            )
        done.add(kernel)
        return BatchedLoRA(node, bank.a[kernel], bank.b[kernel], path=kernel, mode=mode)

    wrapped = nnx.recursive_map(swap, model)
    missing = sorted(set(bank.a) - done)
    if missing:
        raise ValueError(f"wrap_batched: the model has no nnx.Linear at {missing}.")
    return wrapped
