"""Which parameter leaves a method touches, and which axes of a leaf form its matrix.

Every method in lowrank_jax resolves its ``targets`` argument with :func:`resolve` and its
``dims`` argument with :func:`resolve_dims`, so the rules are the same everywhere:

* ``targets=None`` selects every floating leaf with two or more dimensions whose path does not
  name an embedding, a head, a norm or a bias (:func:`default_target`).
* a string is a regular expression searched (``re.search``) in the ``/``-joined leaf path, for
  example ``r"attn/(q|v)_proj"``; a sequence of strings selects a leaf when any of them matches.
* a callable ``(path: str, leaf) -> bool``. In optax transforms it is called with parameters in
  ``init`` and with updates in ``update``, so it may look at paths and shapes, never values.
* a pytree of bools with the structure of the parameters (or a prefix of it).

A pattern or callable that selects nothing raises ``ValueError`` listing the available paths.

Paths are the ``/``-joined keys of a leaf: dict keys, sequence indices, attribute names.
Flax NNX's trailing ``.value`` is dropped, so a model's kernel reads
``layers/3/attn/q_proj/kernel`` whether it comes from ``nnx.state`` or a pure dict.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MatrixDims",
    "Targets",
    "default_target",
    "leaf_paths",
    "path_str",
    "resolve",
    "resolve_dims",
]


class MatrixDims(NamedTuple):
    """The input and output axes of a weight; every other axis is a batch axis.

    Flax kernels are ``(in, out)``: ``MatrixDims(-2, -1)`` (the default). PyTorch-layout weights
    ``(out, in)`` are ``MatrixDims(in_axis=-1, out_axis=-2)``. A scan-stacked kernel
    ``[L, in, out]`` keeps the default: ``L`` is a batch axis and each of the ``L`` matrices gets
    its own projector.
    """

    in_axis: int = -2
    out_axis: int = -1

    def normalize(self, ndim: int, path: str = "") -> MatrixDims:
        """Returns the dims with non-negative axes, checked against ``ndim``."""
        axes = []
        for name, axis in (("in_axis", self.in_axis), ("out_axis", self.out_axis)):
            if not -ndim <= axis < ndim:
                raise ValueError(
                    f"{_where(path)}MatrixDims.{name}={axis} is out of range for a leaf with "
                    f"{ndim} dimensions; give axes within [-{ndim}, {ndim})."
                )
            axes.append(axis % ndim)
        if axes[0] == axes[1]:
            raise ValueError(
                f"{_where(path)}MatrixDims has in_axis == out_axis == {axes[0]}; they must differ."
            )
        return MatrixDims(*axes)

    def to_canonical(self, x: jax.Array) -> jax.Array:
        """``x`` with its in and out axes last: ``(..., in, out)`` (axes as given, any sign)."""
        if MatrixDims(self.in_axis % x.ndim, self.out_axis % x.ndim) == (x.ndim - 2, x.ndim - 1):
            return x
        return jnp.moveaxis(x, (self.in_axis, self.out_axis), (-2, -1))

    def from_canonical(self, x: jax.Array) -> jax.Array:
        """Inverse of :meth:`to_canonical`."""
        if MatrixDims(self.in_axis % x.ndim, self.out_axis % x.ndim) == (x.ndim - 2, x.ndim - 1):
            return x
        return jnp.moveaxis(x, (-2, -1), (self.in_axis, self.out_axis))

    def canonical_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of :meth:`to_canonical` of an array of ``shape``."""
        dims = self.normalize(len(shape))
        rest = [n for a, n in enumerate(shape) if a not in dims]
        return (*rest, shape[dims.in_axis], shape[dims.out_axis])


Targets = Union[None, str, Sequence[str], Callable[[str, Any], bool], Any]  # noqa: UP007

_EXCLUDED_NAME = re.compile(
    r".*embed.*|(lm_)?head|.*norm.*|ln(_\w+|\d*)|bias|wte|wpe", re.IGNORECASE
)


def _key_str(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath: Sequence[Any]) -> str:
    """The ``/``-joined path of a ``jax.tree_util`` key path (NNX ``.value`` dropped)."""
    parts = [_key_str(k) for k in keypath]
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def leaf_paths(tree: Any) -> list[str]:
    """The paths of every leaf of ``tree``, in ``jax.tree.leaves`` order."""
    return [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_float(leaf: Any) -> bool:
    return jnp.issubdtype(np.dtype(leaf.dtype), jnp.floating)


def default_target(path: str, leaf: Any) -> bool:
    """A floating leaf with ``ndim >= 2`` that is not an embedding, head, norm or bias."""
    if np.ndim(leaf) < 2 or not _is_float(leaf):
        return False
    return not any(_EXCLUDED_NAME.fullmatch(part) for part in path.split("/"))


def _as_predicate(targets: Targets) -> Callable[[str, Any], bool] | None:
    if targets is None:
        return default_target
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return lambda path, leaf: pattern.search(path) is not None
    if (
        isinstance(targets, Sequence)
        and targets
        and all(isinstance(t, str) for t in targets)
    ):
        patterns = [re.compile(t) for t in targets]
        return lambda path, leaf: any(p.search(path) for p in patterns)
    if callable(targets):
        return targets
    return None


def _describe(targets: Targets) -> str:
    if isinstance(targets, str):
        return f"pattern {targets!r}"
    if callable(targets):
        return f"callable {getattr(targets, '__name__', targets)!r}"
    return f"targets {targets!r}"


def _available(tree: Any, limit: int = 40) -> str:
    rows = [
        f"  {path_str(kp)}  {tuple(np.shape(leaf))}"
        for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]
    if len(rows) > limit:
        rows = rows[:limit] + [f"  ... and {len(rows) - limit} more"]
    return "\n".join(rows)


def resolve(targets: Targets, tree: Any, *, method: str = "this method") -> Any:
    """Resolves ``targets`` against ``tree`` into a pytree of Python bools.

    Args:
      targets: ``None``, a regex, a sequence of regexes, a callable ``(path, leaf) -> bool`` or
        a bool pytree (prefix) -- see the module docstring.
      tree: parameters or updates (arrays or ``jax.ShapeDtypeStruct``).
      method: the method's name, used in error messages.

    Returns:
      A pytree with the structure of ``tree`` and a Python ``bool`` at every leaf.

    Raises:
      ValueError: a pattern or callable selects nothing; a bool tree does not fit ``tree``.
    """
    predicate = _as_predicate(targets)
    if predicate is None:
        is_flag = lambda x: isinstance(x, (bool, np.bool_))
        try:
            mask = jax.tree.map(
                lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub),
                targets,
                tree,
                is_leaf=is_flag,
            )
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{method}: targets must be None, a regex, a list of regexes, a callable "
                f"(path, leaf) -> bool or a bool pytree matching the parameters; got a tree that "
                f"does not fit the parameters ({err}). Parameter paths:\n{_available(tree)}"
            ) from err
    else:
        mask = jax.tree_util.tree_map_with_path(
            lambda kp, leaf: bool(predicate(path_str(kp), leaf)), tree
        )
    if targets is not None and not any(jax.tree.leaves(mask)):
        raise ValueError(
            f"{method}: {_describe(targets)} matches no parameter. Paths are '/'-joined keys; "
            f"the available ones are:\n{_available(tree)}"
        )
    return mask


def resolve_dims(dims: Any, tree: Any) -> Any:
    """Resolves ``dims`` into a pytree of :class:`MatrixDims` (or ``None``) shaped like ``tree``.

    Args:
      dims: ``None`` (the Flax default ``MatrixDims(-2, -1)`` for every leaf), one
        :class:`MatrixDims`, a callable ``(path, leaf) -> MatrixDims | None`` or a pytree of
        them (prefix of ``tree``).
      tree: parameters or updates.
    """
    if dims is None:
        dims = MatrixDims()
    if isinstance(dims, MatrixDims):
        return jax.tree.map(lambda _: dims, tree)
    if callable(dims):
        return jax.tree_util.tree_map_with_path(lambda kp, leaf: dims(path_str(kp), leaf), tree)
    is_dims = lambda x: isinstance(x, MatrixDims) or x is None
    return jax.tree.map(lambda d, leaf: d, dims, tree, is_leaf=is_dims)


def _where(path: str) -> str:
    return f"{path}: " if path else ""
