"""Layer-wise fused updates: each layer is updated as soon as its gradient exists.

GaLore's per-layer weight update (Zhao et al. 2024, §4.3) in JAX. The model's layers are
scan-stacked (``scan_layers=True``: one ``[L, ...]`` leaf per weight); the step runs the
forward pass over the stack, then walks it backwards, and at layer ``l`` computes that
layer's gradient, applies the optimizer to the layer's slice of the parameters and of the
optimizer state, and writes both back before moving to layer ``l - 1``. So at most one
layer's weight gradient is alive, instead of the whole model's. The remaining leaves (the
embedding, the head, the final norm and the per-layer norm scales, which are vectors) are
updated at the end, from their gradients kept whole (they are small next to the layers'
matrices... except the embedding, which the ordinary step keeps too).

The optimizer is any optax transformation whose state follows its parameters leaf by leaf
(AdamW, GaLore with every basis, 8-bit Adam, Fira, APOLLO): :class:`StateSplit` finds, from
abstract ``init`` calls alone, which state leaves belong to the stacked matrices (and follow
their layer axis), which to the other leaves, and which are shared counters and keys. A method
whose state does not decompose so (LISA and OwLore sample layers, global-norm clipping needs
every gradient first) is rejected with an error that names it.

Reference: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", ICML 2024, §4.3 ("per-layer weight updates", after Lv et al.'s LOMO).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.transforms._lowrank import layer_offset

__all__ = [
    "LayerwiseError",
    "StateSplit",
    "layerwise_accumulate_step",
    "layerwise_step",
    "model_pieces",
    "split_state",
]

LAYERS = "layers"  # the params key of the scan-stacked decoder layers
_WITHOUT = "Train it without layer-wise updates (layerwise=False, no --layerwise)."


class StateSplit(NamedTuple):
    """How an optimizer state divides between the layer slices and the other leaves.

    Attributes:
      n_layers: ``L``.
      layer_keys: which stacked leaves are updated per layer (matrices: ``[L, ..., in, out]``).
      layer_treedef: the structure of ``tx.init`` of one layer's slice (``[1, ...]`` leaves).
      layer_sources: per leaf of that structure, ``(full_index, per_layer)``: the index of the
        leaf it comes from in the full state, and whether it is that leaf's layer slice
        (``True``) or shared as a whole (a step counter, a key).
      layer_shapes: the shape of each leaf of one layer's state.
      rest_treedef, rest_sources: the same for the state of the other leaves (``per_layer``
        is always ``False`` there).
      full_treedef: the structure of the full state.
    """

    n_layers: int
    layer_treedef: Any
    layer_sources: tuple[tuple[int, bool], ...]
    layer_shapes: tuple[tuple[int, ...], ...]
    rest_treedef: Any
    rest_sources: tuple[tuple[int, bool], ...]
    full_treedef: Any


def _path_index(tree: Any) -> dict[str, tuple[int, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): (i, leaf) for i, (path, leaf) in enumerate(flat)}


def _sds(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _empty(node: Any) -> bool:
    return node is None or (isinstance(node, dict) and not node)


class LayerwiseError(ValueError):
    """A model or optimizer that the layer-wise step cannot run; the message says why and what
    to change."""


def partition_params(params: Any) -> tuple[dict, dict]:
    """``(layer_part, rest_part)``: the stacked matrices under ``layers``, and everything else.

    Both keep the original nesting (so paths, and every path-based target, are unchanged).
    """
    if not isinstance(params, dict) or LAYERS not in params:
        raise LayerwiseError(
            "layerwise=True needs a model with scan-stacked layers: its parameters must have a "
            f"'{LAYERS}' entry of [num_layers, ...] leaves (build the model with "
            "scan_layers=True, e.g. get_config(name, scan_layers=True) or --scan-layers)."
        )

    def split(node: Any, keep: bool) -> Any:
        if isinstance(node, dict):
            out = {k: split(v, keep) for k, v in node.items()}
            return {k: v for k, v in out.items() if not _empty(v)}
        is_matrix = np.ndim(node) >= 3
        return node if is_matrix == keep else None

    layer_part = {LAYERS: split(params[LAYERS], True)}
    rest_part = {k: v for k, v in params.items() if k != LAYERS}
    rest_layers = split(params[LAYERS], False)
    if rest_layers:
        rest_part[LAYERS] = rest_layers
    if not layer_part[LAYERS]:
        raise LayerwiseError(
            f"layerwise=True: the model's '{LAYERS}' entry has no stacked matrices "
            "([num_layers, in, out] kernels); build it with scan_layers=True."
        )
    return layer_part, rest_part


def merge_params(layer_part: dict, rest_part: dict) -> dict:
    """Inverse of :func:`partition_params`."""

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for key, value in b.items():
            out[key] = merge(a[key], value) if key in a else value
        return out

    return merge(layer_part, rest_part)


def split_state(tx: optax.GradientTransformation, params: Any, method: str = "tx") -> StateSplit:
    """Finds how ``tx``'s state divides per layer (abstract ``init`` calls only).

    Raises:
      ValueError: the state does not decompose (it is not per-leaf, or a leaf of the stacked
        matrices' state does not follow the layer axis), naming ``method`` and the leaf.
    """
    params = _sds(params)
    layer_part, rest_part = partition_params(params)
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(layer_part)}
    if len(sizes) != 1:
        raise LayerwiseError(
            f"layerwise=True: the stacked layer leaves disagree on L: {sorted(sizes)}"
        )
    n_layers = sizes.pop()
    stack_of = lambda n: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype), layer_part
    )

    def init(tree: Any, what: str) -> Any:
        try:
            return jax.eval_shape(tx.init, tree)
        except Exception as err:  # noqa: BLE001 -- one line naming the method
            raise LayerwiseError(
                f"{method} cannot be applied per layer: its init fails on {what} "
                f"({str(err).splitlines()[0][:200]}). {_WITHOUT}"
            ) from None

    full = init(params, "the whole tree")
    full_paths = _path_index(full)
    state_l, state_1, state_rest = (
        init(layer_part, "the stacked layers"),
        init(stack_of(1), "one layer"),
        init(rest_part, "the other leaves"),
    )
    # A state leaf that only looks proportional to L (an 8-bit state's blocks straddling
    # layers: ceil(L·n/B) can equal L·ceil(n/B) for small L) is caught at a large L.
    big = 4099
    state_big = jax.tree.leaves(init(stack_of(big), "a deep stack"))
    flat_l = jax.tree_util.tree_flatten_with_path(state_l)[0]
    flat_1, layer_treedef = jax.tree_util.tree_flatten_with_path(state_1)
    if jax.tree.structure(state_l) != layer_treedef:
        raise LayerwiseError(
            f"{method} cannot be applied per layer: its state for one layer has another "
            "structure than for the stack (it depends on the number of layers; an 8-bit state "
            "keeps leaves smaller than min_8bit_size in float32, so a layer's slice can fall "
            "below the threshold while the stack does not: lower min_8bit_size)."
        )

    def source(path: Any, leaf: Any, part: str) -> int:
        key = jax.tree_util.keystr(path)
        if key not in full_paths or np.shape(full_paths[key][1]) != np.shape(leaf):
            raise LayerwiseError(
                f"{method} cannot be applied per layer: state leaf {key} of {part} is not a "
                "leaf of the whole tree's state (the state is not kept per parameter)."
            )
        return full_paths[key][0]

    layer_sources, layer_shapes = [], []
    for (path, leaf), (_, leaf_1), leaf_big in zip(flat_l, flat_1, state_big, strict=True):
        index = source(path, leaf, "the stacked layers")
        shape, shape_1 = np.shape(leaf), np.shape(leaf_1)
        if shape == shape_1:
            per_layer = False
            if math.prod(shape) > 16:
                raise LayerwiseError(
                    f"{method} cannot be applied per layer: state leaf "
                    f"{jax.tree_util.keystr(path)} {shape} does not follow the layer axis "
                    f"(e.g. LISA keeps the state of its sampled layers). {_WITHOUT}"
                )
        elif math.prod(shape) == n_layers * math.prod(shape_1) and math.prod(
            np.shape(leaf_big)
        ) == big * math.prod(shape_1):
            per_layer = True
        else:
            raise LayerwiseError(
                f"{method} cannot be applied per layer: state leaf {jax.tree_util.keystr(path)} "
                f"{shape} is not {n_layers} layer slices of {shape_1} (an 8-bit state's blocks "
                "straddle layers when a layer's matrix size is not a multiple of the block "
                f"size). {_WITHOUT}"
            )
        layer_sources.append((index, per_layer))
        layer_shapes.append(tuple(shape_1))
    flat_rest, rest_treedef = jax.tree_util.tree_flatten_with_path(state_rest)
    rest_sources = [(source(p, x, "the other leaves"), False) for p, x in flat_rest]
    covered = {i for i, _ in layer_sources} | {i for i, _ in rest_sources}
    missing = sorted(set(range(len(full_paths))) - covered)
    if missing:
        names = [k for k, (i, _) in full_paths.items() if i in missing][:3]
        raise LayerwiseError(
            f"{method} cannot be applied per layer: state leaves {names} belong to neither the "
            "layers nor the other leaves (the state couples parameters)."
        )
    return StateSplit(
        n_layers,
        layer_treedef,
        tuple(layer_sources),
        tuple(layer_shapes),
        rest_treedef,
        tuple(rest_sources),
        jax.tree.structure(full),
    )


def _layer_major(x: jax.Array, n_layers: int) -> jax.Array:
    """``x`` with the layers on axis 0: as it is when it has them there, else ``[L, size]``."""
    return x if np.shape(x)[:1] == (n_layers,) else x.reshape(n_layers, -1)


def layer_state(split: StateSplit, rows: dict, old: list) -> Any:
    """One layer's state: its row of each per-layer leaf (``rows``: index -> row) and the
    shared leaves as they were before the step (``old``)."""
    out = []
    for (index, per_layer), shape in zip(split.layer_sources, split.layer_shapes):
        out.append(rows[index].reshape(shape) if per_layer else old[index])
    return split.layer_treedef.unflatten(out)


def layer_rows(split: StateSplit, state: Any) -> tuple[dict, dict]:
    """One layer's new state as ``(rows of the per-layer leaves, shared leaves)``."""
    rows, shared = {}, {}
    for (index, per_layer), x in zip(split.layer_sources, split.layer_treedef.flatten_up_to(state)):
        if per_layer:
            rows[index] = x
        else:
            shared[index] = x
    return rows, shared


def rest_state(split: StateSplit, leaves: list) -> Any:
    return split.rest_treedef.unflatten([leaves[i] for i, _ in split.rest_sources])


def scatter_rest_state(split: StateSplit, leaves: list, state: Any) -> list:
    leaves = list(leaves)
    for (index, _), x in zip(split.rest_sources, split.rest_treedef.flatten_up_to(state)):
        leaves[index] = x
    return leaves


def _clip(tree: Any, max_norm: float) -> tuple[Any, jax.Array]:
    """``tree`` scaled by ``min(1, c / (‖tree‖ + 1e-6))`` (torch's clip_grad_norm_), its norm."""
    norm = optax.tree.norm(tree)
    if not max_norm:
        return tree, norm
    factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), tree), norm


class LayerwiseModel(NamedTuple):
    """The three pieces of a scan-stacked model the layer-wise step runs separately.

    Attributes:
      embed: ``(params, inputs) -> (x, context)``: the embedded inputs and whatever every layer
        needs (rotary tables, masks); only the non-layer parameters are differentiated.
      layer: ``(layer_params, x, context, index) -> x``: layer ``index`` on ``x``, with
        ``layer_params`` one layer's slice of the ``layers`` subtree.
      head: ``(params, x) -> logits``.
    """

    embed: Callable
    layer: Callable
    head: Callable


def layerwise_step(
    model: LayerwiseModel,
    tx: optax.GradientTransformation,
    split: StateSplit,
    params: Any,
    opt_state: Any,
    inputs: Any,
    loss_of_logits: Callable[[jax.Array], jax.Array],
    *,
    grad_clip: float = 0.0,
    recompute: bool = False,
    skip_nonfinite: bool = True,
) -> tuple[Any, Any, jax.Array, jax.Array]:
    """One layer-wise step; returns ``(params, opt_state, loss, grad_norm)``.

    ``grad_clip`` clips each layer's gradient, and the other leaves' gradient, to that norm
    separately (per-layer clipping); ``grad_norm`` is the true global norm before clipping.
    ``recompute`` re-runs each layer's forward in the backward walk instead of keeping its
    residuals (the ``remat`` trade). With ``skip_nonfinite`` a layer whose gradient is not
    finite is left as it was (parameters and optimizer state), and so are the other leaves when
    theirs is not: the layers before it in the backward walk have been updated already, so
    unlike the ordinary step's skip this one is per layer.
    """
    n_layers = split.n_layers
    layer_part, rest_part = partition_params(params)
    stacked = layer_part[LAYERS]  # the matrices, updated layer by layer
    vectors = rest_part.get(LAYERS, {})  # the layers' norm scales etc., updated at the end
    state_leaves = split.full_treedef.flatten_up_to(opt_state)

    x0, embed_vjp, context = jax.vjp(
        lambda rest: model.embed(merge_params(layer_part, rest), inputs), rest_part, has_aux=True
    )

    def run(matrices: Any, vecs: Any, h: jax.Array, index: jax.Array) -> jax.Array:
        return model.layer(merge_params(matrices, vecs), h, context, index)

    # The backward walk needs each layer's VJP. Its residuals that are the layer's own
    # parameters are not saved again (they are slices of the stack): only activations are.
    pullback = {}

    def forward(x: jax.Array, xs: tuple) -> tuple[jax.Array, Any]:
        matrices, vecs, index = xs
        if recompute:
            return run(matrices, vecs, x, index), x
        y, vjp = jax.vjp(lambda m, v, h: run(m, v, h, index), matrices, vecs, x)
        leaves, pullback["treedef"] = jax.tree.flatten(vjp)
        inputs_leaves = jax.tree.leaves((matrices, vecs))
        pullback["source"] = [
            next((j for j, q in enumerate(inputs_leaves) if leaf is q), None) for leaf in leaves
        ]
        return y, [leaf for leaf, j in zip(leaves, pullback["source"]) if j is None]

    def layer_vjp(matrices: Any, vecs: Any, residual: Any, index: jax.Array) -> Callable:
        if recompute:
            return jax.vjp(lambda m, v, h: run(m, v, h, index), matrices, vecs, residual)[1]
        inputs_leaves, saved = jax.tree.leaves((matrices, vecs)), iter(residual)
        leaves = [next(saved) if j is None else inputs_leaves[j] for j in pullback["source"]]
        return pullback["treedef"].unflatten(leaves)

    x_last, saved = jax.lax.scan(forward, x0, (stacked, vectors, jnp.arange(n_layers)))
    loss, head_vjp = jax.vjp(
        lambda rest, x: loss_of_logits(model.head(merge_params(layer_part, rest), x)),
        rest_part,
        x_last,
    )
    rest_grads, dx = head_vjp(jnp.ones_like(loss))

    def layer_grads(matrices: Any, index: jax.Array, residual: Any, dx: jax.Array) -> tuple:
        return layer_vjp(matrices, _take(vectors, index), residual, index)(dx)

    dx, stacked, rows, shared, layer_sq, vector_grads = _walk(
        tx, split, state_leaves, stacked, dx, saved, layer_grads, grad_clip, skip_nonfinite
    )
    if vectors:
        rest_grads = {**rest_grads, LAYERS: jax.tree.map(jnp.add, rest_grads[LAYERS], vector_grads)}
    (embed_grads,) = embed_vjp(dx)
    rest_grads = jax.tree.map(jnp.add, rest_grads, embed_grads)
    params, opt_state, grad_norm = _finish(
        tx, split, state_leaves, stacked, rows, shared, rest_part, rest_grads, layer_sq,
        grad_clip, skip_nonfinite,
    )  # fmt: skip
    return params, opt_state, loss, grad_norm


def layerwise_accumulate_step(
    model: LayerwiseModel,
    tx: optax.GradientTransformation,
    split: StateSplit,
    params: Any,
    opt_state: Any,
    inputs: Any,
    targets: jax.Array,
    loss_of_logits: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    grad_clip: float = 0.0,
    skip_nonfinite: bool = True,
) -> tuple[Any, Any, jax.Array, jax.Array]:
    """One layer-wise step over ``k`` microbatches (gradient accumulation); returns
    ``(params, opt_state, loss, grad_norm)`` of the whole batch, as :func:`layerwise_step`.

    ``inputs`` (a tuple) and ``targets`` (any pytree) carry the microbatches on a leading
    axis of size ``k``; ``loss_of_logits(logits, target)`` is one microbatch's loss, either
    its mean (a scalar: the loss is the mean of the microbatches' means, the whole batch's
    mean when they weigh alike, as equal-sized microbatches of a token-mean loss do) or
    ``(total, count)``, its summed loss and the number of terms summed (the loss is then
    ``sum(total) / sum(count)`` over the microbatches, e.g. the mean over all the batch's
    response tokens however they fall in the microbatches). The gradient is that loss's.

    The gradients are accumulated one layer at a time, exactly, for every method: the forward
    pass runs the microbatches one after another through each layer and keeps only each
    layer's inputs (``k`` microbatches' hidden states per layer, the activations of remat);
    the backward walk, at layer ``l``, recomputes the layer on each microbatch in turn, sums
    their weight gradients into one layer-sized buffer, passes each microbatch's input
    gradient down, and then updates the layer. So what is alive at once is one layer's summed
    gradient and one microbatch's layer workspace, whatever ``k``; no method-specific
    (low-rank) accumulator is needed, and a projector refresh sees the whole batch's gradient
    as in the ordinary step. The price is the remat price: each layer's forward runs twice.
    """
    n_layers = split.n_layers
    layer_part, rest_part = partition_params(params)
    stacked = layer_part[LAYERS]
    vectors = rest_part.get(LAYERS, {})
    state_leaves = split.full_treedef.flatten_up_to(opt_state)

    def embed(rest: Any, microbatch: Any) -> tuple[jax.Array, Any]:
        return model.embed(merge_params(layer_part, rest), microbatch)

    x0, context = jax.lax.map(lambda mb: embed(rest_part, mb), inputs)

    def run(matrices: Any, vecs: Any, h: jax.Array, ctx: Any, index: jax.Array) -> jax.Array:
        return model.layer(merge_params(matrices, vecs), h, ctx, index)

    def forward(x: jax.Array, xs: tuple) -> tuple[jax.Array, jax.Array]:
        matrices, vecs, index = xs
        y = jax.lax.map(lambda a: run(matrices, vecs, a[0], a[1], index), (x, context))
        return y, x

    x_last, layer_inputs = jax.lax.scan(forward, x0, (stacked, vectors, jnp.arange(n_layers)))

    def total_and_count(rest: Any, h: jax.Array, target: Any) -> tuple[jax.Array, jax.Array]:
        out = loss_of_logits(model.head(merge_params(layer_part, rest), h), target)
        total, count = out if isinstance(out, tuple) else (out, 1.0)  # a mean weighs 1
        return total, jnp.asarray(count, jnp.float32)

    def head(carry: tuple, xs: tuple) -> tuple[tuple, jax.Array]:
        total_sum, count_sum, grads_sum = carry
        x, target = xs
        total, vjp, count = jax.vjp(
            lambda rest, h: total_and_count(rest, h, target), rest_part, x, has_aux=True
        )
        grads, dx = vjp(jnp.ones_like(total))  # of the total: divided by the count below
        sums = (total_sum + total, count_sum + count, jax.tree.map(jnp.add, grads_sum, grads))
        return sums, dx

    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    zero = jnp.zeros([], jnp.float32)
    (total, count, rest_grads), dx = jax.lax.scan(
        head, (zero, zero, zeros(rest_part)), (x_last, targets)
    )
    # The whole batch's count is known only now, before any layer's gradient exists: the
    # loss is the summed total over it, and every gradient below follows from dx.
    count = jnp.maximum(count, 1.0)
    scale = lambda g: (g / count).astype(g.dtype)
    rest_grads, dx = jax.tree.map(scale, rest_grads), scale(dx)

    def layer_grads(matrices: Any, index: jax.Array, saved: jax.Array, dx: jax.Array) -> tuple:
        vecs = _take(vectors, index)

        def microbatch(sums: tuple, ys: tuple) -> tuple[tuple, jax.Array]:
            h, ctx, dy = ys
            vjp = jax.vjp(lambda m, v, a: run(m, v, a, ctx, index), matrices, vecs, h)[1]
            grads, vector_grads, dh = vjp(dy)
            return jax.tree.map(jnp.add, sums, (grads, vector_grads)), dh

        (grads, vector_grads), dx = jax.lax.scan(
            microbatch, (zeros(matrices), zeros(vecs)), (saved, context, dx)
        )
        return grads, vector_grads, dx

    dx, stacked, rows, shared, layer_sq, vector_grads = _walk(
        tx, split, state_leaves, stacked, dx, layer_inputs, layer_grads, grad_clip, skip_nonfinite
    )
    if vectors:
        rest_grads = {**rest_grads, LAYERS: jax.tree.map(jnp.add, rest_grads[LAYERS], vector_grads)}

    def embed_grads(sums: Any, xs: tuple) -> tuple[Any, None]:
        microbatch, dy = xs
        (grads,) = jax.vjp(lambda rest: embed(rest, microbatch), rest_part, has_aux=True)[1](dy)
        return jax.tree.map(jnp.add, sums, grads), None

    rest_grads, _ = jax.lax.scan(embed_grads, rest_grads, (inputs, dx))
    params, opt_state, grad_norm = _finish(
        tx, split, state_leaves, stacked, rows, shared, rest_part, rest_grads, layer_sq,
        grad_clip, skip_nonfinite,
    )  # fmt: skip
    return params, opt_state, total / count, grad_norm


def _walk(
    tx: optax.GradientTransformation,
    split: StateSplit,
    state_leaves: list,
    stacked: Any,
    dx: Any,
    saved: Any,
    layer_grads: Callable,
    grad_clip: float,
    skip_nonfinite: bool,
) -> tuple:
    """The backward walk over the stacked layers, last first: at layer ``l``,
    ``layer_grads(matrices, l, saved[l], dx) -> (grads, vector_grads, dx)`` gives its
    gradients and the layer is updated at once (:func:`_update_layer`). Returns ``(dx,
    stacked, rows, shared, sum of the layers' squared gradient norms, vector_grads)``."""
    rows = _state_rows(split, state_leaves)

    def backward(carry: tuple, xs: tuple) -> tuple[tuple, Any]:
        dx, stacked, rows, _, layer_sq = carry
        index, residual = xs
        grads, vector_grads, dx = layer_grads(_take(stacked, index), index, residual, dx)
        stacked, rows, shared, sq = _update_layer(
            tx, split, state_leaves, stacked, rows, grads, index, grad_clip, skip_nonfinite
        )
        return (dx, stacked, rows, shared, layer_sq + sq), vector_grads

    shared = {i: state_leaves[i] for i, per_layer in split.layer_sources if not per_layer}
    (dx, stacked, rows, shared, layer_sq), vector_grads = jax.lax.scan(
        backward,
        (dx, stacked, rows, shared, jnp.zeros([], jnp.float32)),
        (jnp.arange(split.n_layers), saved),
        reverse=True,
    )
    return dx, stacked, rows, shared, layer_sq, vector_grads


def _take(tree: Any, index: jax.Array) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), tree)


def _state_rows(split: StateSplit, state_leaves: list) -> dict:
    """The per-layer state leaves as rows (``[L, ...]``), so that one dynamic index picks a
    layer's slice; only they travel through the backward loop (updated in place)."""
    return {
        i: _layer_major(state_leaves[i], split.n_layers)
        for i, per_layer in split.layer_sources
        if per_layer
    }


def _update_layer(
    tx: optax.GradientTransformation,
    split: StateSplit,
    state_leaves: list,
    stacked: Any,
    rows: dict,
    grads: Any,
    index: jax.Array,
    grad_clip: float,
    skip_nonfinite: bool,
) -> tuple[Any, dict, dict, jax.Array]:
    """Applies ``tx`` to layer ``index`` with its gradient ``grads`` and writes the layer's
    parameters and state rows back in place; returns ``(stacked, rows, shared, |grads|^2)``
    (the norm before clipping)."""
    matrices, state_rows = _take(stacked, index), _take(rows, index)
    grads, norm = _clip(grads, grad_clip)
    one = lambda t: {LAYERS: jax.tree.map(lambda a: a[None], t)}
    old_state = layer_state(split, state_rows, state_leaves)

    def apply() -> tuple[Any, Any]:
        with layer_offset(index):
            updates, new_state = tx.update(one(grads), old_state, one(matrices))
        return jax.tree.map(lambda p, u: p + u[0], matrices, updates[LAYERS]), new_state

    # The update runs inside a cond (skipped, leaving the layer unchanged, when its gradient
    # is not finite). The cond is also where XLA stops fusing: without it the update's
    # arithmetic (which reads the moments) is fused into the in-place write of the
    # parameters, and XLA then copies every stacked buffer to keep the writes safe.
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    if not skip_nonfinite:
        finite = jnp.bool_(True)
    new_matrices, new_state = jax.lax.cond(finite, apply, lambda: (matrices, old_state))
    stacked = jax.tree.map(
        lambda s, p: jax.lax.dynamic_update_index_in_dim(s, p.astype(s.dtype), index, 0),
        stacked,
        new_matrices,
    )
    new_rows, shared = layer_rows(split, new_state)
    rows = {
        i: jax.lax.dynamic_update_index_in_dim(
            rows[i], new_rows[i].reshape(rows[i].shape[1:]).astype(rows[i].dtype), index, 0
        )
        for i in rows
    }
    return stacked, rows, shared, jnp.square(norm)


def _finish(
    tx: optax.GradientTransformation,
    split: StateSplit,
    state_leaves: list,
    stacked: Any,
    rows: dict,
    shared: dict,
    rest_part: Any,
    rest_grads: Any,
    layer_sq: jax.Array,
    grad_clip: float,
    skip_nonfinite: bool,
) -> tuple[Any, Any, jax.Array]:
    """Updates the other leaves and reassembles ``(params, opt_state, global grad norm)``."""
    rest_grads, rest_norm = _clip(rest_grads, grad_clip)
    leaves = list(state_leaves)
    for i, row in rows.items():
        leaves[i] = row.reshape(np.shape(state_leaves[i])).astype(state_leaves[i].dtype)
    for i, value in shared.items():  # shared leaves (counters): as the layers left them,
        leaves[i] = value  # unless the other leaves' update writes them too
    old_rest_state = rest_state(split, state_leaves)
    updates, new_rest_state = tx.update(rest_grads, old_rest_state, rest_part)
    new_rest_part = optax.apply_updates(rest_part, updates)
    if skip_nonfinite:
        finite = jnp.isfinite(rest_norm)
        new_rest_part, new_rest_state = jax.tree.map(
            lambda n, o: jnp.where(finite, n, o),
            (new_rest_part, new_rest_state),
            (rest_part, old_rest_state),
        )
    leaves = scatter_rest_state(split, leaves, new_rest_state)
    params = merge_params({LAYERS: stacked}, new_rest_part)
    grad_norm = jnp.sqrt(layer_sq + jnp.square(rest_norm))
    return params, split.full_treedef.unflatten(leaves), grad_norm


def model_pieces(graphdef: Any, params: Any) -> LayerwiseModel:
    """The :class:`LayerwiseModel` of a Flax NNX model with scan-stacked ``layers``.

    The model provides ``embed_inputs(*inputs) -> (x, context)``, ``run_layer(layer, x,
    context, index) -> x`` and ``output_logits(x) -> logits`` (our LLaMA and the architectures
    its loader builds do); ``graphdef`` is its ``nnx.graphdef`` and ``params`` its parameters
    (abstract or traced: only their structure is used here).
    """
    from flax import nnx

    model = nnx.merge(graphdef, params)
    for name in ("embed_inputs", "run_layer", "output_logits"):
        if not hasattr(model, name):
            raise LayerwiseError(
                f"layerwise=True: {type(model).__name__} has no {name}(); the layer-wise step "
                "runs the model's embedding, each layer and its head separately."
            )
    layer_def = nnx.graphdef(model.layers)

    def embed(params: Any, inputs: Any) -> tuple[jax.Array, Any]:
        return nnx.merge(graphdef, params).embed_inputs(*inputs)

    def layer(layer_params: Any, x: jax.Array, context: Any, index: jax.Array) -> jax.Array:
        return model.run_layer(nnx.merge(layer_def, layer_params), x, context, index)

    def head(params: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params).output_logits(x)

    return LayerwiseModel(embed, layer, head)
