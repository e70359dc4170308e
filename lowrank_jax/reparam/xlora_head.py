r"""X-LoRA: a scaling head over frozen LoRA experts, run in two passes (PEFT's ``xlora``).

1. *Scaling pass*: the model runs with its experts off (PEFT disables the adapter layers and
   runs without gradient) and the last hidden state ``h`` (the input of ``hidden_from``,
   e.g. ``lm_head``) is kept.
2. The head maps ``h`` to scalings ``softmax(head(h) / T)`` of shape
   ``(batch, seq, n_layers, E)`` (``layerwise=False``: one set broadcast to every layer).
3. *Real pass*: every X-LoRA layer ``l`` adds ``w_g Σ_e g_{t,l,e} s_e (x A_e) B_e`` with its
   scalings (after optional top-``k`` and re-softmax, :func:`~lowrank_jax.reparam.xlora`).

The head is ``Linear(hidden, E·[n_layers])`` for ``depth = 1``, else ``depth - 1`` hidden
``Linear → ReLU → Dropout`` blocks of width ``size`` first (PEFT: ``xlora_depth``,
``xlora_size``, ``xlora_dropout_p``). Only the head trains (its parameters are
``nnx.LoRAParam``; the experts are frozen). ``n_layers`` counts adapted modules, ordered by
their kernel paths (natural order).

Reference:
  Buehler & Buehler, "X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible Framework for
  Large Language Models", 2024, https://arxiv.org/abs/2402.07148
"""

from __future__ import annotations

import contextvars
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.reparam.experts import routed_layers
from lowrank_jax.reparam.routing import _EXTERNAL

__all__ = ["XLoRA"]

_TAPPED: contextvars.ContextVar[list | None] = contextvars.ContextVar("xlora_tap", default=None)


class _Tap(nnx.Module):
    """Wraps the module whose input is the hidden state; records it during the scaling pass."""

    def __init__(self, module: Any):
        self.module = module

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> Any:
        sink = _TAPPED.get()
        if sink is not None:
            sink.append(x)
        return self.module(x, *args, **kwargs)


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    layer = nnx.Linear(n_in, n_out, rngs=rngs)
    layer.kernel = nnx.LoRAParam(layer.kernel[...])
    layer.bias = nnx.LoRAParam(layer.bias[...])
    return layer


class XLoRA(nnx.Module):
    """A model with X-LoRA layers (:func:`~lowrank_jax.reparam.wrap_experts` with
    :func:`~lowrank_jax.reparam.xlora`) plus its scaling head; see the module docstring.

    Args:
      model: the wrapped model; called as ``model(*args, **kwargs)``.
      hidden_size: width of the hidden state the head reads.
      hidden_from: attribute path (``"lm_head"``, ``"a/b"``) of the module whose *input* is the
        last hidden state.
      layerwise: one set of scalings per X-LoRA layer (else shared).
      depth, size, dropout: the head (PEFT ``xlora_depth=1``, ``xlora_size=2048``,
        ``xlora_dropout_p=0.2``).
      softmax, temperature: softmax over experts with temperature ``T``.
      global_scaling_weight: ``w_g``.
      rngs: ``nnx.Rngs`` (``params``, ``dropout``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from lowrank_jax import reparam
      >>> class Net(nnx.Module):
      ...   def __init__(self):
      ...     self.up = nnx.Linear(6, 6, rngs=nnx.Rngs(0))
      ...     self.lm_head = nnx.Linear(6, 5, rngs=nnx.Rngs(1))
      ...   def __call__(self, x): return self.lm_head(self.up(x))
      >>> net = Net()
      >>> p = nnx.to_pure_dict(nnx.state(net, nnx.Param))
      >>> experts = [reparam.lora(rank=2, targets="up").init(jax.random.key(k), p)[1]
      ...            for k in range(3)]
      >>> net = reparam.wrap_experts(net, reparam.xlora(3), experts=experts)
      >>> model = reparam.XLoRA(net, hidden_size=6, rngs=nnx.Rngs(2))
      >>> model(jnp.ones((2, 4, 6))).shape
      (2, 4, 5)
    """

    def __init__(
        self,
        model: Any,
        *,
        hidden_size: int,
        hidden_from: str = "lm_head",
        layerwise: bool = False,
        depth: int = 1,
        size: int = 2048,
        dropout: float = 0.2,
        softmax: bool = True,
        temperature: float = 1.0,
        global_scaling_weight: float = 1.0,
        rngs: nnx.Rngs,
    ):
        layers = [n for n in routed_layers(model) if n.routing.gating == "external"]
        if not layers:
            raise ValueError(
                "XLoRA: the model has no X-LoRA layers; wrap_experts(model, xlora(E))."
            )
        counts = {n.routing.num_experts for n in layers}
        if len(counts) != 1:
            raise ValueError(f"XLoRA: every X-LoRA layer needs the same experts, got {counts}.")
        if depth < 1:
            raise ValueError(f"XLoRA: depth must be >= 1, got {depth}.")
        for i, layer in enumerate(layers):
            layer.index = i
        self.num_experts, self.num_layers = counts.pop(), len(layers)
        self.layerwise, self.softmax, self.temperature = layerwise, softmax, temperature
        self.global_scaling_weight = global_scaling_weight
        self.model = _tap(model, hidden_from)
        width = self.num_experts * (self.num_layers if layerwise else 1)
        sizes = [hidden_size] + [size] * (depth - 1) + [width]
        self.head = nnx.List([_linear(a, b, rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.head_dropout = nnx.Dropout(dropout, rngs=rngs) if dropout and depth > 1 else None

    def scalings(self, hidden: jax.Array) -> jax.Array:
        """``(batch, seq, n_layers, E)`` scalings from the hidden state ``(batch, seq, hidden)``."""
        h = hidden
        for i, layer in enumerate(self.head):
            h = layer(h)
            if i < len(self.head) - 1:
                h = jax.nn.relu(h)
                if self.head_dropout is not None:
                    h = self.head_dropout(h)
        if self.layerwise:
            h = h.reshape(*h.shape[:-1], self.num_layers, self.num_experts)
        else:
            h = jnp.broadcast_to(h[..., None, :], (*h.shape[:-1], self.num_layers, h.shape[-1]))
        if self.softmax:
            h = jax.nn.softmax(h.astype(jnp.float32) / self.temperature, axis=-1)
        return h

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hidden = self.hidden(*args, **kwargs)
        scalings = self.scalings(hidden)
        token = _EXTERNAL.set({"scalings": scalings, "weight": self.global_scaling_weight})
        try:
            return self.model(*args, **kwargs)
        finally:
            _EXTERNAL.reset(token)

    def hidden(self, *args: Any, **kwargs: Any) -> jax.Array:
        """The scaling pass: the last hidden state with every expert off (no gradient)."""
        sink: list = []
        tap, off = _TAPPED.set(sink), _EXTERNAL.set({"scalings": None, "weight": 0.0})
        try:
            self.model(*args, **kwargs)
        finally:
            _TAPPED.reset(tap)
            _EXTERNAL.reset(off)
        if len(sink) != 1:
            raise ValueError(f"XLoRA: the hidden-state module ran {len(sink)} times, expected 1.")
        return jax.lax.stop_gradient(sink[0])


def _tap(model: Any, hidden_from: str) -> Any:
    parts = hidden_from.split("/")
    parent = model
    for p in parts[:-1]:
        parent = parent[int(p)] if p.isdigit() else getattr(parent, p, None)
    target = getattr(parent, parts[-1], None) if parent is not None else None
    if target is None or not callable(target):
        raise ValueError(
            f"XLoRA: hidden_from={hidden_from!r} names no submodule of the model; give the "
            f"attribute path of the module whose input is the last hidden state (e.g. 'lm_head')."
        )
    if not isinstance(target, _Tap):
        setattr(parent, parts[-1], _Tap(target))
    return model
