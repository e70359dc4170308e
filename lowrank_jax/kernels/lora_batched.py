r"""Batched heterogeneous LoRA (S-LoRA / Punica's BGMV): a different adapter for every token.

.. math:: y_t = (x_t A_{i_t}) B_{i_t}, \qquad A: (N, in, r),\ B: (N, r, out),\ i_t \in [0, N)

Adapters of different ranks are zero-padded to one ``r`` (exact) and their scales folded into
``B``; an all-zero slot serves tokens without an adapter. Switching adapters is new arrays,
never a retrace.

* :func:`lora_batched_reference`: plain jnp. It never gathers a ``(T, in, r)`` copy of the
  factors: ``x`` meets every adapter's ``A`` at once (``(T, N·r)``, cheap for the small ``N``
  of a serving batch), each token keeps its adapter's ``r`` columns, and a one-hot
  ``(T, N·r)`` expansion meets the stacked ``B``. Zero padding and the zero slot add exact
  zeros.
* :func:`lora_batched_pallas`: two Triton kernels, Punica's *shrink* (``v_t = x_t A_{i_t}``,
  one program per token, a loop over ``in`` in chunks) and *expand* (``y_t = v_t B_{i_t}``,
  one program per token and ``out`` tile). Each program reads its token's adapter id and loads
  only that adapter's slices (a pointer offset), so the work is ``T·r·(in + out)`` whatever
  ``N``. GPU only (Triton); on a TPU, and on the CPU, the reference runs (Mosaic would need
  scalar prefetch of the ids).
* :func:`lora_batched`: dispatches between them (see :mod:`lowrank_jax.kernels`).

Like the package's other kernels, this one is tested in interpret mode on the CPU and its
Triton lowering is exported on the CPU; it has not run on a GPU yet.

References:
  Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters", MLSys 2024.
  Chen et al., "Punica: Multi-Tenant LoRA Serving", MLSys 2024.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from lowrank_jax.kernels import _dispatch

__all__ = ["lora_batched", "lora_batched_pallas", "lora_batched_reference"]

_CHUNK = 128  # largest in / out chunk per load (a power of 2, as Triton needs)


def _check(x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array) -> None:
    problems = []
    if x.ndim != 2 or a.ndim != 3 or b.ndim != 3:
        problems.append(f"need x (T, in), a (N, in, r), b (N, r, out); got x{x.shape}, "
                        f"a{a.shape}, b{b.shape}")  # fmt: skip
    elif a.shape[1] != x.shape[1] or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        problems.append(f"shapes disagree: x{x.shape}, a{a.shape}, b{b.shape}")
    if ids.shape != x.shape[:1] or not jnp.issubdtype(ids.dtype, jnp.integer):
        problems.append(f"ids must be integers of shape (T,) = {x.shape[:1]}, got "
                        f"{ids.dtype}{ids.shape}")  # fmt: skip
    for name, arr in (("x", x), ("a", a), ("b", b)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            problems.append(f"{name} must be floating-point, got {arr.dtype}")
    if problems:
        raise ValueError("lora_batched: " + "; ".join(problems) + ".")


def lora_batched_reference(x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array) -> jax.Array:
    r"""``y_t = (x_t A_{i_t}) B_{i_t}`` in plain jnp (float32 accumulation, ``x``'s dtype out).

    Args:
      x: ``(T, in)`` tokens.
      a: ``(N, in, r)`` stacked ``A`` factors.
      b: ``(N, r, out)`` stacked ``B`` factors (scales folded in).
      ids: ``(T,)`` adapter of each token, in ``[0, N)``.

    Returns:
      ``(T, out)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from lowrank_jax.kernels.lora_batched import lora_batched_reference
      >>> a, b = jnp.ones((2, 3, 1)), jnp.stack([jnp.ones((1, 2)), 2 * jnp.ones((1, 2))])
      >>> lora_batched_reference(jnp.ones((2, 3)), a, b, jnp.array([0, 1]))
      Array([[3., 3.],
             [6., 6.]], dtype=float32)
    """
    _check(x, a, b, ids)
    n, n_in, r = a.shape
    xf = x.astype(jnp.float32)
    every = (xf @ jnp.moveaxis(a, 0, 1).reshape(n_in, n * r).astype(jnp.float32)).reshape(-1, n, r)
    onehot = jax.nn.one_hot(ids, n, dtype=jnp.float32)  # (T, N)
    v = jnp.einsum("tnr,tn->tr", every, onehot)
    expanded = (onehot[:, :, None] * v[:, None, :]).reshape(-1, n * r)
    return (expanded @ b.reshape(n * r, -1).astype(jnp.float32)).astype(x.dtype)


def _chunk(n: int) -> int:
    """The largest power of 2 up to :data:`_CHUNK` that divides ``n``."""
    return min(_CHUNK, n & -n)


def _shrink_kernel(ids_ref, x_ref, a_ref, v_ref, *, chunk: int, steps: int):
    adapter = ids_ref[0]

    def body(k: int, acc: jax.Array) -> jax.Array:
        xs = x_ref[0, pl.ds(k * chunk, chunk)].astype(jnp.float32)
        aa = a_ref[adapter, pl.ds(k * chunk, chunk), :].astype(jnp.float32)
        return acc + jnp.sum(xs[:, None] * aa, axis=0)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((v_ref.shape[-1],), jnp.float32))
    v_ref[0, :] = acc


def _expand_kernel(ids_ref, v_ref, b_ref, y_ref, *, chunk: int):
    adapter = ids_ref[0]
    j = pl.program_id(1)
    v = v_ref[0, :]
    bb = b_ref[adapter, :, pl.ds(j * chunk, chunk)].astype(jnp.float32)
    y_ref[0, :] = jnp.sum(v[:, None] * bb, axis=0).astype(y_ref.dtype)


def _unsupported(x: jax.Array, a: jax.Array, b: jax.Array) -> str | None:
    r, n_in, n_out = a.shape[2], a.shape[1], b.shape[2]
    if r & (r - 1) or n_in % 16 or n_out % 16:
        return (f"the kernel needs a power-of-2 rank and in, out divisible by 16; got r={r}, "
                f"in={n_in}, out={n_out} (pad the adapter bank's rank)")  # fmt: skip
    if x.shape[0] == 0:
        return "there are no tokens"
    return None


def lora_batched_pallas(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    ids: jax.Array,
    *,
    target: str = "triton",
    interpret: bool = False,
) -> jax.Array:
    """The Pallas (Triton) kernels of :func:`lora_batched_reference`: shrink, then expand.

    Args:
      x, a, b, ids: as :func:`lora_batched_reference`; the rank must be a power of 2 and
        ``in``, ``out`` multiples of 16.
      target: ``"triton"`` (the only kernel target).
      interpret: run in interpret mode (any backend; for tests).

    Returns:
      ``(T, out)`` in ``x``'s dtype, equal to the reference within float32 round-off.
    """
    _check(x, a, b, ids)
    problem = _unsupported(x, a, b)
    if problem is not None:
        raise ValueError(f"lora_batched_pallas: {problem}.")
    if target != "triton":
        raise ValueError(f"lora_batched_pallas: target must be 'triton', got {target!r}.")
    t, n_in = x.shape
    r, n_out = a.shape[2], b.shape[2]
    ids = ids.astype(jnp.int32)
    options = _dispatch.pallas_options(target, interpret)
    ci, co = _chunk(n_in), _chunk(n_out)
    whole = lambda arr: pl.BlockSpec(arr.shape, lambda *_: (0,) * arr.ndim)  # noqa: E731
    v = pl.pallas_call(
        functools.partial(_shrink_kernel, chunk=ci, steps=n_in // ci),
        out_shape=jax.ShapeDtypeStruct((t, r), jnp.float32),
        grid=(t,),
        in_specs=[
            pl.BlockSpec((1,), lambda i: (i,)),
            pl.BlockSpec((1, n_in), lambda i: (i, 0)),
            whole(a),
        ],
        out_specs=pl.BlockSpec((1, r), lambda i: (i, 0)),
        name="lora_batched_shrink",
        **options,
    )(ids, x, a)
    return pl.pallas_call(
        functools.partial(_expand_kernel, chunk=co),
        out_shape=jax.ShapeDtypeStruct((t, n_out), x.dtype),
        grid=(t, n_out // co),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (i,)),
            pl.BlockSpec((1, r), lambda i, j: (i, 0)),
            whole(b),
        ],
        out_specs=pl.BlockSpec((1, co), lambda i, j: (i, j)),
        name="lora_batched_expand",
        **options,
    )(ids, v, b)


def lora_batched(
    x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array, *, mode: str | None = None
) -> jax.Array:
    r"""``y_t = (x_t A_{i_t}) B_{i_t}``: a different LoRA adapter per token.

    Dispatches like the package's other kernels (``mode``: ``"auto"``, ``"pallas"``,
    ``"interpret"``, ``"reference"``); ``"auto"`` uses the Triton kernels on a CUDA GPU of
    compute capability 8.0 or newer for at least ``MIN_PALLAS_SIZE`` outputs when the shapes
    fit and a one-off probe agrees with the reference, the jnp reference otherwise.

    Args:
      x: ``(T, in)``; ``a``: ``(N, in, r)``; ``b``: ``(N, r, out)`` (scales folded in);
      ids: ``(T,)`` integers in ``[0, N)``.
      mode: see above (default: :func:`~lowrank_jax.kernels.kernel_mode`'s).

    Returns:
      ``(T, out)`` in ``x``'s dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from lowrank_jax.kernels.lora_batched import lora_batched
      >>> a, b = jnp.ones((2, 3, 1)), jnp.ones((2, 1, 2))
      >>> lora_batched(jnp.ones((1, 3)), a, b, jnp.array([1])).shape
      (1, 2)

    References:
      Sheng et al., MLSys 2024 (S-LoRA); Chen et al., MLSys 2024 (Punica).
    """
    _check(x, a, b, ids)
    plan = _dispatch.choose(
        "lora_batched",
        mode,
        supported=_unsupported(x, a, b),
        free_layout=lambda target: target == "triton",
        size=x.shape[0] * b.shape[2],
        probe=lambda target: _probe(target, x.dtype, a.dtype, b.dtype),
    )
    if plan is None or plan[0] != "triton":
        return lora_batched_reference(x, a, b, ids)
    target, interpret = plan
    return lora_batched_pallas(x, a, b, ids, target=target, interpret=interpret)


def _probe(target: str, *dtypes: Any) -> bool:
    x_dtype, a_dtype, b_dtype = dtypes

    def check() -> None:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((37, 64)), x_dtype)
        a = jnp.asarray(rng.standard_normal((3, 64, 8)), a_dtype)
        b = jnp.asarray(rng.standard_normal((3, 8, 48)), b_dtype)
        ids = jnp.asarray(rng.integers(0, 3, 37), jnp.int32)
        want = lora_batched_reference(x, a, b, ids)
        got = jax.jit(functools.partial(lora_batched_pallas, target=target))(x, a, b, ids)
        tol = 64 * float(jnp.finfo(want.dtype).eps)
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol * 8
        )

    return _dispatch.probe_once(f"lora_batched[{target}, {dtypes}]", check)
