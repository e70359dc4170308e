r"""LoRA-XS and LoRA-SB: a trainable ``r×r`` core between frozen SVD factors.

.. math:: W' = W + s\,A R B, \qquad A \in \mathbb{R}^{in\times r},\ R \in \mathbb{R}^{r\times r},
   \ B \in \mathbb{R}^{r\times out} \text{ frozen}; \ R \text{ trained } (r^2 \text{ parameters})

* **LoRA-XS** takes ``A = U_r S_r`` and ``B = V_r^\top`` from the truncated SVD of the canonical
  weight ``W = U S V^\top`` (the reference's ``TruncatedSVD`` of ``Wᵀ``) and starts ``R`` at 0
  (the reference draws ``R ~ N(0, 10⁻⁵²)``: ``core_init_std=1e-5``), so it is a no-op at init.
* **LoRA-SB** approximates the first full fine-tuning step ``ΔW ≈ -η·sign(Ḡ)`` (Adam's first
  step; ``update="sgd"`` uses ``-η·Ḡ``) from calibration gradients, takes its truncated SVD
  ``U S V^\top`` and sets ``A = U_r``, ``R = S_r``, ``B = V_r^\top`` with ``s = 1``, so the
  adapted model starts *at* the approximated first step (``residual=True`` subtracts it instead,
  making init a no-op).

References:
  Bałazy et al., "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters",
  2024. https://arxiv.org/abs/2405.17604
  Ponkshe et al., "Initialization using Update Approximation is a Silver Bullet for Extremely
  Efficient Low-Rank Fine-Tuning", 2024. https://arxiv.org/abs/2411.19557
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.reparam.method import Method, check_rate, f32, normal, positive_int, register
from lowrank_jax.reparam.wrapper import Reparam

__all__ = ["LoRASB", "LoRAXS", "lora_sb", "lora_xs"]


def _truncated_svd(m: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    u, s, vh = jnp.linalg.svd(f32(m), full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


@register
@dataclasses.dataclass(frozen=True)
class LoRAXS(Method):
    """``W' = W + s·A@R@B`` with frozen SVD factors ``A``, ``B`` and a trained core ``R``."""

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    core_init_std: float = 0.0

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        *_, n_in, n_out = shape
        if not 1 <= self.rank <= min(n_in, n_out):
            raise ValueError(
                f"{type(self).__name__}: rank={self.rank} does not fit leaf '{path}' with an "
                f"(in, out) = ({n_in}, {n_out}) matrix; use rank <= {min(n_in, n_out)} there."
            )

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        u, s, vh = _truncated_svd(w, self.rank)
        shape = (*w.shape[:-2], self.rank, self.rank)
        core = jnp.zeros(shape, jnp.float32)
        if self.core_init_std:
            core = self.core_init_std * normal(key, shape)
        return {"A": u * s[..., None, :], "B": vh}, {"R": core}

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        return self.scale * (f32(frozen["A"]) @ f32(trainable["R"]) @ f32(frozen["B"]))

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        t = c.into(x_drop, frozen["A"].astype(x.dtype))
        t = c.then(c.then(t, trainable["R"].astype(x.dtype)), frozen["B"].astype(x.dtype))
        return c.into(x, w) + self.scale * t


@register
@dataclasses.dataclass(frozen=True)
class LoRASB(LoRAXS):
    """LoRA-SB: the LoRA-XS structure initialised from the approximated first update."""

    lr: float = 1e-4
    update: str = "sign"
    residual_init: bool = False
    calibration = "gradients"

    def __post_init__(self):
        super().__post_init__()
        if self.update not in ("sign", "sgd"):
            raise ValueError(f"LoRA-SB update must be 'sign' or 'sgd', got {self.update!r}.")

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        grad = f32(stats)
        step = -self.lr * (jnp.sign(grad) if self.update == "sign" else grad)
        u, s, vh = _truncated_svd(step, self.rank)
        core = jnp.zeros((*s.shape, self.rank)) + s[..., None] * jnp.eye(self.rank)
        return {"A": u, "B": vh}, {"R": core / self.scale}

    def residual(self, w: jax.Array, frozen: dict, trainable: dict) -> jax.Array:
        if not self.residual_init:
            return w
        return (f32(w) - self.delta(w, frozen, trainable)).astype(w.dtype)


def lora_xs(
    rank: int = 8,
    alpha: float | None = None,
    *,
    dropout: float = 0.0,
    core_init_std: float = 0.0,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """LoRA-XS: only an ``r×r`` core trains between frozen SVD factors of ``W``.

    Args:
      rank: ``r``; trainable parameters ``r²`` per matrix.
      alpha: ``s = α/r``; default ``s = 1``.
      dropout: adapter-input dropout (in :func:`~lowrank_jax.reparam.wrap` layers).
      core_init_std: std of ``R`` at init (0: a no-op at init; the reference uses 1e-5).
      targets, dims, dtype: see :class:`~lowrank_jax.reparam.Reparam`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.sin(jnp.arange(128.0)).reshape(16, 8)}
      >>> _, adapters = reparam.lora_xs(rank=4).init(jax.random.key(1), params)
      >>> reparam.num_trainable(adapters)
      16

    Reference: Bałazy et al., 2024, https://arxiv.org/abs/2405.17604.
    """
    positive_int("lora_xs", "rank", rank)
    check_rate("lora_xs", "dropout", dropout)
    method = LoRAXS(rank=rank, alpha=alpha, dropout=dropout, core_init_std=core_init_std)
    return Reparam(method, targets, dims, (), dtype)


def lora_sb(
    rank: int = 8,
    *,
    lr: float = 1e-4,
    update: str = "sign",
    residual: bool = False,
    dropout: float = 0.0,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """LoRA-SB: LoRA-XS initialised from the truncated SVD of the approximated first full
    fine-tuning step (needs ``calibration`` with gradients); no scaling hyperparameter.

    Args:
      rank: ``r``; trainable parameters ``r²`` per matrix.
      lr: ``η``, the fine-tuning learning rate used to approximate the first step.
      update: ``"sign"`` (Adam's first step, the reference) or ``"sgd"``.
      residual: subtract the initial update from the base (init becomes a no-op).
      dropout, targets, dims, dtype: as :func:`lora_xs`.

    Reference: Ponkshe et al., 2024, https://arxiv.org/abs/2411.19557.
    """
    positive_int("lora_sb", "rank", rank)
    check_rate("lora_sb", "dropout", dropout)
    method = LoRASB(rank=rank, dropout=dropout, lr=lr, update=update, residual_init=residual)
    return Reparam(method, targets, dims, (), dtype)
