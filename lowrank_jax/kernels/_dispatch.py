"""When a kernel runs as Pallas and how: the mode, the target backend, layouts, a probe.

Modes (the ``mode=`` argument of every public kernel function, else :func:`kernel_mode`'s
context, else the ``LOWRANK_JAX_KERNELS`` environment variable, else ``"auto"``):

- ``"auto"``: Pallas on a CUDA GPU of compute capability 8.0 or newer or on a TPU, when only
  one device is visible (a ``pallas_call`` is opaque to XLA's SPMD partitioner, which would
  gather sharded states whole), the array needs no padding copy, it has at least
  :data:`MIN_PALLAS_SIZE` elements, and a one-off probe of the kernel on this device compiled
  and agreed with the reference; the plain-jnp reference otherwise -- always on the CPU.
- ``"pallas"``: Pallas, compiled for the device (an error on the CPU).
- ``"interpret"``: Pallas in interpret mode (any backend; slow, for tests and debugging).
- ``"reference"``: the plain-jnp reference.

GPU backend: Triton, chosen explicitly with ``pltriton.CompilerParams`` (jax 0.10.2 would
otherwise lower a plain ``pallas_call`` with Mosaic GPU, which needs a Hopper-or-newer GPU and
is deprecated for ``pallas_call`` in favour of ``plgpu.kernel``). Triton runs on Ampere and
newer -- the 24 GB cards (RTX 3090/4090, A10, L4) as well as A100/H100 -- and its blocks only
need power-of-2 dimensions, which the ``(rows, 128·k)`` layouts here satisfy together with the
TPU's (8, 128) rule. Triton does not mask a block that runs past the end of an array, so every
grid step covers whole rows (:func:`row_layout`). JAX 0.11 deprecates the Triton backend:
revisit before leaving 0.10.x.

The kernels are tested in interpret mode on the CPU, and their lowering to Triton and Mosaic
TPU is checked on the CPU by ``jax.export``; the probe is the guard for what those checks
cannot see. On a GPU (NVIDIA H200, jax 0.11.2, ``python benchmarks/gpu.py --sections kernels
--models llama_130m --kernel-layers 2``) every kernel compiled and ran, forced with
``"pallas"``; the fused HF-Adam step took 1.27x the time of XLA's own fusion of the reference
(1.55 vs 1.22 ms for the moments of two layers), so ``"auto"`` keeps it for TPUs; the 8-bit
step took 0.68x (1.69 vs 2.49 ms).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "ENV_VAR",
    "MIN_PALLAS_SIZE",
    "MODES",
    "TARGETS",
    "accelerator_target",
    "compile_for",
    "current_mode",
    "kernel_mode",
]

MODES = ("auto", "pallas", "interpret", "reference")
TARGETS = ("triton", "tpu")
ENV_VAR = "LOWRANK_JAX_KERNELS"
# Below this many elements XLA's own fusions (launched together, horizontally fused) are
# expected to win; a design-time guess, to be set from benchmarks/gpu.py's kernel rows.
MIN_PALLAS_SIZE = 1 << 16
LANES = 128

_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernel_mode", default=None)
# (target, devices) set by compile_for: dispatch as on a device this host does not have.
_COMPILE_FOR: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "compile_for", default=None
)


def _check_mode(mode: Any, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{where}: kernel mode must be one of {MODES}, got {mode!r}.")
    return mode


def current_mode() -> str:
    """The mode in force: :func:`kernel_mode`'s, else ``$LOWRANK_JAX_KERNELS``, else auto."""
    mode = _MODE.get()
    if mode is not None:
        return mode
    return _check_mode(os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}")


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Context in which kernel functions called without ``mode=`` use ``mode``.

    The choice is made when a function is traced and is not part of ``jax.jit``'s cache key:
    wrap the first call of a jitted step, and jit a fresh function to trace it again under
    another mode.

    Args:
      mode: one of :data:`MODES`.

    Example:
      >>> import lowrank_jax.kernels as K
      >>> with K.kernel_mode("reference"):
      ...     K.current_mode()
      'reference'
    """
    token = _MODE.set(_check_mode(mode, "kernel_mode"))
    try:
        yield
    finally:
        _MODE.reset(token)


@contextlib.contextmanager
def compile_for(target: str, devices: int = 1) -> Iterator[None]:
    """Context in which kernels are dispatched as on ``target`` (``"tpu"`` or ``"triton"``)
    with ``devices`` devices, for a step lowered here and compiled for such a device
    (:func:`lowrank_jax.train.memory_plan.plan_memory`'s TPU targets compile on a CPU host).

    ``"auto"`` then picks what it would pick there, without the probe (it would have to run
    the kernel): so a compile-only memory figure is that of the program the device runs.
    """
    if target not in TARGETS:
        raise ValueError(f"compile_for: target must be one of {TARGETS}, got {target!r}.")
    token = _COMPILE_FOR.set((target, devices))
    try:
        yield
    finally:
        _COMPILE_FOR.reset(token)


def lowering_target() -> str | None:
    """:func:`accelerator_target`, or the target of the :func:`compile_for` block in force."""
    emulated = _COMPILE_FOR.get()
    return emulated[0] if emulated else accelerator_target()


def _cuda_capability() -> tuple[int, int] | None:
    """``(major, minor)`` of the first device when it is a CUDA GPU, else ``None``."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major, minor = str(capability).split(".")[:2]
        return int(major), int(minor)
    except ValueError:  # absent, or not "major.minor" (ROCm reports gfx names)
        return None


def accelerator_target() -> str | None:
    """``"triton"`` (CUDA, compute capability >= 8.0), ``"tpu"``, or ``None`` (no kernels)."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    if backend == "gpu":
        capability = _cuda_capability()
        if capability is not None and capability >= (8, 0):
            return "triton"
    return None


def _single_device() -> bool:
    return jax.device_count() == 1


# the list of record_choices() in force: each Pallas dispatch traced within appends to it
_CHOSEN: contextvars.ContextVar[list | None] = contextvars.ContextVar("pallas_chosen", default=None)


@contextlib.contextmanager
def record_choices() -> Iterator[list[tuple[str, str]]]:
    """Collects ``(kernel, target)`` for each Pallas kernel :func:`choose` picks while the
    block traces (the non-finite guard asks whether an update runs an in-place kernel)."""
    chosen: list[tuple[str, str]] = []
    token = _CHOSEN.set(chosen)
    try:
        yield chosen
    finally:
        _CHOSEN.reset(token)


def _recorded(choose: Callable) -> Callable:
    """``choose``, also appending each Pallas pick to the :func:`record_choices` list."""

    @functools.wraps(choose)
    def recorded(kernel: str, *args: Any, **kwargs: Any) -> tuple[str, bool] | None:
        plan = choose(kernel, *args, **kwargs)
        chosen = _CHOSEN.get()
        if plan is not None and chosen is not None:
            chosen.append((kernel, plan[0]))
        return plan

    return recorded


@_recorded
def choose(
    kernel: str,
    mode: str | None,
    *,
    supported: str | None,
    free_layout: Callable[[str], bool],
    size: int,
    probe: Callable[[str], bool],
    auto_targets: tuple[str, ...] = TARGETS,
) -> tuple[str, bool] | None:
    """``(target, interpret)`` for a Pallas run, or ``None`` for the reference.

    Args:
      kernel: the public function's name (for errors).
      mode: the caller's ``mode=`` (``None``: :func:`current_mode`).
      supported: ``None`` when the kernel can take these arguments, else why not.
      free_layout: ``target -> bool``, whether the arguments reshape to the kernel's layout
        on ``target`` without a padding copy.
      size: elements per array.
      probe: ``target -> bool``, whether the compiled kernel works on this device (auto only).
      auto_targets: the targets where ``"auto"`` may pick the kernel (where it was measured
        to beat XLA's own fusion).

    Raises:
      ValueError: a forced Pallas mode with unsupported arguments, or ``"pallas"`` without a
        GPU/TPU.
    """
    mode = _check_mode(current_mode() if mode is None else mode, kernel)
    if mode == "reference":
        return None
    emulated = _COMPILE_FOR.get()
    target = emulated[0] if emulated else accelerator_target()
    if mode in ("pallas", "interpret") and supported is not None:
        raise ValueError(f"{kernel}: the Pallas kernel cannot run here: {supported}.")
    if mode == "interpret":
        return target or "triton", True
    if mode == "pallas":
        if target is None:
            raise ValueError(
                f"{kernel}: mode='pallas' needs a CUDA GPU (compute capability >= 8.0) or a "
                f"TPU, but the default backend is {jax.default_backend()!r}; use "
                "mode='interpret' (slow, for tests) or mode='reference'."
            )
        return target, False
    if (
        target is None
        or target not in auto_targets
        or supported is not None
        or size < MIN_PALLAS_SIZE
        or not free_layout(target)
        or not (emulated[1] == 1 if emulated else _single_device())
        or not (emulated or probe(target))
    ):
        return None
    return target, False


_PROBES: dict[str, bool] = {}


def probe_once(name: str, check: Callable[[], None]) -> bool:
    """Runs ``check`` once per process and ``name``; a failure warns and disables the kernel.

    ``check`` runs eagerly even while a jitted step is being traced, so it may compile and run
    the kernel on concrete arrays and compare it with the reference.
    """
    if name not in _PROBES:
        try:
            with jax.ensure_compile_time_eval():
                check()
            _PROBES[name] = True
        except Exception as err:  # noqa: BLE001 -- any failure means: use the reference
            first = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(
                f"lowrank_jax.kernels: the Pallas kernel {name} failed its probe on "
                f"{jax.devices()[0].device_kind} ({type(err).__name__}: {first}); "
                "using the jnp reference.",
                RuntimeWarning,
                stacklevel=3,
            )
            _PROBES[name] = False
    return _PROBES[name]


def is_static_number(*values: Any) -> bool:
    """Whether every value is a Python int/float (kernels bake them in as constants)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def row_layout(
    size: int, width: int, target: str, preferred: int, tile: int, block_rows: int | None = None
) -> tuple[int, int, int]:
    """``(rows, padded_rows, rows_per_step)`` for ``size`` elements viewed as ``(rows, width)``.

    Every grid step covers whole rows inside the (padded) array: Triton does not mask a block
    that runs past the end of an array, so none may. Triton: the largest power of 2 up to
    ``preferred`` that divides ``rows``. TPU: all rows when they fit in one step, else such a
    power of 2 if it is a multiple of ``tile`` (the dtype's sublane tiling: 8 for float32, 16
    for bfloat16, 32 for uint8), else ``preferred`` rows over a padded array.

    Args:
      size: elements of the array. width: elements per row.
      target: ``"triton"`` or ``"tpu"``.
      preferred: rows per step for a large array (a power of 2, a multiple of ``tile``).
      tile: the TPU sublane tiling of the kernel's narrowest dtype.
      block_rows: force the rows per step (tests); the array is padded to a multiple.
    """
    rows = max(1, -(-size // width))
    if block_rows:
        step = block_rows
    elif target == "tpu" and rows <= preferred:
        step = rows
    else:
        step = min(preferred, rows & -rows)
        if target == "tpu" and step % tile:
            step = preferred
    return rows, -(-rows // step) * step, step


def to_rows(x: jax.Array, width: int, rows: int, fill: Any = 0) -> jax.Array:
    """``x`` flattened row-major into ``(rows, width)``, padded with ``fill`` past its end."""
    flat = x.reshape(-1)
    pad = rows * width - flat.size
    if pad:
        flat = jnp.concatenate([flat, jnp.full((pad,), fill, flat.dtype)])
    return flat.reshape(rows, width)


def from_rows(rows: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`to_rows`: drops the padding and restores ``shape``."""
    size = math.prod(shape)
    flat = rows.reshape(-1)
    return (flat[:size] if flat.size != size else flat).reshape(shape)


def sublane_tile(*dtypes: Any) -> int:
    """The TPU sublane tiling of the narrowest of ``dtypes`` (8 rows of 32-bit values)."""
    return 32 // min(jnp.dtype(d).itemsize for d in dtypes)


def pallas_options(target: str, interpret: bool) -> dict[str, Any]:
    """``interpret=`` and ``compiler_params=`` of a ``pl.pallas_call`` for ``target``.

    Triton is selected explicitly (see the module docstring); a TPU target in interpret mode
    runs on the TPU interpreter (``pltpu.InterpretParams``), which also checks out-of-bounds
    accesses.
    """
    if target == "triton":
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=4, num_stages=1)
        return dict(interpret=bool(interpret), compiler_params=params)
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        params = pltpu.CompilerParams(dimension_semantics=("parallel",))
        return dict(
            interpret=pltpu.InterpretParams() if interpret else False, compiler_params=params
        )
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
