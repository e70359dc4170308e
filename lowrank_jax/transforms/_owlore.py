"""OwLore's layer probabilities: outlier ratios of ``|W|·‖X‖`` per layer (OWL's LOD).

OwLore is ``lisa(galore(...), probs=owl_probabilities(outlier_scores(...)))``: layers with
more "outlier" weights are sampled more often (:func:`lowrank_jax.owlore_adamw`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.targets import Targets, resolve, resolve_dims
from lowrank_jax.transforms._lisa import LAYER_PATTERN, STACKED_PATTERN, partition

__all__ = ["feature_norms", "outlier_scores", "owl_probabilities"]


def feature_norms(inputs: jax.Array) -> jax.Array:
    """``‖X_j‖₂`` of each input feature ``j`` (last axis) over all tokens (every other axis).

    For the layers of a :mod:`lowrank_jax.models` model,
    :func:`lowrank_jax.models.input_feature_norms` collects them all on a calibration batch.

    Args:
      inputs: the activations entering a linear layer on a calibration batch, ``(..., in)``.

    Returns:
      ``float32[in]``; for a stacked ``[L, in, out]`` kernel, stack one row per layer.
    """
    x = jnp.asarray(inputs, jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(x.ndim - 1))))


def outlier_scores(
    params: Any,
    input_norms: Mapping[str, Any],
    *,
    m: float = 5.0,
    layer_pattern: str = LAYER_PATTERN,
    stacked_pattern: str | None = STACKED_PATTERN,
    targets: Targets = None,
    dims: Any = None,
) -> np.ndarray:
    r"""OWL's layer-wise outlier distribution: % of ``A_ij = |W_ij|·‖X_j‖`` above ``m·mean``.

    For layer :math:`\ell`, concatenating the scores of all its targeted matrices:

    .. math::
        \mathrm{LOD}_\ell = 100 \cdot \frac{\#\{A_{ij} > m\,\bar A_\ell\}}{\#A}

    where :math:`j` runs over each matrix's *input* features (the Wanda score).

    Args:
      params: the (pretrained) parameters; layers found as in :func:`lowrank_jax.lisa`.
      input_norms: ``{leaf path: ‖X‖}`` for every targeted layer matrix: ``[in]`` for a
        per-layer leaf, ``[L, in]`` for a stacked one (see :func:`feature_norms`;
        :func:`lowrank_jax.models.input_feature_norms` gives them for a model, and
        :func:`lowrank_jax.models.owlore_probabilities` the probabilities).
      m: outlier threshold ``M`` (OWL's ``--Hyper_m``; OwLore's cache name suggests 13 for
        LLaMA-2-7B, unverified; 5 here).
      layer_pattern, stacked_pattern: as :func:`lowrank_jax.lisa`.
      targets: which layer matrices count (default: every weight matrix that is not a norm,
        bias or embedding).
      dims: :class:`~lowrank_jax.MatrixDims` (which axis is the input).

    Returns:
      ``float64[L]``, the LOD of each layer (a percentage).

    Raises:
      ValueError: a targeted matrix without its input norms, or norms of the wrong shape.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lr
      >>> w = jnp.ones((4, 3)).at[0, 0].set(50.0)
      >>> params = {"layers": {"0": {"w": w}, "1": {"w": jnp.ones((4, 3))}}}
      >>> norms = {"layers/0/w": jnp.ones(4), "layers/1/w": jnp.ones(4)}
      >>> lr.transforms.outlier_scores(params, norms, m=5.0).round(2).tolist()
      [8.33, 0.0]

    References:
      Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)", ICML 2024; Li et al.,
      "OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection", 2024.
    """
    part = partition(params, layer_pattern=layer_pattern, stacked_pattern=stacked_pattern)
    leaves = part.treedef.flatten_up_to(params)
    mask = part.treedef.flatten_up_to(resolve(targets, params, method="outlier_scores"))
    dims_list = part.treedef.flatten_up_to(resolve_dims(dims, params))
    per_layer: list[list[np.ndarray]] = [[] for _ in range(part.n_layers)]
    for i, kind in enumerate(part.kinds):
        if kind not in ("layer", "stacked") or not mask[i] or dims_list[i] is None:
            continue
        path = part.paths[i]
        if path not in input_norms:
            raise ValueError(
                f"outlier_scores: no input norms for '{path}'; give input_norms[{path!r}] "
                "(feature_norms of the activations entering it), or leave it out of targets."
            )
        d = dims_list[i].normalize(np.ndim(leaves[i]), path)
        w = np.abs(np.asarray(d.to_canonical(jnp.asarray(leaves[i], jnp.float32))))
        x = np.asarray(input_norms[path], np.float64)
        expected = w.shape[:-1]
        if kind == "layer" and x.shape == w.shape[-2:-1]:
            x = x.reshape(expected)
        if x.shape != expected:
            raise ValueError(
                f"outlier_scores: input_norms[{path!r}] has shape {x.shape}; expected "
                f"{expected} (batch axes, then the {w.shape[-2]} input features)."
            )
        scores = w * x[..., None]
        if kind == "layer":
            per_layer[part.layer_of[i]].append(scores.reshape(-1))
        else:
            for layer in range(part.n_layers):
                per_layer[layer].append(scores[layer].reshape(-1))
    lod = np.zeros(part.n_layers)
    for layer, chunks in enumerate(per_layer):
        if not chunks:
            raise ValueError(f"outlier_scores: layer {layer} has no targeted matrix.")
        a = np.concatenate(chunks)
        lod[layer] = 100.0 * np.count_nonzero(a > m * a.mean()) / a.size
    return lod


def owl_probabilities(scores: Any) -> np.ndarray:
    """OwLore's sampling probabilities: ``p_ℓ = LOD_ℓ / Σ_k LOD_k``.

    Raises:
      ValueError: negative or non-finite scores, or all zero.
    """
    s = np.asarray(scores, np.float64)
    if s.ndim != 1 or not np.all(np.isfinite(s)) or np.any(s < 0) or s.sum() <= 0:
        raise ValueError(
            "owl_probabilities: scores must be finite, non-negative and not all zero; lower m "
            f"if no weight is an outlier. Got {s.tolist()}."
        )
    return s / s.sum()
