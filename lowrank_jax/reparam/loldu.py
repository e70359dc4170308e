r"""LoLDU: train only the diagonal of a truncated LDU factorisation of the weight.

With the PyTorch weight ``W = Kᵀ (out×in)`` factorised by partial-pivoting LU,
``W = P L U = P L\,\mathrm{diag}(d)\,U'`` (``U' = U / d`` unit upper triangular), and the first
``r`` pivots kept,

.. math::
    W_{res} = W - s\,(PL)_{[:, :r]}\,\mathrm{diag}(d_{:r})\,U'_{[:r]}, \qquad
    W' = W_{res} + s\,(PL)_{[:, :r]}\,\mathrm{diag}(z)\,U'_{[:r]}

so in the canonical layout ``ΔK = s·U_rᵀ diag(z) L_rᵀ`` with ``U_rᵀ: (in, r)`` and
``L_r = (PL)[:, :r]: (out, r)`` frozen (``P`` is folded into ``L`` -- no dense ``m×m``
permutation is stored) and ``z`` (``r``) trained, initialised to ``d_{:r}`` so that ``W' = W`` at
init (the base becomes ``W_res``: a residual init like PiSSA). ``s = α/r`` with the reference's
``from_linear`` default ``α = 1``; its ``scaling_factor`` is an ``nn.Parameter`` but
``get_loldu_params`` only collects ``vector_z``: ``train_scale=True`` also trains ``s``
(UNVERIFIED which the paper does). A pivot ``|d_i| ≤ 10⁻⁶·max|d|`` (rank-deficient ``W``) would
blow up ``U/d``; there ``d_i = 1`` and the row of ``U`` is kept unnormalised, which leaves
``L diag(d) U'`` -- and every result -- unchanged. The LU truncation is not a best rank-``r``
approximation (``W_res`` is not small) and the first ``r`` pivots are in pivot order, not by
importance, as in the reference. The LU runs in float32.

Reference: Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning", 2024. https://arxiv.org/abs/2410.13618 (code: SKDDJ/LoLDU).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.reparam import _validate as check
from lowrank_jax.reparam.method import Method, f32, register
from lowrank_jax.reparam.wrapper import Reparam

__all__ = ["LoLDU", "ldu_factors", "loldu"]

PIVOT_FLOOR = 1e-6


def ldu_factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U_rᵀ: (..., in, r), d: (..., r), L_rᵀ: (..., r, out))`` for canonical ``w``.

    ``Wᵀ = P L diag(d) U'`` (torch's ``torch.linalg.lu`` convention, as ``scipy.linalg.lu``);
    ``L_r = (PL)[:, :r]`` and ``U_r = U'[:r]``.
    """
    torch_w = jnp.swapaxes(f32(w), -1, -2)
    lu = jax.scipy.linalg.lu
    for _ in range(torch_w.ndim - 2):  # one LU per stacked matrix
        lu = jax.vmap(lu)
    p, low, up = lu(torch_w)
    pl = p @ low  # (..., out, k)
    d = jnp.diagonal(up, axis1=-2, axis2=-1)
    tiny = jnp.abs(d) <= PIVOT_FLOOR * jnp.max(jnp.abs(d), axis=-1, keepdims=True)
    d = jnp.where(tiny, 1.0, d)
    unit = up / d[..., :, None]
    u_r = jnp.swapaxes(unit[..., :rank, :], -1, -2)
    return u_r, d[..., :rank], jnp.swapaxes(pl[..., :rank], -1, -2)


@register
@dataclasses.dataclass(frozen=True)
class LoLDU(Method):
    """``W' = W_res + s·U_rᵀ diag(z) L_rᵀ`` with only ``z`` (and optionally ``s``) trained."""

    rank: int = 4
    alpha: float = 1.0
    train_scale: bool = False

    def __post_init__(self):
        check.positive_int("LoLDU", "rank", self.rank)
        check.nonnegative("LoLDU", "alpha", self.alpha)

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        check.fits("LoLDU", path, "rank", self.rank, min(shape[-2:]), shape)

    def init(self, key: jax.Array, w: jax.Array, *, path: str, stats: Any = None) -> tuple:
        u, d, low = ldu_factors(w, self.rank)
        trainable = {"z": d}
        if self.train_scale:
            trainable["s"] = jnp.full(w.shape[:-2], self.alpha / self.rank, jnp.float32)
        return {"U": u, "L": low}, trainable

    def _scale(self, trainable: dict) -> Any:
        if self.train_scale:
            return f32(trainable["s"])[..., None, None]
        return self.alpha / self.rank

    def _delta(self, frozen: dict, trainable: dict, z: jax.Array) -> jax.Array:
        u = f32(frozen["U"]) * f32(z)[..., None, :]
        return self._scale(trainable) * (u @ f32(frozen["L"]))

    def residual(self, w: jax.Array, frozen: dict, trainable: dict) -> jax.Array:
        start = self._delta(frozen, trainable, trainable["z"])  # z = d at init
        return (f32(w) - start).astype(w.dtype)

    def delta(self, w, frozen: dict, trainable: dict) -> jax.Array:
        return self._delta(frozen, trainable, trainable["z"])

    def product(self, x, x_drop, w, frozen: dict, trainable: dict, c) -> jax.Array:
        u = frozen["U"].astype(x.dtype) * trainable["z"].astype(x.dtype)[..., None, :]
        low = c.then(c.into(x_drop, u), frozen["L"].astype(x.dtype))
        scale = self._scale(trainable)
        if self.train_scale:
            scale = scale[..., 0].astype(x.dtype)  # (..., 1): broadcasts over the out axis
        return c.into(x, w) + scale * low


def loldu(
    rank: int = 4,
    alpha: float = 1.0,
    *,
    train_scale: bool = False,
    targets: Any = None,
    dims: Any = None,
    dtype: Any = jnp.float32,
) -> Reparam:
    """LoLDU: only the ``r`` diagonal entries of the weight's truncated LDU factors train.

    Args:
      rank: ``r`` (the reference's ``from_linear`` default 4; its README uses 15).
      alpha: ``s = α/r`` (reference default ``α = 1``).
      train_scale: also train ``s`` (one scalar per matrix).
      targets, dims, dtype: see :class:`~lowrank_jax.reparam.Reparam`.

    Returns:
      A :class:`~lowrank_jax.reparam.Reparam` (residual base); trainable parameters ``r`` per
      matrix (``r + 1`` with ``train_scale``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.sin(jnp.arange(128.0)).reshape(16, 8)}
      >>> base, adapters = reparam.loldu(rank=4).init(jax.random.key(0), params)
      >>> reparam.num_trainable(adapters)
      4
      >>> bool(jnp.allclose(reparam.apply(base, adapters)["w"], params["w"], atol=1e-5))
      True

    Reference: Shi et al., 2024, https://arxiv.org/abs/2410.13618.
    """
    method = LoLDU(rank=rank, alpha=float(alpha), train_scale=train_scale)
    return Reparam(method, targets, dims, (), dtype)
