r"""Merging several LoRA adapters into one: PEFT's ``add_weighted_adapter`` and LoRA-LEGO.

:func:`combine_adapters` reproduces PEFT's combination types (``peft.tuners.lora.model``,
``peft.utils.merge_utils``) on the canonical Flax factors ``ΔK_i = s_i A_i B_i``:

* ``cat``: ``A = [w_1 s_1 A_1, …, w_T s_T A_T]``, ``B = [B_1; …; B_T]`` -- exact,
  ``ΔK = Σ_i w_i s_i A_i B_i``, rank ``Σ r_i``.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine ``A`` and
  ``B`` *separately* (equal ranks), with weights ``sign(w_i s_i)√|w_i s_i|`` on ``A`` and
  ``√|w_i s_i|`` on ``B``; the product has cross terms ``A_i B_j`` (PEFT's behaviour, kept for
  parity: "a very rough approximation").
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``
  combine the updates ``ΔK_i`` (``s_i`` included, weights ``w_i``) and re-factorise by a
  truncated SVD ``ΔK ≈ U_r (S_r V_r^\top)``: ``A = U_r``, ``B = S_r V_r^\top`` (rank
  ``svd_rank`` or the largest source rank), optionally clamped at the ``svd_clamp`` quantile.

The tensor combiners (:func:`combine_tensors`) are TIES (Yadav et al., 2023: keep the top
``density`` magnitudes, elect a sign by total mass or frequency, average the agreeing
entries) and DARE (Yu et al., 2023: keep each entry with probability ``density``, rescale by
``1/density``). The result is a plain LoRA with ``α = r`` (scale 1). PEFT's merged config also
inherits ``use_rslora``, which rescales the merged adapter by ``√r``; here it never does.

:func:`lora_lego` is LoRA-LEGO's rank-wise clustering (Zhao et al., ICLR 2025): every rank-1
term ``(a, b)`` of every source is a *minimal semantic unit*; k-means groups them into ``k``
clusters whose centroids form the merged rank-``k`` adapter, then two reweightings restore the
scale lost by averaging.

References:
  PEFT ``add_weighted_adapter``: https://github.com/huggingface/peft
  Yadav et al., "TIES-Merging", NeurIPS 2023, https://arxiv.org/abs/2306.01708
  Yu et al., "Language Models are Super Mario" (DARE), ICML 2024, https://arxiv.org/abs/2311.03099
  Zhao et al., "Merging LoRAs like Playing LEGO", ICLR 2025, https://arxiv.org/abs/2409.16167
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.reparam._algebra import adapter_list, by_path, lora_adapters, per_matrix
from lowrank_jax.reparam.core import Adapters

__all__ = [
    "COMBINATIONS",
    "combine_adapters",
    "combine_tensors",
    "lora_lego",
    "merge_key",
]

_FACTORS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINATIONS = ("cat", *_FACTORS, *(f"{t}_svd" if t != "linear" else "svd" for t in _FACTORS))
_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_ROLES = {"A": 0, "B": 1, "delta": 2}


def merge_key(key: jax.Array, path: str, role: str, index: int) -> jax.Array:
    """The DARE key of source ``index``'s tensor ``role`` (``"A"``, ``"B"`` or ``"delta"``) at
    ``path``: ``fold_in(fold_in(fold_in(key, crc32(path)), role), index)``."""
    key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(jax.random.fold_in(key, _ROLES[role]), index)


def _magnitude_mask(t: jax.Array, density: float) -> jax.Array:
    """Keeps the ``int(density·p·q)`` largest ``|t|`` of each ``(p, q)`` matrix."""
    size = t.shape[-1] * t.shape[-2]
    k = int(density * size)
    if k >= size:
        return jnp.ones(t.shape, bool)
    if k == 0:
        return jnp.zeros(t.shape, bool)
    flat = jnp.abs(t).reshape(*t.shape[:-2], size)
    threshold = jax.lax.top_k(flat, k)[0][..., -1]
    return jnp.abs(t) >= threshold[..., None, None]


def combine_tensors(
    tensors: Sequence[jax.Array],
    weights: Sequence[float],
    how: str = "linear",
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    keys: Sequence[jax.Array] | None = None,
) -> jax.Array:
    r"""Combines task tensors ``τ_i`` (one shape, matrices in the last two axes) into one.

    .. math::
        \text{linear: } \sum_i w_i τ_i;\quad
        \text{ties: } \frac{\sum_i w_i \hat τ_i [\operatorname{sign}\hat τ_i = σ]}
        {\max(1, \sum_i [\operatorname{sign}\hat τ_i = σ])},\ σ = \operatorname{sign}
        \textstyle\sum_i \hat τ_i \ (\text{"total"; "frequency": } \sum_i
        \operatorname{sign}\hat τ_i)

    with ``τ̂`` the magnitude-pruned tensors (``ties``, ``magnitude_prune``: the top
    ``int(density·size)`` of each matrix) or the DARE-pruned ones (``dare_*``: a Bernoulli
    ``density`` mask, rescaled by ``1/density``). The sign is elected on the unweighted pruned
    tensors and ``σ ≥ 0`` counts as ``+1``, as in PEFT's ``merge_utils``.

    Args:
      tensors: ``T`` arrays of one shape.
      weights: ``T`` floats.
      how: ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` or
        ``"magnitude_prune"``.
      density: the fraction kept, in ``[0, 1]`` (``>= 1``: no pruning); needed by every ``how``
        but ``linear``.
      majority_sign_method: ``"total"`` or ``"frequency"``.
      keys: one PRNG key per tensor (DARE only).

    Returns:
      The combined float32 tensor.

    Example:
      >>> import jax.numpy as jnp
      >>> from lowrank_jax.reparam import merging
      >>> t = [jnp.array([[1.0, -2.0]]), jnp.array([[3.0, 1.0]])]
      >>> merging.combine_tensors(t, [1.0, 1.0], "ties", density=1.0)
      Array([[ 2., -2.]], dtype=float32)

    References:
      Yadav et al., 2023, https://arxiv.org/abs/2306.01708; Yu et al., 2023,
      https://arxiv.org/abs/2311.03099.
    """
    if how not in _FACTORS:
        raise ValueError(f"combine_tensors: how must be one of {_FACTORS}, got {how!r}.")
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"combine_tensors: got {len(weights)} weights for {len(tensors)} tensors.")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}."
        )
    t = jnp.stack([jnp.asarray(x, jnp.float32) for x in tensors])
    if how in _DENSITY:
        if density is None or not density >= 0:
            raise ValueError(
                f"combination {how!r} needs density= in [0, 1] (the fraction of entries kept); "
                f"got {density!r}."
            )
        if density < 1 and how.startswith("dare"):
            if keys is None or len(keys) != len(tensors):
                raise ValueError(f"combination {how!r} needs one PRNG key per tensor (keys=).")
            masks = jnp.stack([jax.random.bernoulli(k, density, x.shape) for k, x in zip(keys, t)])
            t = t * masks / density
        elif density < 1:
            t = t * _magnitude_mask(t, density)
    w = jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (t.ndim - 1))
    if how in ("ties", "dare_ties"):
        sign = jnp.sign(t)
        mass = t.sum(0) if majority_sign_method == "total" else sign.sum(0)
        agree = sign == jnp.where(mass >= 0, 1.0, -1.0)
        return (t * w * agree).sum(0) / jnp.maximum(agree.sum(0), 1)
    return (t * w).sum(0)


def _svd_factors(delta: jax.Array, rank: int, clamp: float | None) -> tuple[jax.Array, jax.Array]:
    # PEFT's orientation (torch ``ΔW = ΔKᵀ``): the same LAPACK problem, so the same singular
    # vector signs where the two builds agree -- which ``svd_clamp``'s quantile depends on.
    u, s, vh = jnp.linalg.svd(delta.T, full_matrices=False)
    a, b = vh[:rank].T, (u[:, :rank] * s[:rank]).T
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([a.ravel(), b.ravel()]), clamp)
        a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
    return a, b


def combine_adapters(
    adapters: Any,
    weights: Any = None,
    combination_type: str = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
) -> Adapters:
    """Merges LoRA adapters into one LoRA adapter, as PEFT's ``add_weighted_adapter``.

    See the module docstring for every ``combination_type``. A leaf adapted by only some of the
    sources combines those (PEFT's behaviour); a single source always combines ``linear``.

    Args:
      adapters: plain LoRA :class:`~lowrank_jax.reparam.Adapters` on one base (a sequence or a
        mapping ``name -> Adapters``).
      weights: one weight per adapter (negative subtracts); default 1 each.
      combination_type: one of :data:`COMBINATIONS` (default ``"svd"``, as PEFT).
      svd_rank: rank of the ``*svd`` results (default: the largest source rank at the leaf).
      svd_clamp: quantile in ``[0, 1]`` at which the ``*svd`` factors are clamped.
      density: fraction kept by the ``ties``/``dare``/``magnitude_prune`` types.
      majority_sign_method: ``"total"`` or ``"frequency"`` (TIES sign election).
      key: PRNG key for the DARE masks (per tensor: :func:`merge_key`).

    Returns:
      Plain LoRA :class:`~lowrank_jax.reparam.Adapters` with ``α = r`` (scale 1).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.zeros((8, 6))}
      >>> _, a = reparam.lora(rank=2).init(jax.random.key(0), params)
      >>> _, b = reparam.lora(rank=2).init(jax.random.key(1), params)
      >>> b_new = jnp.arange(12.0).reshape(2, 6)  # as if trained (B starts at 0)
      >>> a = a.replace(trainable={"w": {**a.trainable["w"], "B": b_new}})
      >>> b = b.replace(trainable={"w": {**b.trainable["w"], "B": -b_new}})
      >>> cat = reparam.combine_adapters([a, b], [0.5, 0.5], "cat")
      >>> want = 0.5 * (reparam.apply(params, a)["w"] + reparam.apply(params, b)["w"])
      >>> bool(jnp.allclose(reparam.apply(params, cat)["w"], want, atol=1e-6))
      True

    References:
      PEFT ``LoraModel.add_weighted_adapter``; see the module docstring.
    """
    what = "combine_adapters"
    if combination_type not in COMBINATIONS:
        raise ValueError(f"{what}: combination_type must be one of {COMBINATIONS}, got "
                         f"{combination_type!r}.")  # fmt: skip
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ValueError(f"{what}: svd_clamp is a quantile in [0, 1], got {svd_clamp}.")
    items, ws = adapter_list(adapters, weights, what)
    if len(items) == 1:
        combination_type = "linear"
    how = combination_type.removesuffix("_svd")
    how = "linear" if how == "svd" else how
    if how in _DENSITY and (density is None or density < 0):
        raise ValueError(f"{what}: combination_type={combination_type!r} needs density= in "
                         f"[0, 1], got {density!r}.")  # fmt: skip
    if how.startswith("dare") and density < 1 and key is None:
        raise ValueError(f"{what}: combination_type={combination_type!r} needs key= (DARE).")
    opts = dict(density=density, majority_sign_method=majority_sign_method)
    out = {}
    for path, entries in by_path(items, what).items():
        site = entries[0].site
        dtype = items[entries[0].index].trainable[path]["B"].dtype
        w = [ws[e.index] for e in entries]
        ranks = [e.a.shape[-1] for e in entries]

        def keys(role: str, path=path, entries=entries) -> list | None:
            return None if key is None else [merge_key(key, path, role, e.index) for e in entries]

        if combination_type == "cat":
            a = jnp.concatenate([wi * e.scale * e.a for wi, e in zip(w, entries)], axis=-1)
            b = jnp.concatenate([e.b for e in entries], axis=-2)
        elif combination_type.endswith("svd"):
            rank = svd_rank or max(ranks)
            n_in, n_out = site.canonical_shape[-2:]
            if not 1 <= rank <= min(n_in, n_out):
                raise ValueError(
                    f"{what}: svd_rank={rank} does not fit leaf '{path}' with (in, out) = "
                    f"({n_in}, {n_out}); pass svd_rank <= {min(n_in, n_out)}."
                )
            deltas = [e.scale * (e.a @ e.b) for e in entries]
            delta = combine_tensors(deltas, w, how, keys=keys("delta"), **opts)
            a, b = per_matrix(lambda d, r=rank: _svd_factors(d, r, svd_clamp), delta)
        else:
            if len(set(ranks)) != 1:
                raise ValueError(
                    f"{what}: combination_type={combination_type!r} needs equal ranks, but leaf "
                    f"'{path}' has ranks {ranks}; use 'cat' or an '*svd' type."
                )
            ws_ = [wi * e.scale for wi, e in zip(w, entries)]
            wa = [float(np.sign(x) or 1.0) * float(np.sqrt(abs(x))) for x in ws_]
            wb = [float(np.sqrt(abs(x))) for x in ws_]
            a = combine_tensors([e.a for e in entries], wa, how, keys=keys("A"), **opts)
            b = combine_tensors([e.b for e in entries], wb, how, keys=keys("B"), **opts)
        out[path] = (site, a.astype(dtype), b.astype(dtype), None)
    return lora_adapters(out)


def _kmeans(x: np.ndarray, k: int, key: jax.Array, iterations: int) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; returns the cluster of each row."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min(((x[:, None, :] - np.stack(centers)[None]) ** 2).sum(-1), axis=1)
        p = d / d.sum() if d.sum() > 0 else np.full(len(x), 1.0 / len(x))
        centers.append(x[rng.choice(len(x), p=p)])
    centers = np.stack(centers)
    labels = np.full(len(x), -1)
    for _ in range(iterations):
        new = np.argmin(((x[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            if np.any(labels == c):  # an empty cluster keeps its centre
                centers[c] = x[labels == c].mean(0)
    return labels


def _lego_matrix(
    a: np.ndarray, b: np.ndarray, k: int, key: jax.Array, iterations: int, reweight: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One matrix: units ``a: (N, in)``, ``b: (N, out)`` -> ``A: (in, k)``, ``B: (k, out)``."""
    rows = np.arange(len(a))
    sign = np.sign(a[rows, np.argmax(np.abs(a), axis=1)])
    sign[sign == 0] = 1.0
    a, b = a * sign[:, None], b * sign[:, None]  # (a, b) and (-a, -b) are one unit
    labels = _kmeans(np.concatenate([a, b], axis=1), k, key, iterations)
    ca, cb = np.zeros((k, a.shape[1])), np.zeros((k, b.shape[1]))
    for c in range(k):
        members = labels == c
        ca[c], cb[c] = a[members].mean(0), b[members].mean(0)
        if reweight:  # parameter reweighting: a centroid keeps its members' mean norm
            for centre, units in ((ca, a), (cb, b)):
                norm = np.linalg.norm(centre[c])
                if norm > 0:
                    centre[c] *= np.linalg.norm(units[members], axis=1).mean() / norm
    if reweight:  # output reweighting: the merged update keeps the sum's Frobenius norm
        target = np.linalg.norm(a.T @ b)
        merged = np.linalg.norm(ca.T @ cb)
        if merged > 0:
            gain = np.sqrt(target / merged)
            ca, cb = ca * gain, cb * gain
    return ca.T, cb


def lora_lego(
    adapters: Any,
    weights: Any = None,
    *,
    rank: int | None = None,
    key: jax.Array | None = None,
    iterations: int = 100,
    reweight: bool = True,
) -> Adapters:
    r"""LoRA-LEGO: merges LoRAs by clustering their rank-1 units (MSUs) into ``rank`` clusters.

    Every source ``t`` contributes the units ``(a, b) = (σ_t c_t A_t[:, i], c_t B_t[i, :])``
    with ``c_t = √|w_t s_t|``, ``σ_t = sign(w_t s_t)``, so that ``Σ_units a bᵀ = Σ_t w_t s_t
    A_t B_t`` (the concatenation-summation equivalence). Each unit is sign-normalised
    (``(a, b) ≡ (-a, -b)``: the largest ``|a|`` entry positive), the units ``[a; b]`` are
    clustered by k-means (k-means++ seeding from ``key``, Euclidean distance), and the
    centroids are the merged factors. The dual reweighting (``reweight=True``) is this
    library's reading of the paper, whose formulas we could not check against code: *parameter*
    reweighting scales each centroid's ``a`` and ``b`` to the mean norm of its members' (undoing
    the norm decay of averaging), *output* reweighting scales the merged update to the
    Frobenius norm of ``Σ_t w_t s_t A_t B_t``. With ``rank`` equal to the number of units the
    result is exactly ``cat``.

    Args:
      adapters: plain LoRA :class:`~lowrank_jax.reparam.Adapters` on one base (sequence or
        mapping); ranks may differ.
      weights: one weight per adapter; default 1 each.
      rank: ``k``, the merged rank (default: the largest source rank at each leaf).
      key: PRNG key for the k-means++ seeding (default ``jax.random.key(0)``).
      iterations: maximum Lloyd iterations.
      reweight: apply the dual reweighting.

    Returns:
      Plain LoRA :class:`~lowrank_jax.reparam.Adapters` of rank ``k`` with scale 1.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.zeros((8, 6))}
      >>> _, a = reparam.lora(rank=2).init(jax.random.key(0), params)
      >>> _, b = reparam.lora(rank=3).init(jax.random.key(1), params)
      >>> merged = reparam.lora_lego([a, b], rank=4)
      >>> merged.sites[0].method.rank
      4

    Reference:
      Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to
      Extremes Through Rank-Wise Clustering", ICLR 2025, https://arxiv.org/abs/2409.16167.
    """
    what = "lora_lego"
    items, ws = adapter_list(adapters, weights, what)
    key = jax.random.key(0) if key is None else key
    out = {}
    for path, entries in by_path(items, what).items():
        units = sum(e.a.shape[-1] for e in entries)
        k = rank or max(e.a.shape[-1] for e in entries)
        if not 1 <= k <= units:
            raise ValueError(
                f"{what}: rank={k} at leaf '{path}' must be between 1 and the number of rank-1 "
                f"units there ({units})."
            )
        c = [ws[e.index] * e.scale for e in entries]
        a = np.concatenate(
            [np.sign(x or 1.0) * np.sqrt(abs(x)) * np.asarray(e.a) for x, e in zip(c, entries)],
            axis=-1,
        )
        b = np.concatenate([np.sqrt(abs(x)) * np.asarray(e.b) for x, e in zip(c, entries)], -2)
        site_key = merge_key(key, path, "delta", 0)
        batch = a.shape[:-2]
        merged_a, merged_b = [], []
        for idx in np.ndindex(*batch) if batch else [()]:
            ma, mb = _lego_matrix(
                np.swapaxes(a[idx], -1, -2), b[idx], k, site_key, iterations, reweight
            )
            merged_a.append(ma)
            merged_b.append(mb)
        a_out = np.stack(merged_a).reshape(*batch, *merged_a[0].shape)
        b_out = np.stack(merged_b).reshape(*batch, *merged_b[0].shape)
        dtype = items[entries[0].index].trainable[path]["B"].dtype
        out[path] = (entries[0].site, jnp.asarray(a_out, dtype), jnp.asarray(b_out, dtype), None)
    return lora_adapters(out)
