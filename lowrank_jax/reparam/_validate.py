"""Argument checks shared by the wave-2 reparameterizations (WeGeFT, SoRA, DyLoRA, ...).

Each check raises a ``ValueError`` that names the method, the argument and the fix, at
construction time (``__post_init__``), so a bad value never reaches ``init`` or a saved config.
"""

from __future__ import annotations

import numbers
from typing import Any


def positive_int(method: str, name: str, value: Any) -> None:
    """``value`` is an ``int >= 1`` (``bool`` is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{method}: {name} must be a positive int, got {value!r}.")


def nonnegative(method: str, name: str, value: Any) -> None:
    """``value`` is a real number ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{method}: {name} must be a number >= 0, got {value!r}.")


def rate(method: str, name: str, value: Any) -> None:
    """``value`` is a probability in ``[0, 1)`` (a dropout rate)."""
    nonnegative(method, name, value)
    if value >= 1:
        raise ValueError(f"{method}: {name} must be in [0, 1), got {value!r}.")


def choice(method: str, name: str, value: Any, options: tuple) -> None:
    """``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"{method}: {name} must be one of {options}, got {value!r}.")


def fits(method: str, path: str, name: str, value: int, limit: int, shape: tuple) -> None:
    """``value <= limit`` for the ``(in, out)`` matrix of leaf ``path``."""
    if value > limit:
        *_, n_in, n_out = shape
        raise ValueError(
            f"{method}: {name}={value} does not fit leaf '{path}' with an (in, out) = "
            f"({n_in}, {n_out}) matrix; use {name} <= {limit} there or exclude the leaf with "
            f"`targets=`."
        )
