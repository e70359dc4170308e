r"""LaMDA: a frozen first projection, a small trainable core, and a gradually frozen second one.

.. math::
    W' = W + s\,A\,S\,B, \qquad A \in \mathbb{R}^{in\times r} \text{ (frozen, "PMA")},\
    S \in \mathbb{R}^{r\times r} \text{ (trained)},\ B \in \mathbb{R}^{r\times out}
    \text{ (trained, frozen row by row: "PMB")}, \qquad s = \alpha / r

The released code (``lamda.py:get_lamda_model``) inserts ``sigma = Linear(r, r)`` between PEFT's
``lora_A`` and ``lora_B`` and freezes ``lora_A``; its init is PEFT LoRA's: ``A`` Kaiming-uniform
``U(±1/√in)``, ``B = 0`` (a no-op), ``S`` torch's ``Linear`` default ``U(±1/√r)``
(``init="kaiming"``, default). The paper's spectral init (``A``, ``B`` from the singular vectors
of ``W``) is not in the repository: ``init="svd"`` takes ``A = U_r``, ``B = V_rᵀ`` of the
canonical ``W = U Σ Vᵀ`` and ``S = 0`` (a no-op), our reading, UNVERIFIED. The reference casts
``S`` to bfloat16; here the adapter dtype is the ``Reparam``'s (float32 by default).

**Gradual freezing of B** (``custom_trainer.py:gradual_freeze_B``, ``η = 0.3``):
``t_f = ⌊t / (η·T)⌋`` rows ``B[:t_f]`` are frozen at step ``t`` of ``T``, all of ``B`` once
``t_f ≥ r``. With ``η = 0.3`` that is at most 3 rows in a run, so for ``r ≥ 4`` ``B`` is never
fully frozen (the paper's figure says it is). :func:`lamda_freeze_b` is that rule as an optax
transformation: chained *before* the optimizer it zeroes the gradient rows (the reference: AdamW's
momentum and weight decay still move them), chained *after* it zeroes the updates (frozen
exactly). Trainable parameters ``r² + r·out`` (``r²`` once ``B`` is frozen).

Reference: Azizi et al., "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional
Adaptation", EMNLP 2024 Findings. https://arxiv.org/abs/2406.12832 (code: ArminAzizi98/LaMDA).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.reparam import _validate as check
from lowrank_jax.reparam.method import Method, f32, kaiming_uniform, register
from lowrank_jax.reparam.wrapper import Reparam

__all__ = ["LaMDA", "lamda", "lamda_freeze_b"]


@register
@dataclasses.dataclass(frozen=True)
class LaMDA(Method):
    """``W' = W + s·A S B`` with ``A`` frozen (see the module docstring)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    init_weights: str = "kaiming"

    def __post_init__(self):
        check.positive_int("LaMDA", "rank", self.rank)
        check.nonnegative("LaMDA", "alpha", self.alpha)
        check.rate("LaMDA", "dropout", self.dropout)
        check.choice("LaMDA", "init", self.init_weights, ("kaiming", "svd"))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        check.fits("LaMDA", path, "rank", self.rank, min(shape[-2:]), shape)

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        *batch, n_in, n_out = w.shape
        r = self.rank
        if self.init_weights == "svd":
            u, _, vh = jnp.linalg.svd(f32(w), full_matrices=False)
            core = jnp.zeros((*batch, r, r), jnp.float32)
            return {"A": u[..., :r]}, {"S": core, "B": vh[..., :r, :]}
        key_a, key_s = jax.random.split(key)
        a = kaiming_uniform(key_a, (*batch, n_in, r), n_in)
        core = kaiming_uniform(key_s, (*batch, r, r), r)
        return {"A": a}, {"S": core, "B": jnp.zeros((*batch, r, n_out), jnp.float32)}

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        a, s, b = f32(frozen["A"]), f32(trainable["S"]), f32(trainable["B"])
        return self.scale * (a @ s @ b)

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        t = c.into(x_drop, frozen["A"].astype(x.dtype))
        t = c.then(c.then(t, trainable["S"].astype(x.dtype)), trainable["B"].astype(x.dtype))
        return c.into(x, w) + self.scale * t


def lamda(
    rank: int = 8,
    alpha: float = 8.0,
    *,
    dropout: float = 0.0,
    init: str = "kaiming",
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """LaMDA: ``W' = W + s·A S B`` with ``A`` frozen and ``B`` frozen gradually.

    Args:
      rank: ``r``.
      alpha: ``α`` (PEFT's ``lora_alpha``); ``s = α/r``.
      dropout: adapter-input dropout (the reference's scripts use 0.1).
      init: ``"kaiming"`` (the released code) or ``"svd"`` (the paper's spectral init, UNVERIFIED).
      targets, dims, dtype: see :class:`~lowrank_jax.reparam.Reparam`.

    Returns:
      A :class:`~lowrank_jax.reparam.Reparam`; trainable parameters ``r² + r·out`` per matrix.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((16, 8))}
      >>> _, adapters = reparam.lamda(rank=4).init(jax.random.key(0), params)
      >>> reparam.num_trainable(adapters)  # 4 * 4 + 4 * 8
      48

    Reference: Azizi et al., EMNLP 2024 Findings, https://arxiv.org/abs/2406.12832.
    """
    method = LaMDA(rank=rank, alpha=float(alpha), dropout=dropout, init_weights=init)
    return Reparam(method, targets, dims, (), dtype)


class FreezeState(NamedTuple):
    count: jax.Array


def _is_b(path: tuple) -> bool:
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "B"


def lamda_freeze_b(max_steps: int, eta: float = 0.3) -> optax.GradientTransformation:
    r"""LaMDA's gradual freezing of ``B``: at step ``t`` the rows ``B[:t_f]`` get zero updates,
    ``t_f = ⌊t/(η·T)⌋``, and all of ``B`` once ``t_f ≥ r`` (every leaf named ``B``).

    Args:
      max_steps: ``T``, the number of optimizer steps.
      eta: ``η`` (the reference's 0.3).

    Returns:
      An ``optax.GradientTransformation``: before the optimizer it freezes the gradient (the
      reference), after it the update (exact).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from lowrank_jax import reparam
      >>> tx = optax.chain(optax.adam(1e-3), reparam.lamda_freeze_b(max_steps=10, eta=0.1))
      >>> params = {"B": jnp.ones((3, 2)), "S": jnp.ones((3, 3))}
      >>> state = tx.init(params)
      >>> for _ in range(2):  # t_f = 1 from the second step on
      ...     updates, state = tx.update(params, state)
      >>> (updates["B"][:, 0] != 0).tolist()  # row 0 frozen
      [False, True, True]
    """
    check.positive_int("lamda_freeze_b", "max_steps", max_steps)
    if not eta > 0:
        raise ValueError(f"lamda_freeze_b: eta must be > 0, got {eta!r}.")

    def init(params: Any) -> FreezeState:
        return FreezeState(jnp.zeros([], jnp.int32))

    def update(updates: Any, state: FreezeState, params: Any = None) -> tuple:
        frozen_rows = jnp.floor(state.count / (eta * max_steps)).astype(jnp.int32)

        def one(path: tuple, u: jax.Array) -> jax.Array:
            if not _is_b(path):
                return u
            rows = jnp.arange(u.shape[-2])[:, None]
            return jnp.where(rows < frozen_rows, jnp.zeros_like(u), u)

        out = jax.tree_util.tree_map_with_path(one, updates)
        return out, FreezeState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)
