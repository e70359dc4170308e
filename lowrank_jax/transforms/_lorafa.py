"""LoRA-FA: frozen ``A``; ``B``'s gradient projected to the full gradient's best fit."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.targets import path_str
from lowrank_jax.transforms import _lora_factors
from lowrank_jax.transforms._common import MaskedNode

__all__ = ["LoraFAState", "lorafa", "lorafa_precondition"]


class LoraFAState(NamedTuple):
    """State of :func:`lorafa`: the inner state over every leaf but the ``A`` factors
    (``MaskedNode`` there: LoRA-FA keeps no moments for ``A``)."""

    inner_state: Any


def lorafa_precondition(
    grad_b: jax.Array, a: jax.Array, scaling: float, delta: float = 1e-8
) -> jax.Array:
    r""":math:`\tilde g_B = s^{-2}\,(A^\top A + \delta I)^{+}\,g_B` for ``A: (..., in, r)``,
    ``g_B: (..., r, out)`` (PyTorch's :math:`g_B (AA^\top + \delta I)^{+}` transposed)."""
    a32 = a.astype(jnp.float32)
    gram = jnp.swapaxes(a32, -1, -2) @ a32
    gram = gram + delta * jnp.eye(gram.shape[-1], dtype=jnp.float32)
    return (jnp.linalg.pinv(gram) @ grad_b.astype(jnp.float32)) / scaling**2


def lorafa(
    inner: optax.GradientTransformation,
    *,
    scaling: _lora_factors.Scaling = 1.0,
    delta: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""Trains only ``B`` with the gradient that best fits the full one (LoRA-FA).

    ``A`` is frozen (a random projection) and ``inner`` runs on

    .. math::
        \tilde g_B = \frac{1}{s^2}\,(A^\top A + \delta I)^{+}\,g_B,

    so that the induced weight update :math:`s A \tilde g_B = A(A^\top A)^{-1}A^\top G` is the
    least-squares projection of the full gradient :math:`G` onto :math:`A`'s column space (in
    our ``(in, out)`` layout; PEFT's :math:`g_B (AA^\top)^{-1}` in PyTorch's). Other leaves go
    through ``inner`` unchanged. ``A`` gets no moments and a zero update.

    ``A`` is read from ``params`` when the adapter tree holds it (as PEFT keeps it, with
    ``requires_grad=False``), or from the extra argument ``frozen`` -- the frozen factors of
    :class:`~lowrank_jax.reparam.Adapters` made with ``lora(..., train_a=False)``, which then
    never computes ``∇A``: ``tx.update(grads, state, params, frozen=adapters.frozen)``.

    Works layer-wise on stacked adapters (``inner``'s state is per leaf).

    Args:
      inner: the optimizer of ``B`` (PEFT: HF-style AdamW, :func:`lowrank_jax.lorafa_adamw`).
      scaling: the LoRA scale ``s`` (``α/r``): one float, ``{adapter path: s}`` (e.g.
        ``{site.path: site.method.scale for site in adapters.sites}``) or a callable
        ``(path of B) -> s``.
      delta: ``δ`` (PEFT: 1e-8).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`LoraFAState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lowrank_jax as lr
      >>> adapter = {"q": {"A": jnp.eye(6, 2), "B": jnp.zeros((2, 3))}}
      >>> tx = lr.transforms.lorafa(optax.sgd(1.0))
      >>> u, _ = tx.update(jax.tree.map(jnp.ones_like, adapter), tx.init(adapter), adapter)
      >>> float(jnp.abs(u["q"]["A"]).max()), u["q"]["B"].shape
      (0.0, (2, 3))

    References:
      Zhang et al., "LoRA-FA: Efficient and Effective Low Rank Representation Fine-tuning",
      arXiv:2308.03303 (v2); PEFT ``create_lorafa_optimizer``.
    """
    if not delta >= 0:
        raise ValueError(f"lorafa: delta must be >= 0, got {delta!r}.")
    inner = optax.with_extra_args_support(inner)

    def without_a(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda kp, x: MaskedNode() if _lora_factors.factor_of(path_str(kp)) == "a" else x, tree
        )

    def init_fn(params: Any) -> LoraFAState:
        if "b" not in _lora_factors.kinds(params):
            listing = "\n".join(f"  {p}" for p in list(_lora_factors.flat_paths(params))[:40])
            raise ValueError(
                f"lorafa: no B factor in the tree (a leaf whose path has a component named one "
                f"of {_lora_factors.B_NAMES}); pass the adapter tree. Paths:\n{listing}"
            )
        return LoraFAState(inner.init(without_a(params)))

    def update_fn(
        updates: Any, state: LoraFAState, params: Any = None, *, frozen: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, LoraFAState]:
        sources = {**_lora_factors.flat_paths(frozen), **_lora_factors.flat_paths(params)}

        def precondition(keypath: Any, g: Any) -> Any:
            path = path_str(keypath)
            if _lora_factors.factor_of(path) != "b":
                return g
            a_path = _lora_factors.partner_path(path)
            if a_path not in sources:
                raise ValueError(
                    f"lorafa: no A factor '{a_path}' for '{path}'. Pass params holding it, or "
                    "update(grads, state, params, frozen=adapters.frozen)."
                )
            s = _lora_factors.scaling_of(scaling, path, "lorafa")
            return lorafa_precondition(g, sources[a_path], s, delta).astype(g.dtype)

        grads = jax.tree_util.tree_map_with_path(precondition, updates)
        inner_updates, inner_state = inner.update(
            without_a(grads), state.inner_state,
            None if params is None else without_a(params), **extra_args,
        )
        out = jax.tree.map(
            lambda u, g: jnp.zeros_like(g) if isinstance(u, MaskedNode) else u,
            inner_updates, updates, is_leaf=lambda x: isinstance(x, MaskedNode),
        )
        return out, LoraFAState(inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
