"""The one calibration hook of the data-driven initialisations (LoRA-GA, EVA, LoRA-SB).

Feed a :class:`Calibration` with gradients (a ``jax.grad`` of the loss, any params-shaped tree)
or with the input activations of the targeted layers (``{path: x}``; for NNX models
:func:`lowrank_jax.reparam.collect_inputs` records them), one batch at a time, then pass it to
``Reparam.init(..., calibration=cal)``. It keeps only sufficient statistics, per targeted site,
in float32: the gradient sum, or the activations' sum and Gram matrix (an exact, single-pass
replacement of the incremental PCA in PEFT's EVA).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lowrank_jax import reparam
  >>> params = {"w": jnp.ones((8, 4))}
  >>> rp = reparam.loraga(rank=1)
  >>> cal = rp.calibration(params)
  >>> cal.add_gradients({"w": jnp.arange(32.0).reshape(8, 4)})
  >>> params, adapters = rp.init(jax.random.key(0), params, calibration=cal)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lowrank_jax.targets import path_str

__all__ = ["ActivationStats", "Calibration"]


class ActivationStats(NamedTuple):
    """Centred second moments of a site's inputs: ``mean (B..., in)``, ``cov (B..., in, in)``."""

    mean: jax.Array
    cov: jax.Array
    count: int


class Calibration:
    """Accumulates calibration statistics for the sites of one reparam (host-side, eager)."""

    def __init__(self, sites: Any):
        self._sites = {site.path: site for site in sites}
        self._grad_sum: dict[str, jax.Array] = {}
        self._grad_count: dict[str, int] = {}
        self._x_sum: dict[str, jax.Array] = {}
        self._xx_sum: dict[str, jax.Array] = {}
        self._x_count: dict[str, int] = {}

    @property
    def sites(self) -> tuple:
        """The sites it collects statistics for (what :func:`collect_inputs` records)."""
        return tuple(self._sites.values())

    def add_gradients(self, grads: Any) -> None:
        """Adds one batch's gradient (a params-shaped tree; untargeted leaves are ignored)."""
        for kp, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
            path = path_str(kp)
            site = self._sites.get(path)
            if site is None:
                continue
            if tuple(g.shape) != site.shape:
                raise ValueError(
                    f"calibration: gradient at leaf '{path}' has shape {tuple(g.shape)}, the "
                    f"parameter has {site.shape}. Pass jax.grad of the loss w.r.t. the params."
                )
            g = site.canonical(jnp.asarray(g, jnp.float32))
            self._grad_sum[path] = self._grad_sum.get(path, 0.0) + g
            self._grad_count[path] = self._grad_count.get(path, 0) + 1

    def add_activations(self, activations: Mapping[str, jax.Array]) -> None:
        """Adds one batch of layer inputs ``{path: x}``.

        ``x`` is ``(..., in)`` for a 2-D kernel, or ``(*B, N, in)`` for a kernel with batch axes
        ``B`` (each axis of ``B`` sized as the kernel's or 1 when the input is shared).
        """
        for path, x in activations.items():
            site = self._sites.get(path)
            if site is None:
                raise ValueError(
                    f"calibration: no targeted leaf '{path}'; targeted: {sorted(self._sites)}."
                )
            *batch, n_in, _ = site.canonical_shape
            x = jnp.asarray(x, jnp.float32)
            if x.shape[-1] != n_in or (batch and x.ndim != len(batch) + 2):
                want = f"(*{tuple(batch)}, tokens, {n_in})" if batch else f"(..., {n_in})"
                raise ValueError(
                    f"calibration: activations for '{path}' have shape {x.shape}; want {want}."
                )
            if not batch:
                x = x.reshape(-1, n_in)
            self._x_sum[path] = self._x_sum.get(path, 0.0) + x.sum(-2)
            gram = jnp.einsum("...ti,...tj->...ij", x, x)
            self._xx_sum[path] = self._xx_sum.get(path, 0.0) + gram
            self._x_count[path] = self._x_count.get(path, 0) + x.shape[-2]

    def stat(self, path: str, kind: str, site: Any) -> Any:
        """The finished statistic of ``kind`` (``"gradients"``/``"activations"``) at ``path``."""
        *batch, n_in, _ = site.canonical_shape
        if kind == "gradients":
            if path not in self._grad_sum:
                raise ValueError(
                    f"calibration has no gradient for leaf '{path}'. Call "
                    f"cal.add_gradients(jax.grad(loss)(params, batch)) for a few batches first."
                )
            return self._grad_sum[path] / self._grad_count[path]
        if path not in self._x_sum:
            raise ValueError(
                f"calibration has no activations for leaf '{path}'. Call "
                f"cal.add_activations({{'{path}': x}}) (reparam.collect_inputs records them)."
            )
        count = self._x_count[path]
        if count < 2:
            raise ValueError(f"calibration: leaf '{path}' needs at least 2 activation rows.")
        mean = self._x_sum[path] / count
        cov = (self._xx_sum[path] - count * mean[..., :, None] * mean[..., None, :]) / (count - 1)
        shape = (*batch, n_in)
        return ActivationStats(
            jnp.broadcast_to(mean, shape), jnp.broadcast_to(cov, (*shape, n_in)), count
        )
