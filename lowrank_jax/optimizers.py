"""Optimizer aliases users call, built like ``optax.adamw``: a chain of small transforms.

Each alias reproduces its PyTorch reference's arithmetic by default (documented per alias);
every piece is an ordinary optax transformation, so the aliases compose with
``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps`` and ``apply_if_finite``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from lowrank_jax.targets import Targets
from lowrank_jax.transforms.galore import galore
from lowrank_jax.transforms.torch_style import (
    decoupled_weight_decay,
    scale_by_adafactor_hf,
    scale_by_adam_hf,
)

__all__ = ["adamw_hf", "galore_adafactor", "galore_adamw"]


def adamw_hf(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """HuggingFace/galore-torch ``AdamW`` (eps before bias correction, decay after the update).

    The full-rank baseline that :func:`galore_adamw` reduces to when nothing is targeted.
    """
    return optax.chain(
        scale_by_adam_hf(b1, b2, eps),
        optax.scale_by_learning_rate(learning_rate),
        decoupled_weight_decay(
            learning_rate, weight_decay, after_update=True, mask=weight_decay_mask
        ),
    )


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    basis: str = "svd",
    on_refresh: str = "keep",
    projector_dtype: Any = None,
    mu_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore-AdamW, reproducing galore-torch 1.0 ``GaLoreAdamW`` exactly.

    Targeted matrices (default: every ``ndim >= 2`` float leaf but embeddings, heads, norms and
    biases) are projected to rank ``r``; HF-style Adam runs in the low-rank space; the update is
    projected back and scaled by ``α``:

    .. math::
        W \leftarrow \bigl(W - \eta\,\alpha\,P\,\tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
        \tfrac{M_t}{\sqrt{V_t} + \epsilon}\bigr)(1 - \eta\lambda)

    Untargeted leaves get the same Adam at full shape, full learning rate and no ``α`` (the
    reference's plain param group). Weight decay multiplies the *updated* weights by
    ``1 - ηλ`` and is not scaled by ``α``.

    Args:
      learning_rate: scalar or schedule ``η``.
      rank, update_proj_gap, scale, proj_type, targets, dims, basis, on_refresh,
        projector_dtype, seed: see :func:`lowrank_jax.galore`.
      b1, b2, eps: Adam constants (reference defaults; ``eps`` is added before bias correction).
      weight_decay: ``λ`` (reference default 0).
      weight_decay_mask: leaves to decay (default: all, as the reference).
      mu_dtype: optional first-moment dtype.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lowrank_jax as lr
      >>> params = {"w": jnp.ones((16, 8))}
      >>> tx = lr.galore_adamw(1e-2, rank=4)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones((16, 8))}, state, params)
      >>> updates["w"].shape
      (16, 8)

    References:
      Zhao et al., "GaLore", ICML 2024, Algorithm 2; galore-torch 1.0 ``GaLoreAdamW``.
    """
    return optax.chain(
        galore(
            scale_by_adam_hf(b1, b2, eps, mu_dtype=mu_dtype),
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            basis=basis,
            targets=targets,
            dims=dims,
            on_refresh=on_refresh,
            projector_dtype=projector_dtype,
            seed=seed,
        ),
        optax.scale_by_learning_rate(learning_rate),
        decoupled_weight_decay(
            learning_rate, weight_decay, after_update=True, mask=weight_decay_mask
        ),
    )


def galore_adafactor(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 0.25,
    beta1: float | None = None,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    basis: str = "svd",
    on_refresh: str = "keep",
    projector_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore-Adafactor, reproducing galore-torch ``GaLoreAdafactor`` with an explicit lr.

    As HF's ``galore_adafactor`` does (``relative_step=False, scale_parameter=False``): factored
    second moments of the low-rank gradient, RMS clipping, then the lr-scaled step averaged into
    the first moment when ``beta1`` is set (the paper's "Adafactor with first-order
    statistics"); projected back and scaled by ``α``. Weight decay is applied to the weights
    *before* the update, as in the reference: :math:`W \leftarrow W - \eta\lambda W - \alpha P N`.

    Args:
      learning_rate: scalar or schedule.
      beta1: first-moment rate, ``None`` for none (reference default).
      eps, clip_threshold, decay_rate: Adafactor constants (reference defaults).
      weight_decay, weight_decay_mask: decoupled decay (before the update).
      Others: see :func:`galore_adamw`.
    """
    return optax.chain(
        galore(
            scale_by_adafactor_hf(
                learning_rate,
                eps=eps,
                clip_threshold=clip_threshold,
                decay_rate=decay_rate,
                beta1=beta1,
            ),
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            basis=basis,
            targets=targets,
            dims=dims,
            on_refresh=on_refresh,
            projector_dtype=projector_dtype,
            seed=seed,
        ),
        optax.scale(-1.0),
        decoupled_weight_decay(
            learning_rate, weight_decay, after_update=False, mask=weight_decay_mask
        ),
    )
