"""LoRA+ (a larger learning rate for ``B``) and ALLoRA (per-row rates from the factor norms)."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.targets import path_str
from lowrank_jax.transforms import _lora_factors

__all__ = ["allora_coefficients", "loraplus_groups", "scale_by_allora", "scale_by_loraplus"]


def loraplus_groups(tree: Any, embedding_pattern: str | None = None) -> Any:
    """Per leaf LoRA+'s group: ``"embedding"`` (path matches ``embedding_pattern``), ``"b"``
    (a ``B`` factor or any 1-D leaf, as PEFT's ``create_loraplus_optimizer``) or ``"a"``
    (everything else, e.g. ``A`` factors and trainable 2-D heads)."""
    embedding = re.compile(embedding_pattern) if embedding_pattern else None

    def group(keypath: Any, leaf: Any) -> str:
        path = path_str(keypath)
        if embedding is not None and embedding.search(path):
            return "embedding"
        if _lora_factors.factor_of(path) == "b" or jnp.ndim(leaf) == 1:
            return "b"
        return "a"

    return jax.tree_util.tree_map_with_path(group, tree)


def scale_by_loraplus(
    ratio: float = 16.0,
    *,
    embedding_pattern: str | None = None,
    embedding_ratio: float | None = None,
) -> optax.GradientTransformation:
    r"""Multiplies the updates of ``B`` factors (and 1-D leaves) by ``λ`` (LoRA+).

    Placed after the optimizer and before the learning rate, so the ``B`` group runs at
    :math:`\lambda\eta` and the rest at :math:`\eta`:

    .. math::
        \Delta B = -\lambda\eta\,\mathrm{opt}(g_B),\qquad \Delta A = -\eta\,\mathrm{opt}(g_A)

    Groups as PEFT's ``create_loraplus_optimizer`` (:func:`loraplus_groups`): ``B`` factors and
    every 1-D leaf get ``λ``; leaves whose path matches ``embedding_pattern`` (LoRA on an
    embedding) get ``embedding_ratio`` (PEFT's ``loraplus_lr_embedding`` is an absolute 1e-6,
    i.e. ``embedding_ratio = 1e-6 / η``); everything else 1. Stateless.

    Args:
      ratio: ``λ = η_B / η_A`` (PEFT docs: 16; the LoRA+ README: 20 with η halved).
      embedding_pattern: regex of the embedding adapters' paths (``None``: no such group).
      embedding_ratio: their multiplier (default 1).

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> tx = lr.transforms.scale_by_loraplus(4.0)
      >>> grads = {"q": {"A": jnp.ones((8, 2)), "B": jnp.ones((2, 4))}}
      >>> u, _ = tx.update(grads, tx.init(grads))
      >>> float(u["q"]["A"][0, 0]), float(u["q"]["B"][0, 0])
      (1.0, 4.0)

    References:
      Hayou, Ghosh, Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024.
      https://arxiv.org/abs/2402.12354
    """
    if not ratio > 0:
        raise ValueError(f"scale_by_loraplus: ratio (λ) must be positive, got {ratio!r}.")
    embedding = 1.0 if embedding_ratio is None else embedding_ratio
    factors = {"a": 1.0, "b": ratio, "embedding": embedding}

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        groups = loraplus_groups(updates, embedding_pattern)
        scaled = jax.tree.map(lambda u, g: (u * factors[g]).astype(u.dtype), updates, groups)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def allora_coefficients(factor: jax.Array, eta: float) -> jax.Array:
    r"""ALLoRA's per-row coefficient :math:`c_i = 1/\sqrt{\|P_i\|_2 + 1/\eta^2}` of a factor,
    shaped to broadcast over it (a PyTorch row is an index of the last axis here)."""
    norms = jnp.linalg.norm(factor.astype(jnp.float32), axis=-2, keepdims=True)
    return jax.lax.rsqrt(norms + 1.0 / eta**2)


def scale_by_allora(eta: float = 2.0) -> optax.GradientTransformation:
    r"""Scales each row of a LoRA factor's update by :math:`1/\sqrt{\|P_i\| + 1/\eta^2}` (ALLoRA).

    For a factor :math:`P` (``A`` or ``B``) with rows :math:`P_i` (PyTorch layout; the columns
    of our ``(in, r)`` / ``(r, out)`` factors):

    .. math::
        u_i \leftarrow c_i\,u_i,\qquad c_i = \frac{1}{\sqrt{\|P_i\|_2 + 1/\eta^2}}

    an adaptive rate inversely related to the row's norm: a zero row (``B`` at init) moves at
    :math:`\eta` times the base rate, which is how ALLoRA escapes the zero initialisation
    without LoRA's scaling factor and dropout (use it with ``s = 1``, no dropout). Placed
    after the optimizer (per-row gradient scaling before Adam would cancel out). Other leaves
    pass through. The exact coefficient is taken from public re-implementations (the paper
    body was not available): ``‖P_i‖`` is not squared. Stateless.

    Args:
      eta: ``η`` (the coefficient's value at zero norm; default 2).

    Returns:
      A stateless ``optax.GradientTransformation``; ``update`` needs the params.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> tx = lr.transforms.scale_by_allora(2.0)
      >>> params = {"B": jnp.zeros((2, 3))}
      >>> u, _ = tx.update({"B": jnp.ones((2, 3))}, tx.init(params), params)
      >>> float(u["B"][0, 0])  # a zero row gets η
      2.0

    References:
      Huang, Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", 2024.
      https://arxiv.org/abs/2410.09692
    """
    if not eta > 0:
        raise ValueError(f"scale_by_allora: eta must be positive, got {eta!r}.")

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError(
                "scale_by_allora needs the parameters: update(updates, state, params)."
            )
        _lora_factors.check_factors(updates, "scale_by_allora")

        def one(keypath: Any, u: Any, p: Any) -> Any:
            if _lora_factors.factor_of(path_str(keypath)) is None:
                return u
            return (u * allora_coefficients(p, eta)).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(one, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
