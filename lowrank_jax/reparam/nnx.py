"""The Flax NNX fast path: adapted layers that never build ``ΔW``.

:func:`wrap` swaps every targeted ``nnx.Linear`` / ``nnx.Einsum`` for an :class:`Adapted` layer
that computes ``x@W + s·(x@A)@B`` (or its method's factored form) directly, applies the adapter
dropout to the adapter input as PEFT does, and keeps the adapter arrays as variables:
``nnx.LoRAParam`` for the trainable ones (``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains
only them) and :class:`FrozenAdapter` for fixed factors. The original layer lives on as
``<layer>.base`` (so ``.../q_proj/kernel`` becomes ``.../q_proj/base/kernel``).
:func:`adapters_of` extracts the functional :class:`Adapters` (keyed by the original paths) for
:func:`~lowrank_jax.reparam.save`, :func:`~lowrank_jax.reparam.to_peft` and merging;
:func:`unwrap` puts the plain layers back, merged or not. :func:`collect_inputs` records the
targeted layers' inputs for data-driven initialisations (EVA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.reparam._einsum import Contraction
from lowrank_jax.reparam.core import Adapters, Site, _contributions
from lowrank_jax.reparam.quantized_base import (
    QuantConfig,
    QuantizedKernel,
    as_config,
    quantize_sites,
    quantized_product,
    quantized_value,
)
from lowrank_jax.reparam.wrapper import Reparam

__all__ = ["Adapted", "FrozenAdapter", "adapters_of", "collect_inputs", "unwrap", "wrap"]

_LAYERS = (nnx.Linear, nnx.Einsum)


class FrozenAdapter(nnx.Variable):
    """A fixed adapter array (SVD factor, random-basis seed): never trained."""


def _spec(layer: Any, einsum_str: str | None = None) -> str:
    if isinstance(layer, nnx.Einsum):
        return (einsum_str or layer.einsum_str).replace(" ", "")
    return "...i,io->...o"


class Adapted(nnx.Module):
    """A ``Linear``/``Einsum`` layer plus one adapter, computed in factored form.

    Args:
      base: the original layer (kept as ``self.base``).
      site: the :class:`~lowrank_jax.reparam.Site` of its kernel.
      frozen, trainable: the site's adapter arrays (canonical layout).
      rngs: ``nnx.Rngs`` with a ``dropout`` stream, needed when the method has dropout.
    """

    def __init__(self, base: Any, site: Site, frozen: dict, trainable: dict, *, rngs=None):
        self.base = base
        self.site = site
        self.adapter = nnx.data(
            {
                **{k: nnx.LoRAParam(v) for k, v in trainable.items()},
                **{k: FrozenAdapter(v) for k, v in frozen.items()},
            }
        )
        rate = getattr(site.method, "dropout", 0.0)
        if rate and rngs is None:
            raise ValueError(
                f"leaf '{site.path}': dropout={rate} needs wrap(..., rngs=nnx.Rngs(...))."
            )
        self.dropout = nnx.Dropout(rate, rngs=rngs) if rate else None
        self.contraction(None)  # validate the einsum now, not at the first call

    def contraction(self, einsum_str: str | None) -> Contraction:
        dims = self.site.dims
        c = Contraction.from_einsum(
            _spec(self.base, einsum_str), dims.in_axis, dims.out_axis, self.site.path
        )
        return c.with_precision(self.base.precision)

    def arrays(self) -> tuple[dict, dict]:
        """``(frozen, trainable)`` as plain arrays."""
        frozen = {k: v[...] for k, v in self.adapter.items() if isinstance(v, FrozenAdapter)}
        trainable = {k: v[...] for k, v in self.adapter.items() if isinstance(v, nnx.LoRAParam)}
        return frozen, trainable

    def __call__(self, x: jax.Array, einsum_str: str | None = None, out_sharding=None):
        if out_sharding is not None:
            raise ValueError("adapted layers do not take out_sharding; shard the inputs instead.")
        base = self.base
        bias = base.bias[...] if base.bias is not None else None
        stored = quantized_value(base.kernel)  # QLoRA: dequantized inside quantized_product
        if stored is None:
            x, kernel, bias = base.promote_dtype((x, base.kernel[...], bias), dtype=base.dtype)
        else:
            dtype = base.dtype or jnp.result_type(x.dtype, stored.dtype)
            x, bias = base.promote_dtype((x, bias), dtype=dtype)
        c = self.contraction(einsum_str)
        frozen, trainable = self.arrays()
        x_drop = self.dropout(x) if self.dropout is not None else x
        if stored is None:
            w = self.site.canonical(kernel)
            y = c.out(self.site.method.product(x, x_drop, w, frozen, trainable, c))
        else:
            y = c.out(quantized_product(self.site, c, stored, x, x_drop, frozen, trainable))
        if bias is not None:
            spec = _spec(base, einsum_str)
            y = y + jnp.reshape(bias, _bias_shape(spec, self.site.shape, y.ndim))
        return y


def _bias_shape(spec: str, kernel_shape: tuple, ndim: int) -> tuple:
    # As nnx.Einsum: output axes that come from the kernel keep their size, the others are 1.
    lhs, out = spec.split("->")
    sizes = dict(zip(lhs.split(",")[1], kernel_shape))
    letters = out.replace("...", "")
    return (1,) * (ndim - len(letters)) + tuple(sizes.get(c, 1) for c in letters)


def _flat(params: Any) -> dict:
    return {
        "/".join(str(k.key) for k in kp): v
        for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def _kernel_path(path: tuple) -> str:
    return "/".join(str(p) for p in path) + "/kernel"


def wrap(
    model: Any,
    reparam: Reparam | Adapters,
    *,
    key: jax.Array | None = None,
    rngs: nnx.Rngs | None = None,
    calibration: Any = None,
    quantize_base: str | QuantConfig | None = None,
) -> Any:
    """Replaces every targeted ``nnx.Linear``/``nnx.Einsum`` of ``model`` by an :class:`Adapted`.

    Args:
      model: an NNX module.
      reparam: a :class:`~lowrank_jax.reparam.Reparam` (its adapters are initialised from the
        model's ``nnx.Param`` leaves; residual inits update the kernels in place) or existing
        :class:`Adapters` (e.g. loaded) for this model.
      key: PRNG key for the init (default: ``rngs.params()``).
      rngs: ``nnx.Rngs``; its ``dropout`` stream drives adapter dropout.
      calibration: forwarded to ``Reparam.init`` for data-driven inits.
      quantize_base: ``"nf4"``, ``"int8"`` or a :class:`~lowrank_jax.reparam.QuantConfig`:
        store the adapted layers' base kernels block-quantized (QLoRA; QDoRA with ``dora``;
        LoftQ with ``QuantConfig(loftq_iters=T)``), dequantized per layer in the forward.

    Returns:
      The wrapped model (sharing variables with ``model``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lowrank_jax import reparam
      >>> layer = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
      >>> class Net(nnx.Module):
      ...   def __init__(self): self.proj = layer
      ...   def __call__(self, x): return self.proj(x)
      >>> net = reparam.wrap(Net(), reparam.lora(rank=2), rngs=nnx.Rngs(1))
      >>> net(jnp.ones((3, 8))).shape
      (3, 4)
    """
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if isinstance(reparam, Reparam):
        if key is None:
            if rngs is None:
                raise ValueError("wrap needs key= or rngs= to initialise the adapters.")
            key = rngs.params()
        new_params, adapters = reparam.init(key, params, calibration=calibration)
    else:
        adapters, new_params = reparam, params
        _contributions(params, [(adapters, 1.0)])
    leaves = _flat(new_params)
    stored = None
    if quantize_base is not None:
        stored, adapters = quantize_sites(
            _flat(params), leaves, adapters, as_config(quantize_base),
            initialised=isinstance(reparam, Reparam),
        )
    sites = {s.path: s for s in adapters.sites}
    done: set[str] = set()

    def swap(path: tuple, node: Any) -> Any:
        if not isinstance(node, _LAYERS) or _kernel_path(path) not in sites:
            return node
        site = sites[_kernel_path(path)]
        if node.kernel.ndim != len(_spec(node).split("->")[0].split(",")[1]):
            raise ValueError(
                f"leaf '{site.path}' is a stacked (vmapped/scanned) layer of shape "
                f"{node.kernel.shape}; wrap adapts plain layers. Use reparam.apply on the params."
            )
        if stored is None:
            node.kernel[...] = leaves[site.path]
        else:
            node.kernel = QuantizedKernel(stored[site.path])
        done.add(site.path)
        return Adapted(
            node, site, adapters.frozen[site.path], adapters.trainable[site.path], rngs=rngs
        )

    wrapped = nnx.recursive_map(swap, model)
    missing = sorted(set(sites) - done)
    if missing:
        raise ValueError(
            f"wrap adapts the kernels of nnx.Linear and nnx.Einsum layers; these targets are "
            f"not: {missing}. Narrow `targets=` or use reparam.apply on the parameters."
        )
    return wrapped


def _adapted_layers(model: Any) -> list[Adapted]:
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, Adapted)]


def adapters_of(model: Any) -> Adapters:
    """The :class:`Adapters` held by a wrapped model, keyed by the original kernel paths."""
    layers = sorted(_adapted_layers(model), key=lambda layer: layer.site.path)
    if not layers:
        raise ValueError("adapters_of: the model has no adapted layers; call reparam.wrap first.")
    frozen, trainable = {}, {}
    for layer in layers:
        frozen[layer.site.path], trainable[layer.site.path] = layer.arrays()
    return Adapters(trainable, frozen, tuple(layer.site for layer in layers))


def unwrap(model: Any, *, merge: bool = True) -> Any:
    """Puts the plain layers back; with ``merge`` their kernels hold the effective weights
    (float32 accumulation, one cast), otherwise the base weights."""

    def restore(path: tuple, node: Any) -> Any:
        if not isinstance(node, Adapted):
            return node
        base = node.base
        if merge:
            frozen, trainable = node.arrays()
            kernel = base.kernel[...]  # a quantized base is dequantized: merged into floats
            w = node.site.method.apply(node.site.canonical(kernel), frozen, trainable)
            merged = node.site.layout(w).astype(kernel.dtype)
            if isinstance(base.kernel, QuantizedKernel):
                base.kernel = nnx.Param(merged)
            else:
                base.kernel[...] = merged
        return base

    return nnx.recursive_map(restore, model)


class _Recorder(nnx.Module):
    def __init__(self, layer: Any, site: Site, sink: Callable[[str, jax.Array], None]):
        self.layer, self.path, self.sink = layer, site.path, sink
        self.plan = Contraction.from_einsum(_spec(layer), *site.dims, site.path)

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        c = self.plan
        present = "".join(b for b in c.batch if b in c.x_spec)
        ellipsis = "..." if c.x_spec.startswith("...") else ""
        lead = c.lead.replace("...", "")
        moved = jnp.einsum(f"{c.x_spec}->{present}{ellipsis}{lead}{c.in_letter}", x)
        moved = moved.reshape(*moved.shape[: len(present)], -1, moved.shape[-1])
        for axis, b in enumerate(c.batch):
            if b not in present:
                moved = jnp.expand_dims(moved, axis)
        self.sink(self.path, moved)
        return self.layer(x, *args, **kwargs)


def collect_inputs(model: Any, fn: Callable[[Any], Any], sites: Sequence[Site]) -> dict:
    """Runs ``fn(model)`` eagerly and returns the inputs that reached each site's layer, in the
    layout :meth:`Calibration.add_activations` expects: ``(tokens, in)`` for a 2-D kernel,
    ``(*B, tokens, in)`` for batch axes ``B`` (size 1 where the input is shared).

    Example::

        cal = rp.calibration(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        for batch in batches:
            cal.add_activations(reparam.collect_inputs(model, lambda m: m(batch), cal.sites))
    """
    wanted, seen = {s.path: s for s in sites}, {}

    def sink(path: str, x: jax.Array) -> None:
        seen.setdefault(path, []).append(x)

    def swap(path: tuple, node: Any) -> Any:
        if isinstance(node, _LAYERS) and _kernel_path(path) in wanted:
            return _Recorder(node, wanted[_kernel_path(path)], sink)
        return node

    fn(nnx.recursive_map(swap, model))
    missing = sorted(set(wanted) - set(seen))
    if missing:
        raise ValueError(
            f"collect_inputs: no Linear/Einsum input reached {missing} during fn(model)."
        )
    return {p: jnp.concatenate(xs, axis=-2) for p, xs in seen.items()}
