"""Initialisations of the LoRA factors, as PEFT computes them, in the canonical layout.

Every function takes the canonical weight ``w: (..., in, out)`` (or a statistic of it) and returns
``A: (..., in, r)`` and ``B: (..., r, out)`` in float32, so that ``ΔW = s·A@B``. PEFT's
``lora_A.weight`` is ``Aᵀ`` and ``lora_B.weight`` is ``Bᵀ``. Leading axes are batch axes.

References:
  PiSSA: Meng et al., 2024, https://arxiv.org/abs/2404.02948.
  OLoRA: Büyükakyüz, 2024, https://arxiv.org/abs/2406.01775.
  LoRA-GA: Wang et al., 2024, https://arxiv.org/abs/2407.05000.
  EVA: Paischer et al., 2024, https://arxiv.org/abs/2410.07170.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import projection
from lowrank_jax.reparam.calibration import ActivationStats

__all__ = ["eva_factors", "eva_ranks", "loraga_factors", "olora_factors", "pissa_factors"]


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def pissa_factors(
    w: jax.Array, rank: int, scale: float, *, niter: int | None = None, key: jax.Array = None
) -> tuple[jax.Array, jax.Array]:
    r"""PiSSA: top-``r`` singular triplets, ``A = U_r\sqrt{S_r/s}``, ``B = \sqrt{S_r/s}V_r^\top``.

    ``niter`` selects PEFT's ``pissa_niter_K`` (a randomized SVD with ``K`` power iterations);
    the residual base is ``W - s·A@B``.
    """
    w = jnp.asarray(w, jnp.float32)
    if niter is None:
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    else:
        u, v = projection.randomized_svd(w, rank, key, power_iters=niter)
        s = jnp.einsum("...ir,...io,...or->...r", u, w, v)
        vh = _t(v)
    root = jnp.sqrt(s / scale)
    return u * root[..., None, :], root[..., :, None] * vh


def olora_factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """OLoRA: the QR factors of PEFT's ``(out, in)`` weight, ``B = Q[:, :r]``, ``A = R[:r]``."""
    q, r = jnp.linalg.qr(_t(jnp.asarray(w, jnp.float32)))
    return _t(r[..., :rank, :]), _t(q[..., :, :rank])


def loraga_factors(
    grad: jax.Array,
    w: jax.Array,
    rank: int,
    scale: float,
    *,
    direction: str = "ArB2r",
    how: str = "stable",
    gamma: float = 16.0,
) -> tuple[jax.Array, jax.Array]:
    r"""LoRA-GA: factors from the SVD of the mean gradient ``G = P Σ Qᵀ`` (canonical layout).

    ``direction="ArB2r"`` (default): ``A = P_{:, :r}``, ``B = Σ_{r:2r} Q_{:, r:2r}^\top``;
    ``"A2rBr"`` swaps the halves; ``"ArBr"`` interleaves. ``how``: ``"stable"`` multiplies ``B``
    by ``out^{1/4}/\sqrt{γ}``, ``"gd_scale"`` divides both by ``s``, ``"weight_svd"`` rescales
    ``B`` to ``σ_1(W)/σ_1(B)``, ``"unit"`` does nothing. The exact SVD replaces PEFT's
    ``svd_lowrank(q=4r, niter=4)``.
    """
    p, sig, qh = jnp.linalg.svd(jnp.asarray(grad, jnp.float32), full_matrices=False)
    pick = {
        "ArB2r": (slice(0, rank), slice(rank, 2 * rank)),
        "A2rBr": (slice(rank, 2 * rank), slice(0, rank)),
        "ArBr": (slice(1, 2 * rank, 2), slice(0, 2 * rank, 2)),
    }
    if direction not in pick:
        raise ValueError(f"LoRA-GA direction must be one of {sorted(pick)}, got {direction!r}.")
    a_idx, b_idx = pick[direction]
    a = p[..., :, a_idx]
    s_b = sig[..., b_idx]
    b = s_b[..., :, None] * qh[..., b_idx, :]
    if how == "stable":
        b = b * (w.shape[-1] ** 0.25 / gamma**0.5)
    elif how == "gd_scale":
        a, b = a / scale, b / scale
    elif how == "weight_svd":
        top = jnp.linalg.svd(jnp.asarray(w, jnp.float32), compute_uv=False)[..., :1]
        b = b * jnp.where(s_b[..., :1] > 0, top / s_b[..., :1], 1.0)[..., None]
    elif how != "unit":
        raise ValueError(f"LoRA-GA scale must be stable|gd_scale|weight_svd|unit, got {how!r}.")
    return a, b


def _components(stats: ActivationStats) -> tuple[jax.Array, jax.Array]:
    """Principal directions ``(B..., in, in)`` (descending) and explained-variance ratios."""
    eig, vec = jnp.linalg.eigh(stats.cov)
    eig, vec = jnp.maximum(eig[..., ::-1], 0.0), vec[..., :, ::-1]
    total = jnp.sum(eig, axis=-1, keepdims=True)
    return vec, eig / jnp.where(total > 0, total, 1.0)


def eva_factors(
    stats: ActivationStats, rank: int, n_out: int, *, whiten: bool = False
) -> tuple[jax.Array, jax.Array]:
    """EVA: ``A`` = the top-``r`` principal directions of the layer inputs, ``B = 0``.

    With ``whiten``, each direction is divided by ``√σ`` with ``σ = √(λ(N-1))`` the singular
    value of the centred inputs, as PEFT does.
    """
    vec, _ = _components(stats)
    a = vec[..., :, :rank]
    if whiten:
        eig = jnp.linalg.eigvalsh(stats.cov)[..., ::-1][..., :rank]
        sigma = jnp.sqrt(jnp.maximum(eig, 0.0) * (stats.count - 1))
        a = a / jnp.sqrt(jnp.where(sigma > 0, sigma, 1.0))[..., None, :]
    batch = a.shape[:-2]
    return a, jnp.zeros((*batch, rank, n_out), jnp.float32)


def eva_ranks(
    stats: Mapping[str, ActivationStats], shapes: Mapping[str, tuple], rank: int, rho: float
) -> dict[str, int]:
    """EVA's rank redistribution: the budget ``r × sites`` goes to the largest explained-variance
    ratios over all sites, at most ``round(r·rho)`` (and ``min(in, out)``) per site."""
    entries = []
    for path, stat in stats.items():
        *_, n_in, n_out = shapes[path]
        cap = min(int(round(rank * rho)), n_in, n_out)
        _, ratio = _components(stat)
        ratio = np.asarray(ratio.reshape(-1, ratio.shape[-1]).mean(0))[:cap]
        entries += [(float(v), path) for v in ratio]
    entries.sort(key=lambda e: -e[0])
    counts = Counter(path for _, path in entries[: rank * len(stats)])
    return {path: counts.get(path, 0) for path in stats}
