"""8-bit optimizer states: block-wise quantized Adam moments (``scale_by_adam_8bit``).

Each large moment is stored in the format of :mod:`lowrank_jax.quantization`: one ``uint8``
code per element (an index into a 256-entry code map of values in ``[-1, 1]``) plus one
``float32`` absmax per block of ``block_size`` consecutive elements. Every step dequantizes to
float32, runs Adam in float32, and requantizes with fresh block maxima, so the only error is
the rounding of the stored state (the dynamic map keeps it to a few percent, see that module).

Reference: Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022;
bitsandbytes ``AdamW8bit``, which galore-torch's ``GaLoreAdamW8bit`` runs on the projected
gradient.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import kernels
from lowrank_jax.quantization import QUANTIZATIONS, QuantizedArray, zero_code
from lowrank_jax.sharding import auto_sharded
from lowrank_jax.transforms._common import check_float_tree, safe_increment

__all__ = ["ScaleByAdam8bitState", "scale_by_adam_8bit"]


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`.

    Attributes:
      count: the step (``int32``).
      mu: per leaf a :class:`~lowrank_jax.quantization.QuantizedArray` (signed map), or a
        ``float32`` array for leaves smaller than ``min_8bit_size``.
      nu: the same for the second moment (unsigned map).
    """

    count: jax.Array
    mu: Any
    nu: Any


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
        check_float_tree(params, "scale_by_adam_8bit")
        def zeros(x: Any, kind: dict) -> Any:
            if not big(x):
                return jnp.zeros(x.shape, jnp.float32)
            return QuantizedArray(
                jnp.full(x.shape, zero_code(**kind), jnp.uint8),
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

        def quantized(g: jax.Array, m: Any, v: Any) -> tuple[jax.Array, Any, Any]:
            return kernels.adam_8bit_update(
                g, m, v, b1=b1, b2=b2, eps=eps, correction1=correction1,
                correction2=correction2, block_size=block_size, quantization=quantization,
            )  # fmt: skip

        def leaf(g: jax.Array, m: Any, v: Any) -> tuple[jax.Array, Any, Any]:
            if isinstance(m, QuantizedArray):  # one fused pass: Pallas on GPU/TPU, else jnp
                if _stacked(g.shape, block_size):
                    return _Out(*_per_slice(quantized, g, m, v))
                return _Out(*quantized(g, m, v))
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


def _stacked(shape: tuple[int, ...], block_size: int) -> bool:
    """A stack of matrices (``[L, ...]``, ``L > 1``) whose every slice is a whole number of
    quantization blocks, so that no block straddles two slices."""
    return len(shape) >= 3 and shape[0] > 1 and math.prod(shape[1:]) % block_size == 0


def _per_slice(update: Any, g: jax.Array, m: QuantizedArray, v: QuantizedArray) -> tuple:
    """``update(g, m, v)`` one leading-axis slice at a time (``lax.map``): the same blocks,
    so the same result bit for bit, but the float32 moments it dequantizes are one slice's (a
    layer's matrix) instead of the whole stack's; all at once they cost XLA the float32
    moments of every stacked leaf together (measured: 8-bit AdamW's llama_1b step held 19 GB
    more temporaries than AdamW's)."""
    n = g.shape[0]

    def one(args: tuple) -> tuple:
        gi, mc, ms, vc, vs = args
        return update(gi, QuantizedArray(mc, ms), QuantizedArray(vc, vs))

    u, m_new, v_new = jax.lax.map(
        one, (g, m.codes, m.scales.reshape(n, -1), v.codes, v.scales.reshape(n, -1))
    )
    flat = lambda q: QuantizedArray(q.codes, q.scales.reshape(-1))
    return u, flat(m_new), flat(v_new)


class _Out(NamedTuple):
    update: Any
    mu: Any
    nu: Any
