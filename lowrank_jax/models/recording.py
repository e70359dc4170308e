"""What enters the linear layers of a model: the input-feature norms OwLore scores layers by.

:func:`input_feature_norms` (one calibration call) and :func:`owlore_probabilities` (OwLore's
layer probabilities from them) are built on :func:`record_input_norms`.

:func:`record_input_norms` sets :attr:`~lowrank_jax.models.layers.Linear.input_hook` on every
:class:`~lowrank_jax.models.layers.Linear` of a module for the duration of a ``with`` block and
deletes it after (on an exception too): outside the block the model, its graph definition and
its compiled functions are what they were, and ``Linear`` only checks a class attribute that is
``None`` at trace time.

Inside the block each call of a layer adds the sum of squares of each input feature over the
kept tokens. Eagerly the sums are taken at once; under a trace (``jax.jit``, the ``lax.scan``
of ``scan_layers=True`` models) they come back through ``jax.debug.callback`` (ordered for
stacked layers, whose calls arrive one layer after another), so the scanned model records one
row per layer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.models.layers import Linear
from lowrank_jax.transforms import outlier_scores, owl_probabilities

__all__ = ["input_feature_norms", "owlore_probabilities", "record_input_norms"]


class _Hook:
    """``Linear.input_hook`` of one layer: hands its inputs to the recorder under its path."""

    def __init__(self, recorder: _Recorder, path: str):
        self.recorder, self.path = recorder, path

    def __call__(self, inputs: jax.Array) -> None:
        self.recorder.record(self.path, inputs)


class _Recorder:
    def __init__(self, mask: Any, stacked: dict[str, int]):
        self.mask = None if mask is None else jnp.asarray(mask) != 0
        self.stacked = stacked  # path -> number of stacked layers
        self.sums: dict[str, list[np.ndarray]] = {}
        self.active = True

    def _keep(self, path: str, shape: tuple[int, ...]) -> jax.Array:
        lead = shape[:-1]
        if self.mask.shape == lead:
            return self.mask
        if len(lead) == 1 and lead[0] == self.mask.size:  # tokens flattened (an LM head)
            return self.mask.reshape(lead)
        raise ValueError(
            f"record_input_norms: mask has shape {tuple(self.mask.shape)}, but '{path}' gets "
            f"inputs of shape {tuple(shape)}; the mask must have the token shape of the inputs "
            "(e.g. [batch, length] for tokens [batch, length]), nonzero where a token counts."
        )

    def record(self, path: str, inputs: jax.Array) -> None:
        x = inputs
        if self.mask is not None:
            x = x * self._keep(path, x.shape).astype(x.dtype)[..., None]
        x = jnp.asarray(x, jnp.float32)
        sumsq = jnp.sum(jnp.square(x), axis=tuple(range(x.ndim - 1)))
        if isinstance(sumsq, jax.core.Tracer):
            store = functools.partial(self._store, path)
            jax.debug.callback(store, sumsq, ordered=path in self.stacked)
        else:
            self._store(path, sumsq)

    def _store(self, path: str, sumsq: Any) -> None:
        if self.active:  # a function traced in the block and called after it records nothing
            self.sums.setdefault(path, []).append(np.asarray(sumsq, np.float32))

    def norms(self) -> dict[str, np.ndarray]:
        out = {}
        for path, rows in self.sums.items():
            layers = self.stacked.get(path)
            if layers is None:
                total = functools.reduce(np.add, rows)
            else:
                if len(rows) % layers:
                    raise RuntimeError(
                        f"record_input_norms: '{path}' stacks {layers} layers but recorded "
                        f"{len(rows)} calls; run the model whole inside the block."
                    )
                total = np.stack(rows).reshape(-1, layers, rows[0].shape[-1]).sum(axis=0)
            out[path] = np.asarray(jnp.sqrt(jnp.asarray(total, jnp.float32)))
        return out


def _linear_layers(model: Any) -> list[tuple[str, Linear]]:
    return [
        ("/".join(str(p) for p in path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, Linear)
    ]


@contextlib.contextmanager
def record_input_norms(model: Any, mask: Any = None) -> Iterator[dict[str, np.ndarray]]:
    """Records ``‖X_j‖₂`` of each input feature of every ``Linear`` of ``model`` in a block.

    Yields a dict that is filled when the block ends: ``{"<layer path>/kernel": float32[in]}``
    (the parameter paths of :func:`lowrank_jax.transforms.outlier_scores`), ``[L, in]`` for
    the stacked layers of a ``scan_layers=True`` model; the norms are over every token of every
    call made in the block (several calibration batches add up). Layers not called are absent.

    Args:
      model: an NNX module with :class:`~lowrank_jax.models.layers.Linear` layers (the
        models of :mod:`lowrank_jax.models`).
      mask: ``None`` (every token counts), or the tokens' shape (``[batch, length]``),
        nonzero where a token counts (``segment_ids > 0``: padding left out).

    Raises:
      ValueError: no ``Linear`` in ``model``, the model already recording, or (when a layer
        is called) a mask whose shape is not the inputs' token shape.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lowrank_jax.models.layers import Linear
      >>> layer = Linear(2, 3, rngs=nnx.Rngs(0))
      >>> with record_input_norms(layer, mask=jnp.array([1, 0])) as norms:
      ...     _ = layer(jnp.array([[3.0, 4.0], [9.0, 9.0]]))
      >>> norms["kernel"].tolist()
      [3.0, 4.0]
    """
    layers = _linear_layers(model)
    if not layers:
        raise ValueError(
            f"record_input_norms: {type(model).__name__} has no lowrank_jax.models.layers.Linear "
            "layer (plain flax nnx.Linear layers have no input hook); use a lowrank_jax.models "
            "model, or build its linear layers with Linear."
        )
    if mask is not None and np.ndim(mask) == 0:
        raise ValueError("record_input_norms: mask must have the tokens' shape, not a scalar.")
    stacked = {
        f"{path}/kernel" if path else "kernel": node.kernel.shape[0]
        for path, node in layers
        if np.ndim(node.kernel) == 3
    }
    recorder = _Recorder(mask, stacked)
    norms: dict[str, np.ndarray] = {}
    hooked = []
    try:
        for path, node in layers:
            if "input_hook" in vars(node):
                raise ValueError(
                    f"record_input_norms: '{path}' is already being recorded (nested blocks "
                    "on one model are not supported)."
                )
            node.input_hook = _Hook(recorder, f"{path}/kernel" if path else "kernel")
            hooked.append(node)
        yield norms
        jax.effects_barrier()  # callbacks of the block's computations have all arrived
        norms.update(recorder.norms())
    finally:
        recorder.active = False
        for node in hooked:
            del node.input_hook


def input_feature_norms(model: Any, *inputs: Any, mask: Any = None, **kwargs: Any) -> dict:
    """``‖X_j‖₂`` of the inputs of every linear layer of ``model`` on a calibration batch.

    Calls ``model(*inputs, **kwargs)`` once inside :func:`record_input_norms` (the model is
    left as it was).

    Args:
      model: an NNX model of :mod:`lowrank_jax.models` (unstacked or ``scan_layers=True``).
      inputs, kwargs: what the model is called with (tokens, positions, segment ids, ...).
      mask: ``None``, or the tokens' shape (``[batch, length]``), nonzero where a token counts:
        ``segment_ids > 0`` leaves the padding out.

    Returns:
      ``{"layers/0/attn/q_proj/kernel": float32[in], ...}``: the paths and shapes
      :func:`lowrank_jax.transforms.outlier_scores` takes (``[L, in]`` for stacked layers, one
      row per layer).

    Raises:
      ValueError: no ``Linear`` layer in the model, none called, or a mask of the wrong shape.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lowrank_jax.models import Llama, get_config, input_feature_norms
      >>> model = Llama(get_config("llama_tiny", vocab_size=259), rngs=nnx.Rngs(0))
      >>> norms = input_feature_norms(model, jnp.ones((2, 8), jnp.int32))
      >>> norms["layers/0/mlp/down_proj/kernel"].shape
      (344,)
    """
    with record_input_norms(model, mask=mask) as norms:
        model(*inputs, **kwargs)
    if not norms:
        raise ValueError(
            f"input_feature_norms: no linear layer of {type(model).__name__} was called by "
            "model(*inputs)."
        )
    return norms


def owlore_probabilities(
    model: Any, *inputs: Any, mask: Any = None, m: float = 5.0, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    """OwLore's layer sampling probabilities for ``model`` from a calibration batch.

    :func:`~lowrank_jax.transforms.owl_probabilities` of
    :func:`~lowrank_jax.transforms.outlier_scores` of the model's parameters and their
    :func:`input_feature_norms` on ``model(*inputs)`` (padding left out by ``mask``): the
    ``probs`` of :func:`lowrank_jax.owlore_adamw`.

    Args:
      model, inputs, mask: as :func:`input_feature_norms`.
      m: the outlier threshold of :func:`~lowrank_jax.transforms.outlier_scores`.
      kwargs: passed on to :func:`~lowrank_jax.transforms.outlier_scores` (``targets``,
        ``dims``, ``layer_pattern``, ``stacked_pattern``).

    Returns:
      ``(probabilities, scores)``, both ``float64[L]`` (the scores are the layers' outlier
      percentages).

    Raises:
      ValueError: as :func:`input_feature_norms`, or no outlier in any layer (lower ``m``).

    References:
      Li et al., "OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection", 2024.
    """
    norms = input_feature_norms(model, *inputs, mask=mask)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    scores = outlier_scores(params, norms, m=m, **kwargs)
    return owl_probabilities(scores), scores
