r"""LoftQ: LoRA factors that absorb the quantization error of a frozen base.

Starting from :math:`A_0 B_0 = 0`, alternate for :math:`t = 1..T`

.. math::
    Q_t = \mathrm{quant}(W - s A_{t-1} B_{t-1}), \qquad
    s A_t B_t = \text{the best rank-}r\text{ approximation of } W - \mathrm{dequant}(Q_t)

(a truncated SVD, split as PiSSA does: :math:`A = U_r\sqrt{S_r/s}`,
:math:`B = \sqrt{S_r/s}V_r^\top`), and keep :math:`(Q_T, A_T, B_T)`: the adapted model
:math:`\mathrm{dequant}(Q_T) + sA_TB_T` approximates :math:`W` better than
:math:`\mathrm{dequant}(\mathrm{quant}(W))` alone. ``T = 1``
is ZeroQuant-V2's low-rank compensation (LoRC).

Differences from PEFT's ``loftq_init``: PEFT ignores the LoRA scaling (its factors are right only
when ``alpha = r``); here ``A, B`` are divided by ``s`` so any ``alpha`` works. PEFT quantizes
without double quantization; here the base's own storage format is used, double quantization
included, so the base the factors were fitted to is exactly the one stored.

References:
  Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", ICLR 2024.
  https://arxiv.org/abs/2310.08659
  Yao et al., "ZeroQuant-V2: Exploring Post-training Quantization in LLMs", 2023 (LoRC).
  https://arxiv.org/abs/2303.08302
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.reparam import quant
from lowrank_jax.reparam.inits import pissa_factors

__all__ = ["loftq_factors"]


@functools.partial(jax.jit, static_argnames=("rank", "scale", "iters", "options"))
def _alternate(
    w: jax.Array, rank: int, scale: float, iters: int, options: tuple
) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
    fmt, block_size, double_quant, scale_block_size, perm = options

    def quantize(x: jax.Array) -> Any:
        return quant.quantize(
            x,
            fmt,
            block_size=block_size,
            double_quant=double_quant,
            scale_block_size=scale_block_size,
            perm=perm,
        )

    target = w
    errors = []
    for _ in range(iters):
        q = quantize(target)
        base = quant.dequantize(q, jnp.float32)
        a, b = pissa_factors(w - base, rank, scale)
        errors.append(jnp.linalg.norm(w - base - scale * (a @ b)))
        target = w - scale * (a @ b)
    return q, a, b, jnp.stack(errors)


def loftq_factors(
    w: jax.Array,
    rank: int,
    scale: float,
    *,
    iters: int = 1,
    format: str = "nf4",
    block_size: int = 64,
    double_quant: bool | None = None,
    scale_block_size: int = 256,
    perm: tuple[int, ...] | None = None,
) -> tuple[quant.QuantizedTensor, jax.Array, jax.Array, jax.Array]:
    """``(Q_T, A_T, B_T, errors)`` for the weight ``w: (..., in, out)`` (see the module docstring).

    Args:
      w: the float weight (the alternation runs in float32; ``Q_T`` records ``w``'s dtype).
      rank: ``r``.
      scale: the LoRA scaling ``s`` (``alpha / r``).
      iters: ``T >= 1`` alternations.
      format, block_size, double_quant, scale_block_size, perm: the storage format, as
        :func:`lowrank_jax.reparam.quant.quantize`.

    Returns:
      The quantized base, ``A: (..., in, r)`` and ``B: (..., r, out)`` in float32, and
      ``float32[T]``: ``‖W - dequant(Q_t) - s A_t B_t‖_F`` after each alternation ``t = 1..T``.
      Traceable (works under ``jit`` and ``eval_shape``).

    Raises:
      ValueError: ``iters < 1`` or a bad storage option.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax.reparam import loftq_init, quant
      >>> w = jax.random.normal(jax.random.key(0), (64, 64))
      >>> q, a, b, errors = loftq_init.loftq_factors(w, 8, 1.0, iters=2)
      >>> plain = jnp.linalg.norm(w - quant.dequantize(quant.quantize(w)))
      >>> bool(jnp.linalg.norm(w - quant.dequantize(q) - a @ b) < plain)
      True
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"LoftQ needs iters >= 1 alternations, got {iters!r}.")
    quant.check_options(format, block_size, scale_block_size, "LoftQ")
    options = (format, block_size, double_quant, scale_block_size, perm)
    q, a, b, errors = _alternate(jnp.asarray(w, jnp.float32), rank, float(scale), iters, options)
    q = dataclasses.replace(q, dtype=jnp.dtype(w.dtype).name)
    return q, a, b, errors
