"""8-bit optimizer states: block-wise quantized Adam moments (``scale_by_adam_8bit``).

Each large moment is stored as one ``uint8`` code per element (an index into a 256-entry code
map of values in ``[-1, 1]``) plus one ``float32`` absmax per block of ``block_size``
consecutive elements (row-major over the leaf): ``x ≈ map[code] · absmax(block)``. Every step
dequantizes to float32, runs Adam in float32, and requantizes with fresh block maxima, so the
only error is the rounding of the stored state.

Why the *dynamic* map by default: Adam's second moment spans many orders of magnitude inside
a block (it is a square), and a linear map sends every value below ``absmax/510`` to zero,
where ``M/(√V + ε)`` then explodes. The dynamic map (Dettmers et al.'s dynamic tree
quantization: seven decades ``[10⁻⁷, 1]`` with more codes in the upper decades) keeps a
relative error of a few percent down to ``10⁻⁶·absmax``. ``quantization="linear"`` (absmax
int8/uint8 levels) is there for comparison.

Reference: Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022;
bitsandbytes ``AdamW8bit``, which galore-torch's ``GaLoreAdamW8bit`` runs on the projected
gradient.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import kernels
from lowrank_jax.sharding import auto_sharded
from lowrank_jax.train.registry import register_optimizer
from lowrank_jax.transforms._common import safe_increment

__all__ = [
    "QUANTIZATIONS",
    "QuantizedArray",
    "ScaleByAdam8bitState",
    "code_map",
    "dequantize_blockwise",
    "quantize_blockwise",
    "scale_by_adam_8bit",
]

QUANTIZATIONS = ("dynamic", "linear")
_DECADES = 7


class QuantizedArray(NamedTuple):
    """A block-wise quantized array.

    Attributes:
      codes: ``uint8`` indices into the code map, in the array's shape.
      scales: ``float32[ceil(size / block_size)]``, the absmax of each block.
    """

    codes: jax.Array
    scales: jax.Array


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`.

    Attributes:
      count: the step (``int32``).
      mu: per leaf a :class:`QuantizedArray` (signed map), or a ``float32`` array for leaves
        smaller than ``min_8bit_size``.
      nu: the same for the second moment (unsigned map).
    """

    count: jax.Array
    mu: Any
    nu: Any


@functools.cache
def code_map(signed: bool, quantization: str = "dynamic") -> np.ndarray:
    """The sorted 256 values in ``[-1, 1]`` (``[0, 1]`` unsigned) that the codes index.

    Dynamic: decade ``d = 0..6`` covers ``[10^{d-7}, 10^{d-6}]`` with ``2^{d+1}`` (unsigned) or
    ``2^d`` per sign (signed) values, the midpoints of an even split of ``[0.1, 1]`` scaled by
    ``10^{d-6}``; plus 0 and 1. Linear: ``k/255`` (unsigned) or ``k/127``, ``k = -127..127``.
    """
    if quantization == "linear":
        if not signed:
            return (np.arange(256) / 255.0).astype(np.float32)
        # 255 symmetric levels; the 256th code repeats 1.0 (never the nearest of anything else)
        return np.append(np.arange(-127, 128) / 127.0, 1.0).astype(np.float32)
    if quantization != "dynamic":
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
    values = [0.0, 1.0]
    for decade in range(_DECADES):
        mids = _decade_edges(decade, signed)
        mids = (mids[:-1] + mids[1:]) / 2 * 10.0 ** (decade - _DECADES + 1)
        values += list(mids) + (list(-mids) if signed else [])
    table = np.sort(np.asarray(values, np.float64)).astype(np.float32)
    assert table.size == 256, table.size
    return table


def _decade_edges(decade: int, signed: bool) -> np.ndarray:
    count = 2**decade if signed else 2 ** (decade + 1)
    return np.linspace(0.1, 1.0, count + 1)


def _encode(y: jax.Array, signed: bool, quantization: str) -> jax.Array:
    """The nearest code of each ``y`` in ``[-1, 1]``, by arithmetic (no search in the map).

    Dynamic: the decade ``d`` from ``log10|y|`` and the bin ``k`` of ``|y|/10^{d-6}`` in the
    even split of ``[0.1, 1]``, whose midpoint is the level; in the lowest bin the top level of
    the decade below may be nearer; 0 below half the smallest level, 1 above the midpoint of
    the top level and 1 (-1 has no code: it takes the most negative level).
    """
    if quantization == "linear":
        if signed:
            return (jnp.clip(jnp.round(y * 127), -127, 127) + 127).astype(jnp.uint8)
        return jnp.clip(jnp.round(y * 255), 0, 255).astype(jnp.uint8)
    table = code_map(signed, quantization)
    zero = int(np.searchsorted(table, 0.0))  # 127 signed, 0 unsigned
    a = jnp.abs(y)
    # decade d holds [10^{d-7}, 10^{d-6}); comparisons and small lookups, no log/pow (slow on CPU)
    decade = sum((a >= 10.0 ** (d - _DECADES)).astype(jnp.int32) for d in range(1, _DECADES))
    scale = jnp.asarray([10.0 ** (d + 1 - _DECADES) for d in range(_DECADES)], jnp.float32)
    scale = scale[decade]
    count = jnp.left_shift(1 if signed else 2, decade).astype(jnp.float32)
    k = jnp.clip(jnp.floor((a / scale - 0.1) * count / 0.9), 0, count - 1)
    below = count - 1 if signed else count - 2  # codes of the lower decades
    code = zero + 1 + below + k
    level = scale * (0.1 + (k + 0.5) * 0.9 / count)
    top_of_lower = scale / 10 * (1 - 0.9 / count)  # the decade below has count / 2 levels
    nearer = (k == 0) & (decade > 0) & (jnp.abs(a - top_of_lower) < jnp.abs(a - level))
    code = code - nearer
    code = jnp.where(a < table[zero + 1] / 2, zero, code)
    code = jnp.where(a > (table[254] + 1.0) / 2, 255, code)
    if signed:
        code = jnp.where(y < 0, 2 * zero - code, code)  # mirror image (no -1: clip to 0)
        code = jnp.maximum(code, 0)
    return code.astype(jnp.uint8)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    flat = x.reshape(-1)
    n_blocks = math.ceil(flat.size / block_size)
    pad = n_blocks * block_size - flat.size
    return (jnp.pad(flat, (0, pad)) if pad else flat).reshape(n_blocks, block_size)


def quantize_blockwise(
    x: jax.Array, block_size: int, *, signed: bool, quantization: str = "dynamic"
) -> QuantizedArray:
    """Codes of ``x / absmax(block)`` (see :func:`code_map`); ``x`` is upcast to float32."""
    blocks = _blocks(x.astype(jnp.float32), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    codes = _encode(normed, signed, quantization)
    return QuantizedArray(codes.reshape(-1)[: x.size].reshape(x.shape), absmax)


def dequantize_blockwise(
    q: QuantizedArray, block_size: int, *, signed: bool, quantization: str = "dynamic"
) -> jax.Array:
    """``map[code] · absmax(block)`` as float32, in the codes' shape."""
    table = jnp.asarray(code_map(signed, quantization))
    values = _blocks(table[q.codes.astype(jnp.int32)], block_size)
    flat = (values * q.scales[:, None]).reshape(-1)
    return flat[: q.codes.size].reshape(q.codes.shape)


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    quantization: str = "dynamic",
) -> optax.GradientTransformation:
    r"""Adam with block-wise 8-bit first and second moments (bitsandbytes' 8-bit Adam).

    .. math::
        m_t = \beta_1 \tilde m_{t-1} + (1-\beta_1) g,\quad
        v_t = \beta_2 \tilde v_{t-1} + (1-\beta_2) g^2,\quad
        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}

    where :math:`\tilde m, \tilde v` are the dequantized stored moments; :math:`m_t, v_t` are
    quantized again for the next step (first moment with a signed map, second with an
    unsigned one; see the module docstring). The update uses the float32 :math:`m_t, v_t`.

    Args:
      b1, b2, eps: Adam constants (bitsandbytes defaults; ``eps`` after bias correction).
      block_size: elements per quantization block (one float32 scale each): the state costs
        ``1 + 4/block_size`` bytes per element and moment, ``0.254×`` float32 at 256.
      min_8bit_size: leaves with fewer elements keep float32 moments (bitsandbytes: 4096).
      quantization: ``"dynamic"`` (default) or ``"linear"``.

    Returns:
      A transformation whose state is a :class:`ScaleByAdam8bitState`.

    Example:
      >>> import jax.numpy as jnp, optax, lowrank_jax as lr
      >>> tx = lr.scale_by_adam_8bit()
      >>> state = tx.init({"w": jnp.zeros((128, 64)), "b": jnp.zeros(64)})
      >>> state.mu["w"].codes.dtype, state.mu["w"].scales.shape, state.mu["b"].dtype
      (dtype('uint8'), (32,), dtype('float32'))

    References:
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
      https://arxiv.org/abs/2110.02861
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"scale_by_adam_8bit: quantization must be one of {QUANTIZATIONS}, got "
            f"{quantization!r}."
        )
    for name, value in (("block_size", block_size), ("min_8bit_size", min_8bit_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"scale_by_adam_8bit: {name} must be a positive Python int, got {value!r}. "
                f"Under optax.inject_hyperparams pass static_args=({name!r}, ...)."
            )
    first = dict(signed=True, quantization=quantization)
    second = dict(signed=False, quantization=quantization)

    def big(x: Any) -> bool:
        return math.prod(x.shape) >= min_8bit_size

    def init_fn(params: Any) -> ScaleByAdam8bitState:
        def zeros(x: Any, kind: dict) -> Any:
            if not big(x):
                return jnp.zeros(x.shape, jnp.float32)
            zero = int(np.searchsorted(code_map(**kind), 0.0))  # the code of 0.0
            return QuantizedArray(
                jnp.full(x.shape, zero, jnp.uint8),
                jnp.zeros([math.ceil(math.prod(x.shape) / block_size)], jnp.float32),
            )

        return ScaleByAdam8bitState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda x: zeros(x, first), params),
            nu=jax.tree.map(lambda x: zeros(x, second), params),
        )

    def update_fn(updates: Any, state: ScaleByAdam8bitState, params: Any = None):
        del params
        count = safe_increment(state.count)
        t = count.astype(jnp.float32)
        correction1, correction2 = 1 - b1**t, 1 - b2**t

        def leaf(g: jax.Array, m: Any, v: Any) -> tuple[jax.Array, Any, Any]:
            if isinstance(m, QuantizedArray):  # one fused pass: Pallas on GPU/TPU, else jnp
                return _Out(
                    *kernels.adam_8bit_update(
                        g, m, v, b1=b1, b2=b2, eps=eps, correction1=correction1,
                        correction2=correction2, block_size=block_size,
                        quantization=quantization,
                    )
                )
            # small leaves keep float32 moments
            g32 = g.astype(jnp.float32)
            m32 = b1 * m + (1 - b1) * g32
            v32 = b2 * v + (1 - b2) * jnp.square(g32)
            u = (m32 / correction1) / (jnp.sqrt(v32 / correction2) + eps)
            return _Out(u.astype(g.dtype), m32, v32)

        is_q = lambda x: isinstance(x, QuantizedArray)
        outs = jax.tree.map(leaf, updates, state.mu, state.nu, is_leaf=is_q)
        is_out = lambda x: isinstance(x, _Out)
        pick = lambda i: jax.tree.map(lambda o: o[i], outs, is_leaf=is_out)
        return pick(0), ScaleByAdam8bitState(count, pick(1), pick(2))

    return auto_sharded(optax.GradientTransformationExtraArgs(init_fn, update_fn))


class _Out(NamedTuple):
    update: Any
    mu: Any
    nu: Any


def _registry_factory(args: Any, galore: bool = False) -> optax.GradientTransformation:
    from lowrank_jax.optimizers import adamw_8bit, galore_adamw_8bit

    options = dict(
        b1=args.b1,
        b2=args.b2,
        eps=1e-8 if args.eps is None else args.eps,
        weight_decay=args.weight_decay,
    )
    if galore:
        low_rank = dict(
            rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale, seed=args.seed
        )
        return galore_adamw_8bit(args.learning_rate, **{**options, **low_rank, **args.extra})
    return adamw_8bit(args.learning_rate, **{**options, **args.extra})


register_optimizer(
    "adamw_8bit",
    _registry_factory,
    help="lowrank_jax.adamw_8bit (AdamW with block-wise 8-bit moments)",
    default_lr=1e-3,
)
register_optimizer(
    "galore_adamw_8bit",
    lambda args: _registry_factory(args, galore=True),
    help="lowrank_jax.galore_adamw_8bit (8-bit GaLore: 8-bit Adam in the low-rank space)",
    default_lr=1e-2,
    low_rank=True,
)
