"""Fused HF-style Adam step: both moments and the update in one pass over ``g, m, v``.

The arithmetic is :func:`lowrank_jax.scale_by_adam_hf`'s, operation for operation (one
function, :func:`_adam_hf`, is the reference and the kernel body), so the transform can call
:func:`adam_hf_update` per leaf instead of its three ``tree.map`` passes. GaLore, Fira and
the other projected methods run this Adam on the low-rank gradient; the back-projection matmul
stays with XLA.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from lowrank_jax.kernels import _dispatch
from lowrank_jax.kernels._dispatch import LANES

__all__ = ["AdamUpdate", "adam_hf_update", "adam_hf_update_pallas", "adam_hf_update_reference"]

# Rows of 128 lanes per grid step: 4096 elements per Triton program, 64K per TPU step
# (six 256 KiB float32 buffers, double-buffered: 3 MiB of VMEM).
_PREFERRED_ROWS = {"triton": 32, "tpu": 512}


class AdamUpdate(NamedTuple):
    """The update and the new moments, each in the shape of the gradient."""

    update: jax.Array
    mu: jax.Array
    nu: jax.Array


def _adam_hf(g, m, v, factor, b1, b2, eps):
    m = b1 * m + (1 - b1) * g.astype(m.dtype)
    v = b2 * v + (1 - b2) * jnp.square(g)
    return (factor * (m / (jnp.sqrt(v) + eps))).astype(g.dtype), m, v


def _check(g: jax.Array, m: jax.Array, v: jax.Array, factor: Any) -> jax.Array:
    for name, x in (("g", g), ("m", m), ("v", v)):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"adam_hf_update: {name} must be a float array, got {x.dtype}.")
    if not g.shape == m.shape == v.shape:
        raise ValueError(
            f"adam_hf_update: g, m and v must have one shape, got {g.shape}, {m.shape}, {v.shape}."
        )
    factor = jnp.asarray(factor, jnp.float32)
    if factor.size != 1:
        raise ValueError(f"adam_hf_update: factor must be a scalar, got shape {factor.shape}.")
    return factor.reshape(())


def adam_hf_update_reference(
    g: jax.Array, m: jax.Array, v: jax.Array, *, b1: Any, b2: Any, eps: Any, factor: Any
) -> AdamUpdate:
    r"""HF-style Adam on one leaf in plain jnp (``scale_by_adam_hf``'s arithmetic).

    .. math::
        m' = \beta_1 m + (1-\beta_1) g,\quad v' = \beta_2 v + (1-\beta_2) g^2,\quad
        u = f\,\frac{m'}{\sqrt{v'} + \epsilon}

    Args:
      g, m, v: gradient and moments (one shape; ``m`` sets the first moment's dtype).
      b1, b2, eps: Adam constants.
      factor: ``f``, a float32 scalar: ``sqrt(1 - b2^t) / (1 - b1^t)`` (or 1).

    Returns:
      ``AdamUpdate(update, mu, nu)``; ``update`` has ``g``'s dtype.

    References:
      HuggingFace ``transformers.AdamW`` (eps before bias correction), as galore-torch.
    """
    return AdamUpdate(*_adam_hf(g, m, v, _check(g, m, v, factor), b1, b2, eps))


def _kernel(f_ref, g_ref, m_ref, v_ref, u_ref, m_out, v_out, *, b1, b2, eps):
    u, m, v = _adam_hf(g_ref[...], m_ref[...], v_ref[...], f_ref[...], b1, b2, eps)
    u_ref[...] = u
    m_out[...] = m
    v_out[...] = v


def _layout(g: jax.Array, m: jax.Array, v: jax.Array, target: str, block_rows: Any = None):
    tile = _dispatch.sublane_tile(g.dtype, m.dtype, v.dtype)
    return _dispatch.row_layout(g.size, LANES, target, _PREFERRED_ROWS[target], tile, block_rows)


def adam_hf_update_pallas(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    *,
    b1: float,
    b2: float,
    eps: float,
    factor: Any,
    target: str = "triton",
    interpret: bool = False,
    block_rows: int | None = None,
) -> AdamUpdate:
    r"""The Pallas kernel of :func:`adam_hf_update_reference`: one read and one write each.

    The leaf is viewed as ``(ceil(size / 128), 128)`` and the grid walks blocks of rows that
    divide it (padded only when ``size % 128`` or no block size fits, see
    ``_dispatch.row_layout``); ``m`` and ``v`` are aliased to their outputs, so a donated
    state is updated in place.

    Args:
      g, m, v, factor: as :func:`adam_hf_update_reference`.
      b1, b2, eps: Python numbers (compiled into the kernel).
      target: ``"triton"`` (CUDA GPU) or ``"tpu"`` (Mosaic); the block rules to follow.
      interpret: run in interpret mode (any backend; a TPU target uses the TPU interpreter).
      block_rows: rows per grid step (default: up to 32 on Triton, 512 on a TPU).

    Returns:
      ``AdamUpdate(update, mu, nu)``, equal to the reference within float32 round-off (in
      interpret mode: bit for bit).
    """
    factor = _check(g, m, v, factor).reshape(1, 1)
    if not _dispatch.is_static_number(b1, b2, eps):
        raise ValueError("adam_hf_update_pallas: b1, b2 and eps must be Python numbers.")
    shape = g.shape
    _, rows, br = _layout(g, m, v, target, block_rows)
    g2, m2, v2 = (_dispatch.to_rows(x, LANES, rows) for x in (g, m, v))
    spec = pl.BlockSpec((br, LANES), lambda i: (i, 0))
    outs = jax.eval_shape(functools.partial(_adam_hf, b1=b1, b2=b2, eps=eps), g2, m2, v2, factor)
    aliases = {2: 1} if outs[1].dtype == m2.dtype else {}
    if outs[2].dtype == v2.dtype:
        aliases[3] = 2
    u, m_new, v_new = pl.pallas_call(
        functools.partial(_kernel, b1=b1, b2=b2, eps=eps),
        out_shape=tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs),
        grid=(rows // br,),
        in_specs=[pl.BlockSpec((1, 1), lambda i: (0, 0)), spec, spec, spec],
        out_specs=(spec, spec, spec),
        input_output_aliases=aliases,
        name="adam_hf_update",
        **_dispatch.pallas_options(target, interpret),
    )(factor, g2, m2, v2)
    return AdamUpdate(*(_dispatch.from_rows(x, shape) for x in (u, m_new, v_new)))


def adam_hf_update(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    *,
    b1: Any,
    b2: Any,
    eps: Any,
    factor: Any,
    mode: str | None = None,
) -> AdamUpdate:
    r"""HF-style Adam on one leaf, as a fused Pallas kernel where that is expected to pay.

    .. math::
        m' = \beta_1 m + (1-\beta_1) g,\quad v' = \beta_2 v + (1-\beta_2) g^2,\quad
        u = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m'}{\sqrt{v'} + \epsilon}

    Args:
      g, m, v: gradient and moments of one leaf (one shape).
      b1, b2, eps: Adam constants (Python numbers for the kernel; traced values use the
        reference).
      factor: float32 scalar, the bias-correction factor above (or 1).
      mode: ``"auto"``, ``"pallas"``, ``"interpret"`` or ``"reference"`` (default: the
        :func:`~lowrank_jax.kernels.kernel_mode` in force); see :mod:`lowrank_jax.kernels`.

    Returns:
      ``AdamUpdate(update, mu, nu)``; ``update`` has ``g``'s dtype.

    Raises:
      ValueError: mismatched shapes, non-float arrays, a non-scalar factor, or a forced Pallas
        mode that cannot run.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax.kernels as K
      >>> out = K.adam_hf_update(jnp.ones(4), jnp.zeros(4), jnp.zeros(4), b1=0.9, b2=0.999,
      ...                        eps=1e-6, factor=jnp.float32(1.0))
      >>> out.mu
      Array([0.1, 0.1, 0.1, 0.1], dtype=float32)

    References:
      HuggingFace ``transformers.AdamW``; galore-torch ``GaLoreAdamW``.
    """
    _check(g, m, v, factor)
    static = _dispatch.is_static_number(b1, b2, eps)
    plan = _dispatch.choose(
        "adam_hf_update",
        mode,
        supported=(
            "b1, b2 and eps must be Python numbers"
            if not static
            else "the arrays are empty"
            if g.size == 0
            else None
        ),
        free_layout=lambda target: (
            g.size % LANES == 0 and len(set(_layout(g, m, v, target)[:2])) == 1
        ),
        size=g.size,
        probe=lambda target: _probe(target, g.dtype, m.dtype, v.dtype, b1, b2, eps),
        # "auto" keeps XLA's fusion of the reference everywhere: on an H200 it was faster
        # (benchmarks/gpu.py, kernels), and compiled for one v5e chip the kernel costs more
        # memory (APOLLO, llama_60m: a 516 MB peak with it against 371 MB without)
        auto_targets=(),
    )
    if plan is None:
        return adam_hf_update_reference(g, m, v, b1=b1, b2=b2, eps=eps, factor=factor)
    target, interpret = plan
    return adam_hf_update_pallas(
        g, m, v, b1=b1, b2=b2, eps=eps, factor=factor, target=target, interpret=interpret
    )


def _probe(target: str, *key: Any) -> bool:
    g_dtype, m_dtype, v_dtype, b1, b2, eps = key

    def check() -> None:
        rng = np.random.default_rng(0)
        shape = (96, LANES)
        g = jnp.asarray(rng.standard_normal(shape), g_dtype)
        m = jnp.asarray(0.1 * rng.standard_normal(shape), m_dtype)
        v = jnp.asarray(rng.uniform(0.0, 1.0, shape), v_dtype)
        args = dict(b1=b1, b2=b2, eps=eps, factor=jnp.float32(0.5))
        want = adam_hf_update_reference(g, m, v, **args)
        got = jax.jit(functools.partial(adam_hf_update_pallas, target=target, **args))(g, m, v)
        for a, b in zip(got, want, strict=True):
            tol = 8 * float(jnp.finfo(b.dtype).eps)
            np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
            )

    return _dispatch.probe_once(f"adam_hf_update[{target}, {key}]", check)
