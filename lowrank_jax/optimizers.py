"""Optimizer aliases users call, built like ``optax.adamw``: a chain of small transforms.

Each alias reproduces its PyTorch reference's arithmetic by default (documented per alias);
every piece is an ordinary optax transformation, so the aliases compose with
``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps`` and ``apply_if_finite``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.targets import Targets, path_str
from lowrank_jax.transforms import _lora_factors
from lowrank_jax.transforms._adam_8bit import scale_by_adam_8bit
from lowrank_jax.transforms._adaptive import AdaptiveRefresh
from lowrank_jax.transforms._apollo import apollo
from lowrank_jax.transforms._badam import badam
from lowrank_jax.transforms._fira import fira
from lowrank_jax.transforms._flora import scale_by_flora
from lowrank_jax.transforms._galore import galore
from lowrank_jax.transforms._golore import golore
from lowrank_jax.transforms._int8_weights import stochastic_weight_update
from lowrank_jax.transforms._lisa import LAYER_PATTERN, STACKED_PATTERN, lisa
from lowrank_jax.transforms._lorafa import lorafa
from lowrank_jax.transforms._loraplus import scale_by_allora, scale_by_loraplus
from lowrank_jax.transforms._norm_scaling import scale_by_adam_bias_correction
from lowrank_jax.transforms._qgalore import q_galore
from lowrank_jax.transforms._torch_style import (
    decoupled_weight_decay,
    scale_by_adafactor_hf,
    scale_by_adam_hf,
)

__all__ = [
    "adamw_8bit",
    "adamw_hf",
    "allora_adamw",
    "apollo_adamw",
    "apollo_mini",
    "badam_adamw",
    "fira_adamw",
    "flora_adafactor",
    "galore_adafactor",
    "galore_adamw",
    "galore2_adamw",
    "galore_adamw_8bit",
    "golore_adamw",
    "lisa_adamw",
    "lorafa_adamw",
    "loraplus_adamw",
    "owlore_adamw",
    "q_galore_adamw_8bit",
]


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
    adaptive_refresh: AdaptiveRefresh | None = None,
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
        projector_dtype, seed, adaptive_refresh: see :func:`lowrank_jax.galore`.
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
            adaptive_refresh=adaptive_refresh,
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


def fira_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 1.0,
    limiter: float | None = 1.01,
    variant: str = "code",
    scale_type: str = "channel",
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
    adaptive_refresh: AdaptiveRefresh | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Fira-AdamW, reproducing the ``fira`` package's ``FiraAdamW`` exactly (``variant="code"``).

    HF-style Adam in GaLore's subspace, plus the residual scaled by
    :math:`\phi_k = \|N_k\|/\|R_k\|` and norm-growth limited (:func:`lowrank_jax.fira`):

    .. math::
        W \leftarrow \bigl(W - \eta\,c_t\,(\alpha P N + \mathrm{limit}(\phi \odot (G - \alpha P R)))
        \bigr)(1 - \eta\lambda),\qquad c_t = \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}

    with :math:`N = M/(\sqrt V + \epsilon)` uncorrected, as the reference. ``variant="paper"``
    uses the paper's :math:`\alpha(PN + \mathrm{limit}(\phi \odot (G - PR)))` with a
    bias-corrected :math:`N` (so :math:`\phi` sees the corrected ratio). Untargeted leaves get
    the same Adam at full shape; decay as :func:`galore_adamw`.

    Args:
      learning_rate: scalar or schedule ``η``.
      rank: ``r`` (package default 8; the paper's scripts: 128 at 60M ... 512 at 1B).
      update_proj_gap: ``T`` (200).
      scale: ``α`` (package default 1.0; scripts: 0.25 below 1B, 0.0625 at 1B/7B).
      limiter, variant, scale_type: see :func:`lowrank_jax.fira`.
      b1, b2, eps: Adam constants (HF-style ``eps`` before bias correction).
      weight_decay, weight_decay_mask: decoupled decay of the updated weights (default 0).
      proj_type, targets, dims, basis, on_refresh, projector_dtype, seed, adaptive_refresh: see
        :func:`lowrank_jax.galore`.
      mu_dtype: optional first-moment dtype.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> params = {"w": jnp.ones((16, 8))}
      >>> tx = lr.fira_adamw(1e-2, rank=4)
      >>> updates, _ = tx.update({"w": jnp.ones((16, 8))}, tx.init(params), params)
      >>> updates["w"].shape
      (16, 8)

    References:
      Chen et al., "Fira", NeurIPS 2025, Algorithm 1; ``fira`` 1.0.2 ``FiraAdamW``.
    """
    code = variant == "code"
    return optax.chain(
        fira(
            scale_by_adam_hf(b1, b2, eps, correct_bias=not code, mu_dtype=mu_dtype),
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            limiter=limiter,
            variant=variant,
            scale_type=scale_type,
            proj_type=proj_type,
            basis=basis,
            targets=targets,
            dims=dims,
            on_refresh=on_refresh,
            projector_dtype=projector_dtype,
            seed=seed,
            adaptive_refresh=adaptive_refresh,
        ),
        scale_by_adam_bias_correction(b1, b2) if code else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
        decoupled_weight_decay(
            learning_rate, weight_decay, after_update=True, mask=weight_decay_mask
        ),
    )


def apollo_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 256,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 1.0,
    scale_type: str = "channel",
    proj: Any = "random",
    limiter: float | None = 1.01,
    scale_front: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    projector_dtype: Any = None,
    mu_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""APOLLO-AdamW, reproducing apollo-torch 1.0.3 ``APOLLOAdamW`` (same projection given).

    Adam moments of a random rank-``r`` projection estimate a per-channel gain ``s``; the raw
    gradient is scaled by it, norm-growth limited and multiplied by :math:`\sqrt{c}`
    (:func:`lowrank_jax.apollo`):

    .. math::
        W \leftarrow \bigl(W - \eta\,c_t\,\sqrt{c}\;\mathrm{limit}(s \odot G)\bigr)
        (1 - \eta\lambda),\qquad s_k = \frac{\|N_k\|}{\|R_k\| + 10^{-8}}

    Untargeted leaves get HF-style AdamW. The projection is regenerated from the state's key
    (not stored) with ``proj="random"``; torch's generator cannot be reproduced, so parity is
    for ``proj="svd"`` or an injected ``proj`` callable.

    Args:
      learning_rate: scalar or schedule.
      rank: ``r`` (README: 256 at 1B/7B; scripts use d/4).
      update_proj_gap: ``T`` (200 in the pretraining scripts).
      scale: ``c`` (the update is multiplied by :math:`\sqrt c`; 1 for APOLLO).
      scale_type, proj, limiter, scale_front, proj_type, targets, dims, projector_dtype, seed:
        see :func:`lowrank_jax.apollo`.
      b1, b2, eps: Adam constants of the auxiliary moments (HF-style ``eps``).
      weight_decay, weight_decay_mask: decoupled decay of the updated weights (default 0).
      mu_dtype: optional first-moment dtype.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> params = {"w": jnp.ones((16, 8))}
      >>> tx = lr.apollo_adamw(1e-2, rank=4)
      >>> updates, _ = tx.update({"w": jnp.ones((16, 8))}, tx.init(params), params)
      >>> updates["w"].shape
      (16, 8)

    References:
      Zhu et al., "APOLLO", MLSys 2025; apollo-torch 1.0.3 ``APOLLOAdamW``.
    """
    return optax.chain(
        apollo(
            scale_by_adam_hf(b1, b2, eps, correct_bias=False, mu_dtype=mu_dtype),
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            scale_type=scale_type,
            proj=proj,
            limiter=limiter,
            scale_front=scale_front,
            proj_type=proj_type,
            targets=targets,
            dims=dims,
            projector_dtype=projector_dtype,
            seed=seed,
        ),
        scale_by_adam_bias_correction(b1, b2),
        optax.scale_by_learning_rate(learning_rate),
        decoupled_weight_decay(
            learning_rate, weight_decay, after_update=True, mask=weight_decay_mask
        ),
    )


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 1,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 128.0,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""APOLLO-Mini: rank-1 random projection and one gain per matrix (``scale_type="tensor"``).

    .. math::
        W \leftarrow W - \eta\,c_t\,\sqrt{128}\;\mathrm{limit}\Bigl(
        \frac{\|N\|_F}{\|R\|_F + 10^{-8}}\,G\Bigr)

    The state per ``m × n`` matrix is ``2·max(m, n)`` moment entries plus one norm (the
    projection is regenerated): SGD-like memory.

    Args:
      learning_rate: scalar or schedule.
      rank: 1 (the README's Mini).
      update_proj_gap: ``T`` (200).
      scale: ``c`` = 128 (README), i.e. the paper's :math:`\alpha = \sqrt{128}`.
      **kwargs: any other argument of :func:`apollo_adamw`.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> state = lr.apollo_mini(1e-2).init({"w": jnp.ones((16, 8))})
      >>> state[0].lowrank_state.mu["w"].shape  # (in, out) = (16, 8): the out axis -> rank 1
      (16, 1)

    References:
      Zhu et al., "APOLLO", MLSys 2025, §4 (APOLLO-Mini).
    """
    kwargs.setdefault("scale_type", "tensor")
    return apollo_adamw(
        learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale, **kwargs
    )


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    weight_decay_mask: Any = None,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    quantization: str = "dynamic",
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW with block-wise 8-bit moments, like bitsandbytes ``AdamW8bit``.

    .. math::
        W \leftarrow W(1 - \eta\lambda) - \eta\,\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}

    with :math:`m, v` stored as 8-bit codes plus one float32 scale per ``block_size`` elements
    (:func:`lowrank_jax.scale_by_adam_8bit`); decay as ``torch.optim.AdamW`` (on the weights
    before the update, as optax's ``adamw``). Defaults are bitsandbytes' (``weight_decay=1e-2``).

    Args:
      learning_rate: scalar or schedule.
      b1, b2, eps: Adam constants (``eps`` after bias correction).
      weight_decay, weight_decay_mask: decoupled decay (``optax.add_decayed_weights``).
      block_size, min_8bit_size, quantization: see :func:`lowrank_jax.scale_by_adam_8bit`.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> state = lr.adamw_8bit(1e-3).init({"w": jnp.zeros((256, 64))})
      >>> state[0].nu["w"].codes.dtype
      dtype('uint8')

    References:
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
    """
    return optax.chain(
        scale_by_adam_8bit(
            b1,
            b2,
            eps,
            block_size=block_size,
            min_8bit_size=min_8bit_size,
            quantization=quantization,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def galore_adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    weight_decay_mask: Any = None,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    quantization: str = "dynamic",
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    basis: str = "svd",
    projector_dtype: Any = None,
    seed: int = 0,
    adaptive_refresh: AdaptiveRefresh | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""8-bit GaLore: 8-bit Adam on the projected gradient, like galore-torch ``GaLoreAdamW8bit``.

    .. math::
        W \leftarrow \bigl(W - \eta\,\alpha\,P\,\mathrm{Adam8bit}(P^\top G)\bigr)(1 - \eta\lambda)

    The low-rank moments are block-wise 8-bit (those under ``min_8bit_size`` elements stay
    float32, as bitsandbytes does); untargeted leaves get 8-bit Adam at full shape. The decay
    multiplies the *updated* weights, as the reference (which stashes the group's decay and
    applies it after the projected update). Defaults are the reference's
    (``eps=1e-8``, ``weight_decay=1e-2``).

    Args:
      learning_rate: scalar or schedule.
      rank, update_proj_gap, scale, proj_type, targets, dims, basis, projector_dtype, seed,
        adaptive_refresh: see :func:`lowrank_jax.galore`.
      b1, b2, eps: Adam constants (``eps`` after bias correction, as bitsandbytes).
      weight_decay, weight_decay_mask: decoupled decay of the updated weights.
      block_size, min_8bit_size, quantization: see :func:`lowrank_jax.scale_by_adam_8bit`.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> state = lr.galore_adamw_8bit(1e-3, rank=64).init({"w": jnp.zeros((256, 1024))})
      >>> state[0].lowrank_state.mu["w"].codes.shape
      (64, 1024)

    References:
      Zhao et al., "GaLore", ICML 2024, §4.3 (8-bit GaLore); galore-torch ``GaLoreAdamW8bit``.
    """
    return optax.chain(
        galore(
            scale_by_adam_8bit(
                b1,
                b2,
                eps,
                block_size=block_size,
                min_8bit_size=min_8bit_size,
                quantization=quantization,
            ),
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            basis=basis,
            targets=targets,
            dims=dims,
            projector_dtype=projector_dtype,
            seed=seed,
            adaptive_refresh=adaptive_refresh,
        ),
        optax.scale_by_learning_rate(learning_rate),
        decoupled_weight_decay(
            learning_rate, weight_decay, after_update=True, mask=weight_decay_mask
        ),
    )


def lisa_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    n_active: int = 2,
    interval: int | jax.Array = 20,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    layer_pattern: str = LAYER_PATTERN,
    stacked_pattern: str | None = STACKED_PATTERN,
    always_active: Targets = None,
    probs: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""LISA with AdamW: ``n_active`` sampled layers plus embedding/norm/head (LMFlow defaults).

    .. math::
        W_\ell \leftarrow W_\ell(1 - \eta\lambda) - \eta\,\mathrm{Adam}(G_\ell)
        \ \ (\ell \in A_t \text{ or always active}),\qquad W_\ell \text{ unchanged otherwise}

    The AdamW of LMFlow's trainer (``torch.optim.AdamW``: ``eps`` after bias correction, decay
    on the weights before the update), so it equals ``optax.adamw`` on the trained leaves. The
    moments and step count of the layers restart at every resampling; those of the
    always-active leaves never do; the learning-rate schedule follows the global step.

    Args:
      learning_rate: scalar or schedule.
      n_active, interval, layer_pattern, stacked_pattern, always_active, probs, seed: see
        :func:`lowrank_jax.lisa` (LMFlow: 2 layers, interval 20).
      b1, b2, eps: Adam constants.
      weight_decay: decoupled decay of the trained leaves only (frozen layers never change).
      weight_decay_mask: ``None`` or a callable ``params -> bool tree`` (it is called on the
        active-layer slots and on the always-active leaves separately).

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> params = {"layers": {str(i): {"w": jnp.ones((4, 4))} for i in range(4)}}
      >>> tx = lr.lisa_adamw(1e-3, n_active=1)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> sum(bool((u["w"] != 0).any()) for u in updates["layers"].values())
      1

    References:
      Pan et al., "LISA", NeurIPS 2024; LMFlow ``DynamicLayerActivationCallback``.
    """
    adam = optax.scale_by_adam(b1, b2, eps)
    if weight_decay_mask is not None and not callable(weight_decay_mask):
        raise ValueError(
            "lisa_adamw: weight_decay_mask must be None or a callable params -> bool tree (it "
            "is applied to the active-layer slots and the other leaves separately)."
        )
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        inner = adam
    else:
        inner = optax.chain(adam, optax.add_decayed_weights(weight_decay, weight_decay_mask))
    return optax.chain(
        lisa(
            inner,
            n_active=n_active,
            interval=interval,
            layer_pattern=layer_pattern,
            stacked_pattern=stacked_pattern,
            always_active=always_active,
            probs=probs,
            seed=seed,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def owlore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    probs: Any,
    n_active: int = 5,
    interval: int | jax.Array = 50,
    rank: int = 256,
    update_proj_gap: int | jax.Array = 100,
    scale: float | jax.Array = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    basis: str = "svd",
    layer_pattern: str = LAYER_PATTERN,
    stacked_pattern: str | None = STACKED_PATTERN,
    always_active: Targets = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""OwLore: LISA sampling by outlier scores, with GaLore-AdamW on the sampled layers.

    ``lisa(galore(scale_by_adam_hf()), probs=probs)``: every ``interval`` steps ``n_active``
    layers are drawn with probabilities ``probs`` (from
    :func:`lowrank_jax.transforms.owl_probabilities` of
    :func:`~lowrank_jax.transforms.outlier_scores`); their targeted matrices get GaLore-AdamW
    (moments in rank ``r``), everything else in them and the always-active leaves get the same
    Adam at full shape. A layer's GaLore state (projectors included) restarts when it is
    sampled, so its projector is recomputed on its first step (OwLore's code keeps stale
    state and per-layer step counts; see :func:`lowrank_jax.lisa`).

    .. math::
        W_\ell \leftarrow W_\ell(1 - \eta\lambda) - \eta\,\alpha\,P\,\mathrm{Adam}(P^\top G_\ell)
        \quad (\ell \in A_t,\ A_t \sim \mathrm{probs})

    Decay, when set, is applied to the weights before the update (the reference GaLoreAdamW
    decays the updated weights: a difference of :math:`O(\eta^2\lambda)`; OwLore uses 0).

    Args:
      learning_rate: scalar or schedule (OwLore script: 3e-4).
      probs: ``L`` sampling weights (required).
      n_active, interval: OwLore script: 5 layers every 50 steps.
      rank, update_proj_gap, scale: OwLore's code: 256, 100, 1.0.
      b1, b2, eps: HF-style Adam constants (galore-torch).
      weight_decay, weight_decay_mask: as :func:`lisa_adamw`.
      proj_type, targets, dims, basis: see :func:`lowrank_jax.galore` (targets are matched on
        the active-layer slots, ``layers/0/...``).
      layer_pattern, stacked_pattern, always_active, seed: see :func:`lowrank_jax.lisa`.

    References:
      Li et al., "OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection for
      Memory-Efficient LLM Fine-tuning", 2024. https://arxiv.org/abs/2405.18380
    """
    if weight_decay_mask is not None and not callable(weight_decay_mask):
        raise ValueError("owlore_adamw: weight_decay_mask must be None or a callable.")

    def decayed(tx: optax.GradientTransformation) -> optax.GradientTransformation:
        if isinstance(weight_decay, (int, float)) and weight_decay == 0:
            return tx
        return optax.chain(tx, optax.add_decayed_weights(weight_decay, weight_decay_mask))

    layer_inner = galore(
        scale_by_adam_hf(b1, b2, eps),
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        basis=basis,
        targets=targets,
        dims=dims,
        seed=seed,
    )
    return optax.chain(
        lisa(
            decayed(layer_inner),
            n_active=n_active,
            interval=interval,
            layer_pattern=layer_pattern,
            stacked_pattern=stacked_pattern,
            always_active=always_active,
            always_active_inner=decayed(scale_by_adam_hf(b1, b2, eps)),
            probs=probs,
            seed=seed,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def golore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 0.25,
    random_after: int | jax.Array | None = None,
    random_ratio: float = 0.8,
    total_steps: int | None = None,
    rotate_first_moment: bool = True,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    projector_dtype: Any = None,
    mu_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""GoLore-AdamW: GaLore-AdamW with random projections from step ``τ`` on.

    .. math::
        W \leftarrow \bigl(W - \eta\,\alpha\,P_t\,\mathrm{AdamHF}(P_t^\top G)\bigr)
        (1 - \eta\lambda),\qquad P_t = \begin{cases}\mathrm{SVD}_r(G) & t < \tau\\
        \text{random orthonormal} & t \ge \tau\end{cases}

    with :math:`\tau` = ``random_after``, or ``int(random_ratio · total_steps)`` (GoLore's
    scripts: ``rand_ratio`` 0.8). See :func:`lowrank_jax.golore`.

    Args:
      learning_rate: scalar or schedule.
      rank, update_proj_gap, scale, rotate_first_moment, proj_type, targets, dims,
        projector_dtype, seed: see :func:`lowrank_jax.golore`.
      random_after: ``τ``; or give ``total_steps`` (and ``random_ratio``).
      random_ratio: fraction of ``total_steps`` after which bases are random.
      total_steps: the run length (used only when ``random_after`` is ``None``).
      b1, b2, eps, weight_decay, weight_decay_mask, mu_dtype: as :func:`galore_adamw`.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> tx = lr.golore_adamw(1e-2, rank=4, total_steps=1000)  # random from step 800
      >>> tx.init({"w": jnp.ones((16, 8))})[0].lowrank_state.mu["w"].shape
      (16, 4)

    References:
      He et al., "Subspace Optimization for Large Language Models with Convergence Guarantees",
      ICML 2025; ``pkumelon/Golore`` ``golore_torch.AdamW``.
    """
    if random_after is None:
        if total_steps is None:
            raise ValueError(
                "golore_adamw: give random_after= (the first step with random bases) or "
                "total_steps= (random from int(random_ratio * total_steps))."
            )
        if not 0 <= random_ratio:
            raise ValueError(f"golore_adamw: random_ratio must be >= 0, got {random_ratio!r}.")
        random_after = int(random_ratio * total_steps)
    return optax.chain(
        golore(
            scale_by_adam_hf(b1, b2, eps, mu_dtype=mu_dtype),
            rank=rank,
            random_after=random_after,
            update_proj_gap=update_proj_gap,
            scale=scale,
            rotate_first_moment=rotate_first_moment,
            proj_type=proj_type,
            targets=targets,
            dims=dims,
            projector_dtype=projector_dtype,
            seed=seed,
        ),
        optax.scale_by_learning_rate(learning_rate),
        decoupled_weight_decay(
            learning_rate, weight_decay, after_update=True, mask=weight_decay_mask
        ),
    )


def galore2_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 0.25,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore 2: GaLore-AdamW with randomized-SVD refreshes (``basis="randomized"``).

    The update rule is GaLore's (:func:`galore_adamw`); the exact SVD of each refresh is replaced
    by a randomized range finder (Halko et al.: Gaussian sketch with 8 extra columns, two power
    iterations, Rayleigh-Ritz), matmuls only, so a sharded gradient is never gathered whole.
    GaLore 2's per-layer updates under FSDP are the layer-wise train step
    (``lowrank-jax train --layerwise``), which this optimizer supports.

    .. math::
        W \leftarrow \bigl(W - \eta\,\alpha\,\tilde P\,\mathrm{AdamHF}(\tilde P^\top G)\bigr)
        (1 - \eta\lambda),\qquad \tilde P = \mathrm{rSVD}_r(G)

    Args:
      learning_rate: scalar or schedule.
      rank, update_proj_gap, scale: as :func:`galore_adamw`.
      **kwargs: any other argument of :func:`galore_adamw` (``basis`` is fixed).

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> tx = lr.galore2_adamw(1e-2, rank=4)
      >>> tx.init({"w": jnp.ones((64, 32))})[0].projectors["w"].out_basis.shape
      (32, 4)

    References:
      Su et al., "GaLore 2: Large-Scale LLM Pre-Training by Gradient Low-Rank Projection",
      2025. https://arxiv.org/abs/2504.20437
    """
    if "basis" in kwargs:
        raise ValueError("galore2_adamw: basis is 'randomized'; use galore_adamw for another one.")
    return galore_adamw(
        learning_rate,
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        basis="randomized",
        **kwargs,
    )


def flora_adafactor(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    b1: float | None = 0.9,
    kappa: int = 1000,
    decay_rate: float = -0.8,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    scale_parameter: bool = True,
    weight_decay: float = 0.0,
    targets: Targets = None,
    dims: Any = None,
    momentum_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Flora: Adafactor with its momentum compressed by regenerated random projections.

    ``flora-opt``'s torch ``Flora(lr, rank, kappa, beta1=b1)`` step
    (:func:`lowrank_jax.transforms.scale_by_flora`), times the learning rate:

    .. math::
        W \leftarrow W - \eta\,s_t\bigl(\mathrm{clip}(U_t) + \lambda W\bigr),\quad
        U_t = (1-\beta_1)\hat G_t + \beta_1 A_k m_{t-1},\quad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) A_k^\top \hat G_t

    with :math:`s_t = \max(10^{-3}, \mathrm{RMS}(W))`. For compressed gradient accumulation
    wrap it in :func:`lowrank_jax.transforms.flora_accumulation`.

    Args:
      learning_rate: scalar or schedule.
      rank, b1, kappa, decay_rate, eps, clip_threshold, scale_parameter, weight_decay, targets,
        dims, seed: see :func:`lowrank_jax.transforms.scale_by_flora` (defaults: the torch
        reference's, with momentum on).
      momentum_dtype: dtype of the momentum (default float32, as the reference).

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> params = {"w": jnp.ones((32, 16))}
      >>> tx = lr.flora_adafactor(1e-2, rank=4)
      >>> updates, _ = tx.update(params, tx.init(params), params)
      >>> updates["w"].shape
      (32, 16)

    References:
      Hao, Cao, Mou, "Flora: Low-Rank Adapters Are Secretly Gradient Compressors", ICML 2024;
      ``flora-opt`` 0.0.3 ``Flora``.
    """
    return optax.chain(
        scale_by_flora(
            rank,
            b1=b1,
            kappa=kappa,
            decay_rate=decay_rate,
            eps=eps,
            clip_threshold=clip_threshold,
            scale_parameter=scale_parameter,
            weight_decay=weight_decay,
            targets=targets,
            dims=dims,
            momentum_dtype=momentum_dtype or jnp.float32,
            seed=seed,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def badam_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    switch_every: int = 50,
    order: str = "ascending",
    start_block: int | None = None,
    full_first_block: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    layer_pattern: str = LAYER_PATTERN,
    stacked_pattern: str | None = STACKED_PATTERN,
    always_active: Targets = None,
    train_non_layer: bool = True,
    reset_always_active: bool = True,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""BAdam with AdamW: one layer block at a time, switched every ``K`` steps in a fixed order.

    .. math::
        W_\ell \leftarrow W_\ell(1 - \eta\lambda) - \eta\,\mathrm{Adam}(G_\ell)
        \ \ (\ell = \pi(\lfloor (t+1)/K \rfloor)),\qquad W_\ell \text{ unchanged otherwise}

    ``torch.optim.AdamW`` as BAdam's base optimizer (``eps`` after bias correction, decay of the
    weights before the update), restarted at every switch; see :func:`lowrank_jax.badam`.
    The non-layer leaves (embedding, final norm, head) train every step by default; BAdam's
    default freezes them (``train_non_layer=False``).

    Args:
      learning_rate: scalar or schedule (it follows the global step).
      switch_every, order, start_block, full_first_block, layer_pattern, stacked_pattern,
        always_active, train_non_layer, reset_always_active, seed: see
        :func:`lowrank_jax.badam` (LLaMA-Factory: ascending, K = 50).
      b1, b2, eps: Adam constants.
      weight_decay: decoupled decay of the trained leaves.
      weight_decay_mask: ``None`` or a callable ``params -> bool tree`` (called on the active
        block's slot and on the other leaves separately).

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> params = {"layers": {str(i): {"w": jnp.ones((4, 4))} for i in range(4)}}
      >>> tx = lr.badam_adamw(1e-3, switch_every=10)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> [bool((u["w"] != 0).any()) for u in updates["layers"].values()]
      [True, False, False, False]

    References:
      Luo, Yu, Li, "BAdam", NeurIPS 2024; ``badam`` 1.4 ``BlockOptimizer``.
    """
    if weight_decay_mask is not None and not callable(weight_decay_mask):
        raise ValueError(
            "badam_adamw: weight_decay_mask must be None or a callable params -> bool tree."
        )
    inner = optax.scale_by_adam(b1, b2, eps)
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        inner = optax.chain(inner, optax.add_decayed_weights(weight_decay, weight_decay_mask))
    return optax.chain(
        badam(
            inner,
            switch_every=switch_every,
            order=order,
            start_block=start_block,
            full_first_block=full_first_block,
            layer_pattern=layer_pattern,
            stacked_pattern=stacked_pattern,
            always_active=always_active,
            train_non_layer=train_non_layer,
            reset_always_active=reset_always_active,
            seed=seed,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def _lora_decay_mask(exclude: Any) -> Any:
    """A weight-decay mask callable: every leaf but those ``exclude(path, leaf)`` selects."""

    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda kp, x: not exclude(path_str(kp), x), params
        )

    return mask


def loraplus_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ratio: float = 16.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    embedding_pattern: str | None = None,
    embedding_ratio: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA+ with AdamW over an adapter tree: ``B`` factors (and 1-D leaves) at ``λη``.

    .. math::
        B \leftarrow B(1 - \lambda\eta\mu) - \lambda\eta\,\mathrm{Adam}(g_B),\qquad
        A \leftarrow A(1 - \eta\mu) - \eta\,\mathrm{Adam}(g_A)

    What PEFT's ``create_loraplus_optimizer(model, torch.optim.AdamW, lr=η,
    loraplus_lr_ratio=λ, loraplus_weight_decay=μ)`` builds: ``torch.optim.AdamW`` per group,
    the same ``μ`` everywhere except 1-D biases and norm weights of the ``B`` group (no decay).
    See :func:`lowrank_jax.transforms.scale_by_loraplus`.

    Args:
      learning_rate: ``η`` (scalar or schedule), the ``A`` group's rate.
      ratio: ``λ`` (PEFT docs: 16).
      b1, b2, eps: Adam constants (``eps`` after bias correction, as torch).
      weight_decay: ``μ`` (PEFT's ``loraplus_weight_decay``, default 0).
      embedding_pattern, embedding_ratio: LoRA-on-embedding adapters' group and multiplier.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> adapter = {"q": {"A": jnp.ones((8, 2)), "B": jnp.zeros((2, 4))}}
      >>> tx = lr.loraplus_adamw(1e-3, ratio=4.0)
      >>> grads = {"q": {"A": jnp.ones((8, 2)), "B": jnp.ones((2, 4))}}
      >>> u, _ = tx.update(grads, tx.init(adapter), adapter)
      >>> round(float(u["q"]["B"][0, 0] / u["q"]["A"][0, 0]), 3)
      4.0

    References:
      Hayou, Ghosh, Yu, "LoRA+", ICML 2024; PEFT ``create_loraplus_optimizer``.
    """

    def no_decay(path: str, leaf: Any) -> bool:
        if jnp.ndim(leaf) != 1 and _lora_factors.factor_of(path) != "b":
            return False
        return any(("bias" in part or "norm" in part.lower()) for part in path.split("/"))

    return optax.chain(
        optax.scale_by_adam(b1, b2, eps),
        optax.add_decayed_weights(weight_decay, _lora_decay_mask(no_decay)),
        scale_by_loraplus(
            ratio, embedding_pattern=embedding_pattern, embedding_ratio=embedding_ratio
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def lorafa_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    scaling: Any = 1.0,
    delta: float = 1e-8,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-FA with AdamW, as PEFT's ``create_lorafa_optimizer``: ``A`` frozen, ``B`` projected.

    .. math::
        B \leftarrow \bigl(B - \eta\,\mathrm{AdamHF}(\tilde g_B)\bigr)(1 - \eta\lambda),\qquad
        \tilde g_B = s^{-2}(A^\top A + \delta I)^{+} g_B

    (HF-style Adam: ``eps`` before bias correction, decay of the updated weights; the same
    AdamW for non-LoRA leaves; no state and no update for ``A``). Pass the frozen ``A`` with
    ``update(..., frozen=adapters.frozen)`` when it is not in the trained tree (see
    :func:`lowrank_jax.transforms.lorafa`).

    Args:
      learning_rate: scalar or schedule.
      scaling: LoRA scale ``s``: a float or ``{adapter path: s}``.
      delta: ``δ``.
      b1, b2, eps: Adam constants (PEFT: betas (0.9, 0.999), eps 1e-6).
      weight_decay: ``λ`` (never applied to ``A``).

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> adapter = {"q": {"A": jnp.eye(8, 2), "B": jnp.zeros((2, 4))}}
      >>> tx = lr.lorafa_adamw(1e-3)
      >>> tx.init(adapter)[0].inner_state.mu["q"]["B"].shape  # no moments for A
      (2, 4)

    References:
      Zhang et al., "LoRA-FA", arXiv:2308.03303; PEFT ``create_lorafa_optimizer``.
    """
    return optax.chain(
        lorafa(scale_by_adam_hf(b1, b2, eps), scaling=scaling, delta=delta),
        optax.scale_by_learning_rate(learning_rate),
        decoupled_weight_decay(
            learning_rate,
            weight_decay,
            after_update=True,
            mask=_lora_decay_mask(lambda path, x: _lora_factors.factor_of(path) == "a"),
        ),
    )


def allora_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    eta: float = 2.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""ALLoRA: AdamW with a per-row rate :math:`\eta_0/\sqrt{\|P_i\| + 1/\eta^2}` on LoRA factors.

    .. math::
        P_i \leftarrow P_i - \frac{\eta_0}{\sqrt{\|P_i\|_2 + 1/\eta^2}}
        \bigl(\mathrm{Adam}(g_P)_i + \mu P_i\bigr)

    for every row :math:`P_i` of the ``A`` and ``B`` factors (other leaves: plain AdamW). Use
    it with LoRA scale ``s = 1`` and no dropout, as the paper (see
    :func:`lowrank_jax.transforms.scale_by_allora`).

    Args:
      learning_rate: ``η₀`` (scalar or schedule).
      eta: ``η`` of the coefficient (default 2).
      b1, b2, eps: Adam constants.
      weight_decay: ``μ`` (decoupled, scaled by the row's coefficient too).

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> adapter = {"q": {"A": jnp.ones((8, 2)), "B": jnp.zeros((2, 4))}}
      >>> tx = lr.allora_adamw(1e-3)
      >>> u, _ = tx.update(adapter, tx.init(adapter), adapter)
      >>> u["q"]["B"].shape
      (2, 4)

    References:
      Huang, Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", 2024.
    """
    return optax.chain(
        optax.scale_by_adam(b1, b2, eps),
        optax.add_decayed_weights(weight_decay),
        scale_by_allora(eta),
        optax.scale_by_learning_rate(learning_rate),
    )


def q_galore_adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    update_proj_gap: int | jax.Array = 200,
    scale: float | jax.Array = 0.25,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    proj_bits: int = 4,
    proj_group_size: int = 256,
    pack_projector: bool = False,
    adaptive_refresh: AdaptiveRefresh | None = AdaptiveRefresh(),  # noqa: B008
    int8_weights: Any = None,
    stochastic_round: bool = True,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    proj_type: str = "std",
    targets: Targets = None,
    dims: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Q-GaLore: 8-bit GaLore with INT4 projectors, lazy refresh, and optionally INT8 weights.

    .. math::
        W \leftarrow Q_8\Bigl(\bigl(\hat W - \eta\,\alpha\,\hat P\,
        \mathrm{Adam8bit}(\hat P^\top G)\bigr)(1 - \eta\lambda)\Bigr)

    with :math:`\hat P` the dequantized INT4 basis (:func:`lowrank_jax.transforms.q_galore`)
    and, when ``int8_weights`` is given, :math:`\hat W` the dequantized INT8 weight and
    :math:`Q_8` stochastic rounding back to INT8
    (:func:`lowrank_jax.transforms.stochastic_weight_update`). Then ``params`` passed to
    ``update`` are :func:`lowrank_jax.transforms.quantize_weights` of the float ones (same
    ``targets``/``dims``), the forward uses
    :func:`lowrank_jax.transforms.dequantize_weights`, and ``optax.apply_updates`` writes the
    new codes. Without ``int8_weights`` the weights stay float and decay applies to the
    updated weights (as :func:`galore_adamw_8bit`). Defaults: the Q-GaLore repository's
    (``run_pretrain.py``: β₂ 0.95, 4-bit projectors in groups of 256, threshold 0.4).

    Args:
      learning_rate: scalar or schedule.
      rank, update_proj_gap, scale, proj_bits, proj_group_size, pack_projector,
        adaptive_refresh, proj_type, targets, dims, seed: see
        :func:`lowrank_jax.transforms.q_galore`.
      b1, b2, eps, block_size, min_8bit_size: 8-bit Adam (:func:`lowrank_jax.scale_by_adam_8bit`).
      weight_decay: decoupled decay of the updated weights.
      int8_weights: the float parameters (or their ``ShapeDtypeStruct``) whose targeted
        weights are stored INT8; ``None`` keeps float weights.
      stochastic_round: stochastic rounding of the INT8 weights (else round to nearest).

    Example:
      >>> import jax, jax.numpy as jnp, optax, lowrank_jax as lr
      >>> params = {"w": jnp.ones((64, 32))}
      >>> qparams = lr.transforms.quantize_weights(params)
      >>> tx = lr.q_galore_adamw_8bit(1e-3, rank=4, int8_weights=params, proj_group_size=64)
      >>> updates, _ = tx.update(params, tx.init(params), qparams)
      >>> optax.apply_updates(qparams, updates)["w"].codes.dtype
      dtype('uint8')

    References:
      Zhang et al., "Q-GaLore", 2024; ``q-galore-torch`` 1.0 ``AdamW8bit``.
    """
    low = q_galore(
        scale_by_adam_8bit(b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size),
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_bits=proj_bits,
        proj_group_size=proj_group_size,
        pack_projector=pack_projector,
        adaptive_refresh=adaptive_refresh,
        proj_type=proj_type,
        targets=targets,
        dims=dims,
        seed=seed,
    )
    if int8_weights is None:
        last = decoupled_weight_decay(learning_rate, weight_decay, after_update=True)
    else:
        last = stochastic_weight_update(
            like=int8_weights, dims=dims, learning_rate=learning_rate,
            weight_decay=weight_decay, stochastic=stochastic_round, seed=seed,
        )
    return optax.chain(low, optax.scale_by_learning_rate(learning_rate), last)
