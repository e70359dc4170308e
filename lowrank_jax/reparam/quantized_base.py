"""The quantized frozen base of QLoRA inside NNX layers: the variable, the options, the forward.

:class:`QuantizedKernel` is the ``nnx.Variable`` that holds a base kernel block-quantized (a
:class:`~lowrank_jax.reparam.quant.QuantizedTensor`; not an ``nnx.Param``, so no optimizer or
``nnx.state(model, nnx.Param)`` sees it); ``kernel[...]`` dequantizes, so a plain
``nnx.Linear``/``nnx.Einsum`` still runs with it. An adapted layer calls
:func:`quantized_product` instead: it dequantizes the kernel inside a ``jax.checkpoint`` whose
policy saves everything but the dequantized kernel, so the backward pass dequantizes it again
(as bitsandbytes' ``MatMul4Bit`` does) instead of keeping every layer's float kernel alive from
the forward to the backward pass: one layer's dequantized kernel at a time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.reparam import quant
from lowrank_jax.reparam.core import Adapters, Site
from lowrank_jax.reparam.dora import column_norm
from lowrank_jax.reparam.loftq_init import loftq_factors
from lowrank_jax.reparam.lora import LoRA
from lowrank_jax.targets import MatrixDims

__all__ = ["QuantConfig", "QuantizedKernel", "as_config", "quantized_product", "quantized_value"]


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a frozen base is stored (the ``quantize_base=`` of :func:`~lowrank_jax.reparam.wrap`).

    Attributes:
      format: ``"nf4"`` (QLoRA) or ``"int8"``.
      block_size: elements per absmax block (64).
      double_quant: 8-bit block scales in blocks of ``scale_block_size`` (default: on for nf4).
      scale_block_size: scales per second-level block (256).
      loftq_iters: ``T > 0`` initialises LoRA/DoRA factors from the quantization residual by
        ``T`` LoftQ alternations (``1``: ZeroQuant-V2's low-rank compensation); ``0`` keeps the
        method's own init (and quantizes its base: PiSSA's residual for QPiSSA).

    Example:
      >>> from lowrank_jax import reparam
      >>> reparam.QuantConfig("nf4", loftq_iters=2).storage_bytes((4096, 4096)) / 2**20  # MiB
      8.253910064697266
    """

    format: str = "nf4"
    block_size: int = 64
    double_quant: bool | None = None
    scale_block_size: int = 256
    loftq_iters: int = 0

    def __post_init__(self):
        quant.check_options(self.format, self.block_size, self.scale_block_size, "quantize_base")
        iters = self.loftq_iters
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"quantize_base: loftq_iters must be an int >= 0, got {iters!r}.")

    @property
    def options(self) -> dict:
        """The storage keywords of :func:`~lowrank_jax.reparam.quant.quantize`."""
        return dict(
            format=self.format,
            block_size=self.block_size,
            double_quant=self.double_quant,
            scale_block_size=self.scale_block_size,
        )

    def storage_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes stored for a kernel of ``shape``."""
        return quant.storage_bytes(shape, **self.options)

    def check(self, path: str, shape: tuple[int, ...], dtype: Any) -> None:
        """Raises ``ValueError`` naming ``path`` and the fix if the leaf cannot be stored."""
        if not jnp.issubdtype(np.dtype(dtype), jnp.floating) or len(shape) < 2:
            raise ValueError(
                f"quantize_base: leaf '{path}' ({np.dtype(dtype).name}{list(shape)}) is not a "
                f"float matrix; exclude it with `targets=`."
            )
        size = math.prod(shape)
        if size % self.block_size:
            hint = math.gcd(size, self.block_size)
            fix = (
                f"QuantConfig({self.format!r}, block_size={hint}) (it divides {size})"
                if hint > 1 and (hint % 2 == 0 or self.format == "int8")
                else "a block_size that divides it"
            )
            raise ValueError(
                f"quantize_base: leaf '{path}' of shape {tuple(shape)} has {size} elements, not a "
                f"whole number of blocks of {self.block_size}; use {fix}, or exclude the leaf "
                f"with `targets=`."
            )

    def quantize(self, path: str, w: jax.Array, dims: MatrixDims) -> quant.QuantizedTensor:
        """``w`` stored with its out axis before its in axis (PyTorch's ``(out, in)`` order)."""
        self.check(path, w.shape, w.dtype)
        return quant.quantize(w, **self.options, perm=torch_order(w.ndim, dims))


def torch_order(ndim: int, dims: MatrixDims) -> tuple[int, ...]:
    """The axis order that puts the batch axes first, then out, then in."""
    dims = dims.normalize(ndim)
    rest = [a for a in range(ndim) if a not in dims]
    return (*rest, dims.out_axis, dims.in_axis)


def as_config(spec: str | QuantConfig) -> QuantConfig:
    """``"nf4"`` / ``"int8"`` / a :class:`QuantConfig` -> a :class:`QuantConfig`."""
    if isinstance(spec, QuantConfig):
        return spec
    if not isinstance(spec, str):
        raise ValueError(
            f"quantize_base must be 'nf4', 'int8' or a reparam.QuantConfig, got {spec!r}."
        )
    return QuantConfig(spec)


class QuantizedKernel(nnx.Variable):
    """A frozen base kernel stored block-quantized; ``kernel[...]`` dequantizes it.

    Its value is a :class:`~lowrank_jax.reparam.quant.QuantizedTensor` (a pytree of arrays), so
    ``nnx.split``/``nnx.jit``/orbax treat it as any other state; no optimizer filter on
    ``nnx.Param`` or ``nnx.LoRAParam`` selects it.
    """


def quantized_value(kernel: Any) -> quant.QuantizedTensor | None:
    """The stored tensor of a :class:`QuantizedKernel`, or ``None`` for a float kernel."""
    return kernel.get_value() if isinstance(kernel, QuantizedKernel) else None


def quantized_product(
    site: Site, c: Any, q: quant.QuantizedTensor, x: jax.Array, x_drop: jax.Array,
    frozen: dict, trainable: dict,
) -> jax.Array:
    """``site.method.product`` on the dequantized kernel, which the backward pass dequantizes
    again instead of keeping it (one layer's dequantized kernel alive at a time).

    The kernel is dequantized straight into ``x``'s dtype (the layer's compute dtype); DoRA's
    column norm is computed from it (QDoRA). The backward pass replays the layer on the saved
    inputs (the dead base product is removed by XLA) behind an optimization barrier that
    includes the incoming cotangent, so XLA can neither reuse the forward's dequantized kernel
    nor schedule the replay before the layer's backward step.
    """
    dropped = x_drop is not x  # DoRA reuses the base product when there is no dropout

    def run(q, x, x_drop, frozen, trainable):
        w = site.canonical(quant.dequantize(_after(q, x), x.dtype))
        return site.method.product(x, x_drop if dropped else x, w, frozen, trainable, c)

    @jax.custom_vjp
    def product(q, x, x_drop, frozen, trainable):
        return run(q, x, x_drop, frozen, trainable)

    def forward(q, x, x_drop, frozen, trainable):
        return run(q, x, x_drop, frozen, trainable), (q, x, x_drop, frozen, trainable)

    def backward(saved, g):
        (q, *inputs), g = jax.lax.optimization_barrier((saved, g))
        q = _after(q, g)  # not before this layer's backward step, and not the forward's
        _, pullback = jax.vjp(lambda *args: run(q, *args), *inputs)
        return (jax.tree.map(_zero_cotangent, q), *pullback(g))

    product.defvjp(forward, backward)
    return product(q, x, x_drop if dropped else None, frozen, trainable)


def _after(q: quant.QuantizedTensor, x: Any) -> quant.QuantizedTensor:
    """``q`` made to depend on ``x``: every array plus an exact zero computed from ``x``.

    XLA cannot fold ``0 · isnan(x₀)``, so the kernel is dequantized only once ``x`` exists:
    the forward pass cannot dequantize every layer up front, and the backward pass cannot
    reuse (keep alive) the forward's kernel. ``optimization_barrier`` alone does not do this
    on every backend (XLA:CPU removes barriers before scheduling).
    """
    tie = jnp.isnan(jax.tree.leaves(x)[0].ravel()[0]).astype(jnp.float32) * 0.0
    return jax.tree.map(lambda a: a + tie.astype(a.dtype), q)


def _zero_cotangent(x: jax.Array) -> jax.Array:
    """The frozen base gets no gradient (``float0`` for its integer codes)."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def quantize_sites(
    params: Any, residual: dict, adapters: Adapters, config: QuantConfig, *, initialised: bool
) -> tuple[dict, Adapters]:
    """The quantized base of every site, and the adapters (LoftQ's when ``loftq_iters > 0``).

    Args:
      params: ``{path: float kernel}`` before the init (LoftQ starts from these).
      residual: ``{path: float kernel}`` after the init (PiSSA & co. changed them).
      adapters: the adapters of those sites.
      config: the storage format.
      initialised: ``True`` when ``adapters`` were just initialised (LoftQ may replace them).

    Returns:
      ``({path: QuantizedTensor}, adapters)``.
    """
    if not config.loftq_iters:
        stored = {s.path: config.quantize(s.path, residual[s.path], s.dims) for s in adapters.sites}
        return stored, adapters
    if not initialised:
        raise ValueError(
            "quantize_base: loftq_iters > 0 initialises new adapters; with loaded adapters, load "
            "the quantized base they were trained on (reparam.load_base) instead."
        )
    return loftq_sites(params, adapters, config)


def loftq_sites(params: dict, adapters: Adapters, config: QuantConfig) -> tuple[dict, Adapters]:
    """LoftQ for every site of LoRA/DoRA ``adapters`` on ``params`` (``{path: float kernel}``)."""
    stored, trainable, frozen = {}, dict(adapters.trainable), dict(adapters.frozen)
    for site in adapters.sites:
        method = site.method
        if not isinstance(method, LoRA) or method.init_weights not in ("kaiming", "gaussian"):
            name = type(method).__name__
            init = getattr(method, "init_weights", None)
            raise ValueError(
                f"LoftQ initialises the A, B factors of LoRA/DoRA itself; leaf '{site.path}' has "
                f"{name}{f' with init={init!r}' if init else ''}. Use lora(...)/dora(...) with the "
                f"default init, or QuantConfig(loftq_iters=0)."
            )
        w = params[site.path]
        config.check(site.path, w.shape, w.dtype)
        # Quantizing the canonical (..., in, out) matrix in (..., out, in) order stores the same
        # codes as quantizing the kernel in torch_order: only the recorded layout differs.
        q, a, b, _ = loftq_factors(
            site.canonical(w), method.rank, method.scale, iters=config.loftq_iters,
            perm=torch_order(w.ndim, MatrixDims()), **config.options,
        )
        q = dataclasses.replace(q, shape=tuple(w.shape), perm=torch_order(w.ndim, site.dims))
        stored[site.path] = q
        t, f = dict(trainable[site.path]), dict(frozen[site.path])
        target = t if "A" in t else f
        target["A"], t["B"] = a.astype(target["A"].dtype), b.astype(t["B"].dtype)
        if "magnitude" in t:  # DoRA: m = ‖dequant(Q) + sAB‖_c, a no-op at init
            base = site.canonical(quant.dequantize(q, jnp.float32))
            t["magnitude"] = column_norm(base, a, b, method.scale).astype(t["magnitude"].dtype)
        trainable[site.path], frozen[site.path] = t, f
    return stored, adapters.replace(trainable=trainable, frozen=frozen)
