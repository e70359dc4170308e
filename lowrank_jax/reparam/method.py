"""The interface of one reparameterization method, and the registry that loads methods by name.

A *method* rewrites one matrix. It sees the weight in the canonical layout ``w: (..., in, out)``
(a Flax kernel; leading axes are batch axes, e.g. scan-stacked layers) and describes the
effective weight in *affine form*

.. math::
    W' = c \\odot W + \\Delta, \\qquad c \\in \\mathbb{R}^{\\dots \\times 1 \\times out}
    \\text{ (a per-output-column scale, or none)}

which covers the additive methods (LoRA, VeRA, DiaBlo, ...: no scale) and DoRA
(``c = m/‖W+sAB‖``). A new method is a frozen dataclass subclassing :class:`Method`, decorated
with :func:`register`, in its own file.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Method",
    "check_rate",
    "f32",
    "kaiming_uniform",
    "method_class",
    "normal",
    "positive_int",
    "register",
    "uniform",
]

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: makes a method loadable by name (see :mod:`lowrank_jax.reparam.io`)."""
    _METHODS[cls.__name__] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered method class called ``name``."""
    if name not in _METHODS:
        raise ValueError(f"unknown reparameterization method {name!r}; known: {sorted(_METHODS)}")
    return _METHODS[name]


def positive_int(method: str, name: str, value: Any) -> int:
    """``value`` when it is an integer ``>= 1``; else a one-line error naming the argument.

    Raises:
      TypeError: not an integer (``rank=4.0``).
      ValueError: smaller than 1 (``rank=0``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{method}: {name} must be an integer >= 1, got {value!r} ({type(value).__name__})"
        )
    if value < 1:
        raise ValueError(f"{method}: {name} must be an integer >= 1, got {value}")
    return int(value)


def check_rate(method: str, name: str, value: Any) -> float:
    """``value`` when it is a number in ``[0, 1)`` (a dropout rate); else a one-line error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{method}: {name} must be a number in [0, 1), got {value!r}")
    return float(value)


_FIELD_TYPES = {
    "int": (numbers.Integral,),
    "float": (numbers.Real,),
    "bool": (bool, np.bool_),
    "str": (str,),
}


def f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
    """``U(-bound, bound)`` float32 of ``shape``.

    Drawn flat and reshaped: the same values as ``jax.random.uniform(key, shape)`` (the
    threefry counters are the row-major index either way) but several times cheaper to compile
    for the 3-D shapes of stacked kernels.
    """
    size = int(np.prod(shape))
    return jax.random.uniform(key, (size,), jnp.float32, -bound, bound).reshape(shape)


def normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal float32 of ``shape``, drawn flat (see :func:`uniform`)."""
    return jax.random.normal(key, (int(np.prod(shape)),), jnp.float32).reshape(shape)


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PyTorch's ``kaiming_uniform_(a=√5)`` (nn.Linear's default): ``U(±1/√fan_in)``."""
    return uniform(key, shape, 1.0 / np.sqrt(fan_in))


@dataclasses.dataclass(frozen=True)
class Method:
    """Base class of a reparameterization of one canonical matrix ``w: (..., in, out)``.

    Subclasses are frozen dataclasses (their fields are the hyperparameters, saved as JSON) and
    define ``init`` and either ``delta`` (additive methods) or ``affine``; ``product`` when the
    effective product ``x @ W'`` is cheaper than materialising ``W'``.

    Example (a new method: one trainable output shift per matrix, ``W' = W + 1 bᵀ``):
      >>> import dataclasses, jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> @reparam.register
      ... @dataclasses.dataclass(frozen=True)
      ... class RowShift(reparam.Method):
      ...     def init(self, key, w, *, path, stats=None):
      ...         return {}, {"b": jnp.zeros(w.shape[:-2] + w.shape[-1:])}
      ...     def delta(self, w, frozen, trainable):
      ...         return jnp.broadcast_to(trainable["b"][..., None, :], w.shape)
      >>> rp = reparam.Reparam(RowShift())
      >>> _, adapters = rp.init(jax.random.key(0), {"w": jnp.ones((4, 3))})
      >>> reparam.num_trainable(adapters)
      3
    """

    #: ``"gradients"`` or ``"activations"`` when ``init`` needs calibration statistics.
    calibration: ClassVar[str | None] = None
    #: ``True`` when ``Δ`` depends on ``W`` beyond a column scale (WeGeFT's ``GW``, Hydra's
    #: ``WS``, MiSS-bat): :func:`~lowrank_jax.reparam.unmerge` then calls :meth:`invert`.
    weight_dependent: ClassVar[bool] = False

    def __post_init__(self):
        """Checks each hyperparameter against its annotation (``rank: int`` refuses 4.0)."""
        for field in dataclasses.fields(self):
            kind = str(field.type).replace(" ", "")
            optional = kind.endswith("|None")
            kinds = _FIELD_TYPES.get(kind.removesuffix("|None"))
            value = getattr(self, field.name)
            if kinds is None or (optional and value is None):
                continue
            wrong_bool = isinstance(value, bool) and bool not in kinds
            if wrong_bool or not isinstance(value, kinds):
                raise TypeError(
                    f"{type(self).__name__}: {field.name} must be {kind.removesuffix('|None')}"
                    f"{' or None' if optional else ''}, got {value!r} ({type(value).__name__})"
                )

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        """Raises ``ValueError`` (naming ``path`` and the fix) if the method cannot adapt it."""

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        """Returns ``(frozen, trainable)``: two dicts of arrays for canonical weight ``w``."""
        raise NotImplementedError

    def residual(self, w: jax.Array, frozen: dict, trainable: dict) -> jax.Array:
        """The base that replaces ``w`` at init (PiSSA & co. subtract their start); default w."""
        return w

    def delta(self, w: jax.Array, frozen: dict, trainable: dict) -> jax.Array:
        """The additive update ``ΔW: (..., in, out)`` in float32."""
        raise NotImplementedError

    def affine(
        self, w: jax.Array, frozen: dict, trainable: dict, scale: jax.Array | None = None
    ) -> tuple[jax.Array | None, jax.Array]:
        """``(c, Δ)`` with ``W' = c ⊙ W + Δ``; ``c`` is ``None`` for additive methods.

        ``scale`` (a ``c`` recorded at merge time) replaces the one computed from ``w``; with
        it given, only ``w.shape`` may be used (:func:`unmerge` passes the merged weight).
        """
        return None, self.delta(w, frozen, trainable)

    def invert(self, merged: jax.Array, frozen: dict, trainable: dict, weight: float) -> jax.Array:
        """The base ``W`` with ``W + weight·(W' - W) = merged`` (float32), for methods whose
        ``weight_dependent`` is set; additive and column-scale methods never need it."""
        raise ValueError(
            f"{type(self).__name__} sets weight_dependent but defines no invert(); unmerge "
            f"cannot recover the base weights."
        )

    def apply(self, w: jax.Array, frozen: dict, trainable: dict) -> jax.Array:
        """The effective weight ``W' = c ⊙ W + Δ`` (float32)."""
        scale, delta = self.affine(f32(w), frozen, trainable)
        return (f32(w) if scale is None else scale * f32(w)) + delta

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        """``x @ W'`` in the canonical output layout of contraction ``c`` (see ``_einsum``).

        ``x_drop`` is ``x`` after adapter dropout (``x`` itself when there is none). The default
        materialises ``W'``; methods override it to keep ``ΔW`` factored.
        """
        return c.into(x, self.apply(w, frozen, trainable).astype(x.dtype))

    def plan(self, stats: Mapping[str, Any], shapes: Mapping[str, tuple]) -> dict[str, dict]:
        """Per-path field overrides decided from every site's statistics (EVA's rank budget)."""
        return {}
