"""Q-GaLore's quantized parts: INT4 projectors and INT8 weights updated by stochastic rounding.

Both use Q-GaLore's asymmetric min-max group format (``q_galore_torch``): a tensor in PyTorch
layout is flattened row-major into groups of ``group_size``; per group

.. math::
    s = \\max(x_{max} - x_{min}, 10^{-5}) / q_{max},\\quad
    z = \\mathrm{clip}(-\\mathrm{round}(x_{min}/s), 0, q_{max}),\\quad
    q = \\mathrm{clip}(\\mathrm{round}(x/s) + z, 0, q_{max})

with :math:`q_{max} = 2^b - 1`, codes stored as ``uint8`` (two 4-bit codes per byte with
``pack=True``), ``s`` and ``z`` in the tensor's dtype (bfloat16 in bfloat16 training), and
:math:`\\hat x = s (q - z)`. Stochastic rounding
replaces ``round(x/s)`` by :math:`\\lfloor x/s \\rfloor + \\mathbb 1[\\xi < \\mathrm{frac}(x/s)]`,
:math:`\\xi \\sim U[0, 1)`, which is unbiased, so updates far below one quantization step still
move the weights on average.

Reference: Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive
Low-Rank Gradients", 2024 (``q_galore_torch/q_galore_projector.py``, ``utils/quantization.py``,
``q_galore_adamw8bit.py``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.projection import Projector
from lowrank_jax.targets import Targets
from lowrank_jax.transforms._adaptive import AdaptiveRefresh
from lowrank_jax.transforms._galore import scaled_back_projection
from lowrank_jax.transforms._lowrank import LeafPlan, ProjectedCore

__all__ = ["QGaLoreState", "QuantizedGroups", "dequantize_groups", "q_galore", "quantize_groups"]


class QuantizedGroups(NamedTuple):
    """A tensor in Q-GaLore's group format.

    Attributes:
      codes: ``uint8[..., n_groups, group_size]`` (``group_size // 2`` bytes with ``pack``).
      scales: ``[..., n_groups]`` (bfloat16 for bfloat16 tensors and INT8 weights).
      zeros: ``[..., n_groups]``, integer-valued zero points, in the scales' dtype.
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array


def _groups(x: jax.Array, group_size: int, where: str) -> jax.Array:
    """``(..., a, b)`` flattened row-major per matrix into ``(..., n_groups, group_size)``."""
    *batch, a, b = x.shape
    if (a * b) % group_size:
        raise ValueError(
            f"{where}: a ({a}, {b}) matrix is not a whole number of groups of {group_size} "
            "(Q-GaLore asserts numel % group_size == 0); choose a group_size dividing it."
        )
    return x.reshape(*batch, (a * b) // group_size, group_size)


def quantize_groups(
    x: jax.Array,
    bits: int,
    group_size: int,
    *,
    key: jax.Array | None = None,
    pack: bool = False,
    scale_dtype: Any = None,
    where: str = "quantize_groups",
) -> QuantizedGroups:
    """Quantizes ``x`` (``(..., a, b)``, PyTorch layout) per group; stochastic rounding with
    ``key`` (round-half-to-even without, as ``torch.round``). ``s`` and ``z`` are stored in
    ``scale_dtype`` (default ``x.dtype``, as the reference computes them in the tensor's dtype)
    and the codes are computed with the stored ``s``."""
    q_max = 2**bits - 1
    scale_dtype = x.dtype if scale_dtype is None else scale_dtype
    g = _groups(x.astype(jnp.float32), group_size, where)
    lo, hi = jnp.min(g, axis=-1, keepdims=True), jnp.max(g, axis=-1, keepdims=True)
    s = (jnp.maximum(hi - lo, 1e-5) / q_max).astype(scale_dtype).astype(jnp.float32)
    z = jnp.clip(-jnp.round(lo / s), 0, q_max)
    u = g / s
    if key is None:
        rounded = jnp.round(u)
    else:
        floor = jnp.floor(u)
        rounded = floor + (jax.random.uniform(key, u.shape) < u - floor)
    codes = jnp.clip(rounded + z, 0, q_max).astype(jnp.uint8)
    if pack:
        if bits > 4 or group_size % 2:
            raise ValueError(f"{where}: pack needs bits <= 4 and an even group_size.")
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return QuantizedGroups(codes, s[..., 0].astype(scale_dtype), z[..., 0].astype(scale_dtype))


def dequantize_groups(
    q: QuantizedGroups, shape: tuple[int, ...], dtype: Any, *, pack: bool = False
) -> jax.Array:
    """:math:`s (q - z)` back in ``shape`` (PyTorch layout), computed in float32."""
    codes = q.codes
    if pack:
        codes = jnp.stack([codes & 0xF, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
    x = (codes.astype(jnp.float32) - q.zeros.astype(jnp.float32)[..., None]) * q.scales.astype(
        jnp.float32
    )[..., None]
    return x.reshape(shape).astype(dtype)


class QGaLoreState(NamedTuple):
    """State of :func:`q_galore`: :class:`~lowrank_jax.GaLoreState` with each stored basis as
    INT4 :class:`QuantizedGroups` (``projectors``) and the lazy-refresh bookkeeping.

    Attributes:
      count, key, lowrank_state, fullrank_state, refresh_state: as GaLoreState.
      projectors: per targeted leaf a :class:`~lowrank_jax.projection.Projector` whose bases
        are :class:`QuantizedGroups` of the PyTorch-layout basis (``MaskedNode`` elsewhere).
    """

    count: jax.Array
    key: jax.Array
    projectors: Any
    lowrank_state: Any
    fullrank_state: Any
    refresh_state: Any = None


def _select(mask: jax.Array, new: QuantizedGroups, old: QuantizedGroups) -> QuantizedGroups:
    """Per matrix (``mask`` over the batch axes): ``new`` where set, else ``old``."""
    pick = lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)), a, b)
    return QuantizedGroups(*(pick(a, b) for a, b in zip(new, old)))


class _QuantizedProjectorCore(ProjectedCore):
    """The projected core with bases stored as INT4 groups and used dequantized (``P̂``)."""

    def __init__(self, *args: Any, bits: int, group_size: int, pack: bool, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.bits, self.group_size, self.pack = bits, group_size, pack

    def _quantize(self, proj: Projector, side: str) -> Projector:
        def one(b: jax.Array | None) -> QuantizedGroups | None:
            if b is None:
                return None
            torch = jnp.swapaxes(b, -1, -2) if side == "in" else b  # Vh[:r] or U[:, :r]
            return quantize_groups(torch, self.bits, self.group_size, pack=self.pack,
                                   where=f"{self.method} projector")

        return Projector(one(proj.in_basis), one(proj.out_basis))

    def _dequantize(self, proj: Projector, plan: LeafPlan, dtype: Any) -> Projector:
        *batch, n_in, n_out = plan.shape

        def one(q: QuantizedGroups | None, dim: int) -> jax.Array | None:
            if q is None:
                return None
            shape = (*batch, plan.rank, dim) if plan.side == "in" else (*batch, dim, plan.rank)
            b = dequantize_groups(q, shape, dtype, pack=self.pack)
            return jnp.swapaxes(b, -1, -2) if plan.side == "in" else b

        return Projector(one(proj.in_basis, n_in), one(proj.out_basis, n_out))

    def init(self, params: Any) -> dict[str, Any]:
        fields = super().init(params)
        treedef, _, plans = self.plan(params)
        stored = treedef.flatten_up_to(fields["projectors"])
        fields["projectors"] = treedef.unflatten(
            [self._quantize(q, p.side) if p else q for p, q in zip(plans, stored)]
        )
        return fields

    def _new_projector(self, plan: LeafPlan, g: jax.Array, old: Projector, key: Any) -> Projector:
        # the refresh step already projects with the dequantized basis, as Q-GaLore
        new = super()._new_projector(plan, g, old, key)
        single = plan._replace(shape=plan.shape[-2:])
        return self._dequantize(self._quantize(new, plan.side), single, self._dtype(g))

    def update(self, updates: Any, state: Any, params: Any, leaf_fn: Any, **kwargs: Any):
        treedef, leaves, plans = self.plan(updates)
        stored = self.flatten_state(treedef, plans, state.projectors)
        floats = [
            self._dequantize(q, p, self._dtype(x)) if p else q
            for p, q, x in zip(plans, stored, leaves)
        ]
        before = None
        if self.adaptive_refresh is not None:
            before = [s.svd_count if p else None
                      for p, s in zip(plans, treedef.flatten_up_to(state.refresh_state))]
        out, new_state = super().update(
            updates, state._replace(projectors=treedef.unflatten(floats)), params, leaf_fn,
            **kwargs,
        )
        new_floats = treedef.flatten_up_to(new_state.projectors)
        after = None if before is None else treedef.flatten_up_to(new_state.refresh_state)
        kept = []
        for i, (p, q_old, q_new) in enumerate(zip(plans, stored, new_floats)):
            if p is None:
                kept.append(q_old)
                continue
            if before is None:
                refreshed = jnp.broadcast_to(state.count % self.update_proj_gap == 0, p.shape[:-2])
            else:
                refreshed = after[i].svd_count != before[i]
            fresh = self._quantize(q_new, p.side)
            kept.append(Projector(*(
                None if o is None else _select(refreshed, n, o) for n, o in zip(fresh, q_old)
            )))
        return out, new_state._replace(projectors=treedef.unflatten(kept))


def q_galore(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 0.25,
    proj_bits: int = 4,
    proj_group_size: int = 256,
    pack_projector: bool = False,
    adaptive_refresh: AdaptiveRefresh | None = AdaptiveRefresh(),  # noqa: B008
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    projector_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore with INT4-quantized projectors and Q-GaLore's lazy, layer-adaptive refresh.

    At a refresh the SVD basis :math:`P` is quantized per group (Q-GaLore's min-max format,
    ``proj_bits`` bits, groups of ``proj_group_size`` in PyTorch layout: along the in axis of
    each right basis vector ``Vh[:r]``, along the rank of each row of ``U[:, :r]``), stored as
    codes plus scales and zero points (in the basis dtype), and every projection uses the
    dequantized :math:`\hat P = s(q - z)` (not exactly orthonormal, as in the reference):

    .. math::
        R_t = \hat P^\top G_t,\qquad \Delta W_t = \alpha\,\hat P\,\mathrm{inner}(R_t)

    The refresh is lazy per matrix (:class:`~lowrank_jax.transforms.AdaptiveRefresh`, Q-GaLore
    defaults: threshold 0.4 over 5 refreshes, gap doubling). Codes are ``uint8`` (one byte per
    4-bit code, as ``q_galore_torch``) or, with ``pack_projector``, two per byte (the paper's
    4-bit accounting). For INT8 weights chain :func:`stochastic_weight_update` after it
    (:func:`lowrank_jax.q_galore_adamw_8bit`).

    Works layer-wise (per-matrix state) for projectors whose size is a multiple of the group.

    Args:
      inner: the low-rank optimizer (Q-GaLore: 8-bit Adam, :func:`scale_by_adam_8bit`).
      rank, update_proj_gap, scale, proj_type, targets, dims, projector_dtype, seed: as
        :func:`~lowrank_jax.galore` (``projector_dtype``: the dequantized bases' dtype).
      proj_bits: bits per projector code (Q-GaLore: 4).
      proj_group_size: elements per quantization group (256); must divide ``dim · r``.
      pack_projector: two 4-bit codes per byte.
      adaptive_refresh: the lazy refresh (``None``: every ``update_proj_gap`` steps).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`QGaLoreState`.

    Example:
      >>> import jax.numpy as jnp, optax, lowrank_jax as lr
      >>> tx = lr.transforms.q_galore(optax.scale_by_adam(), rank=4, proj_group_size=64)
      >>> q = tx.init({"w": jnp.ones((64, 32))}).projectors["w"].out_basis
      >>> q.codes.dtype, q.codes.shape, q.scales.dtype
      (dtype('uint8'), (2, 64), dtype('float32'))

    References:
      Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive
      Low-Rank Gradients", 2024, §3.2-3.3. https://arxiv.org/abs/2407.08296
    """
    if not 1 <= proj_bits <= 8:
        raise ValueError(f"q_galore: proj_bits must be in 1..8, got {proj_bits!r}.")
    if pack_projector and proj_bits > 4:
        raise ValueError("q_galore: pack_projector needs proj_bits <= 4.")
    core = _QuantizedProjectorCore(
        inner,
        method="q_galore",
        rank=rank,
        update_proj_gap=update_proj_gap,
        proj_type=proj_type,
        basis="svd",
        targets=targets,
        dims=dims,
        on_refresh="keep",
        projector_dtype=projector_dtype,
        seed=seed,
        adaptive_refresh=adaptive_refresh,
        bits=proj_bits,
        group_size=proj_group_size,
        pack=pack_projector,
    )

    return scaled_back_projection(core, QGaLoreState, scale)
