"""Finding LoRA factors in an adapter tree: which leaves are ``A``/``B`` and how they pair.

lowrank_jax's adapters (:mod:`lowrank_jax.reparam`) name the factors ``A`` (``(..., in, r)``)
and ``B`` (``(..., r, out)``); Flax NNX's ``nnx.LoRA`` names them ``lora_a`` / ``lora_b`` in the
same layout. A factor is recognised by a path component equal to one of those names; its
partner is the leaf whose path has the matching name in that place, in the same tree or in a
second one (the frozen factors of :class:`~lowrank_jax.reparam.Adapters`). PyTorch's "row" of
``A`` (``r x in``) or ``B`` (``out x r``) is a *column* here: a last-axis index.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from lowrank_jax.targets import path_str

A_NAMES = ("A", "lora_a", "lora_A")
B_NAMES = ("B", "lora_b", "lora_B")
_PARTNER = dict(zip(A_NAMES + B_NAMES, B_NAMES + A_NAMES))

# a float, {adapter path prefix: s}, or a callable (path of the B leaf) -> s
Scaling = float | Mapping[str, float] | Callable[[str], float]


def factor_of(path: str) -> str | None:
    """``"a"``, ``"b"`` or ``None``: which LoRA factor the leaf at ``path`` is."""
    for part in reversed(path.split("/")):
        if part in A_NAMES:
            return "a"
        if part in B_NAMES:
            return "b"
    return None


def partner_path(path: str) -> str:
    """The path of the other factor of the same adapter (the last factor name swapped)."""
    parts = path.split("/")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _PARTNER:
            parts[i] = _PARTNER[parts[i]]
            return "/".join(parts)
    raise ValueError(f"'{path}' names no LoRA factor (one of {A_NAMES + B_NAMES}).")


def flat_paths(tree: Any) -> dict[str, Any]:
    """``{path: leaf}`` of a pytree (``None`` gives ``{}``)."""
    if tree is None:
        return {}
    return {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def kinds(tree: Any) -> list[str | None]:
    """Per leaf (flatten order) its factor kind."""
    return [factor_of(path_str(kp)) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_factors(tree: Any, method: str) -> None:
    """Raises unless ``tree`` has at least one LoRA factor, listing its paths."""
    if not any(k is not None for k in kinds(tree)):
        listing = "\n".join(f"  {p}" for p in list(flat_paths(tree))[:40])
        raise ValueError(
            f"{method}: no LoRA factor in the tree (a leaf whose path has a component named "
            f"one of {A_NAMES + B_NAMES}). Pass the adapter tree (e.g. Adapters.trainable or "
            f"nnx.state(model, nnx.LoRAParam)). Paths:\n{listing}"
        )


def scaling_of(scaling: Scaling, path: str, method: str) -> float:
    """The LoRA scale ``s`` of the adapter whose factor is at ``path``.

    A mapping is keyed by adapter paths (e.g. ``{site.path: site.method.scale for site in
    adapters.sites}``); the longest key that is a ``/``-prefix of ``path`` wins.
    """
    if callable(scaling):
        return float(scaling(path))
    if isinstance(scaling, Mapping):
        hits = [k for k in scaling if path == k or path.startswith(k.rstrip("/") + "/")]
        if not hits:
            raise ValueError(
                f"{method}: no scaling for the adapter at '{path}'; the mapping has "
                f"{sorted(scaling)[:8]}. Key it by adapter path (Adapters.sites[i].path)."
            )
        return float(scaling[max(hits, key=len)])
    return float(scaling)
