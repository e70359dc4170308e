r"""QLoRA: a block-quantized frozen base under LoRA/DoRA adapters, for NNX models and param trees.

.. math::
    y = x\,\mathrm{dequant}(Q) + s\,(x A) B \qquad (\text{DoRA: } m \odot
    \frac{\mathrm{dequant}(Q) + sAB}{\lVert \mathrm{dequant}(Q) + sAB \rVert_c})

The base kernels are stored in NF4 (with double-quantized scales) or int8
(:mod:`~lowrank_jax.reparam.quant`); the adapters stay float32. Three ways in:

* ``reparam.wrap(model, reparam.lora(...), quantize_base="nf4")``: the wrapped layers keep
  their base as a :class:`~lowrank_jax.reparam.QuantizedKernel`, dequantized per layer in the
  forward (and again in the backward pass); ``QuantConfig(loftq_iters=T)`` initialises the
  adapters by LoftQ, ``reparam.pissa`` gives QPiSSA (the residual is quantized).
* :func:`quantize_base` on a model or a parameter tree (inference, or a tree for the functional
  path: ``reparam.apply(dequantize_base(qparams), adapters)``; ``reparam.merge`` likewise merges
  into the dequantized float base, never into the codes).
* :func:`loftq` on a parameter tree and its LoRA/DoRA adapters.

:func:`save_base` / :func:`load_base` write and read the quantized base (safetensors plus a JSON
description, atomically, next to the adapter files of :func:`~lowrank_jax.reparam.save`).

Reference: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023.
https://arxiv.org/abs/2305.14314
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import flax as st_flax
from safetensors import safe_open

from lowrank_jax.reparam import io, quant
from lowrank_jax.reparam.core import Adapters
from lowrank_jax.reparam.nnx import _LAYERS, Adapted, _kernel_path
from lowrank_jax.reparam.quantized_base import (
    QuantConfig,
    QuantizedKernel,
    as_config,
    loftq_sites,
)
from lowrank_jax.reparam.wrapper import _check_patterns, _is_weight, _patterns
from lowrank_jax.targets import MatrixDims, Targets, path_str, resolve, resolve_dims

__all__ = ["dequantize_base", "load_base", "loftq", "quantize_base", "save_base"]

FORMAT = "lowrank_jax.quantized_base"
TENSORS = "quantized_base.safetensors"
CONFIG = "quantized_base.json"
_ARRAYS = ("codes", "scales", "scale_absmax", "offset")
_STATIC = ("format", "shape", "dtype", "block_size", "scale_block_size", "perm")


def _is_quantized(x: Any) -> bool:
    return isinstance(x, quant.QuantizedTensor)


def _layers(model: Any) -> dict[str, tuple[Any, MatrixDims]]:
    """``{kernel path: (Linear/Einsum layer, dims)}``; an adapted base under its site's path."""
    adapted = {id(n.base): n for _, n in nnx.iter_graph(model) if isinstance(n, Adapted)}
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, _LAYERS):
            owner = adapted.get(id(node))
            if owner is not None:
                out[owner.site.path] = (node, owner.site.dims)
            else:
                out[_kernel_path(path)] = (node, MatrixDims())
    return out


def _select(leaves: dict[str, Any], targets: Targets, dims: Any) -> dict[str, MatrixDims]:
    """``{path: dims}`` of the leaves ``targets`` selects (a regex: float matrices, no biases)."""
    patterns = _patterns(targets)
    if patterns is not None:
        _check_patterns(patterns, leaves, "quantize_base targets")
        compiled = [re.compile(p) for p in patterns]
        targets = lambda path, leaf: _is_weight(path, leaf) and any(
            c.search(path) for c in compiled
        )
    mask = resolve(targets, leaves, method="quantize_base")
    all_dims = resolve_dims(dims, leaves)
    return {path: all_dims[path] or MatrixDims() for path in leaves if mask[path]}


def quantize_base(
    target: Any,
    config: str | QuantConfig = "nf4",
    *,
    targets: Targets | Adapters = None,
    dims: Any = None,
) -> Any:
    """Stores the selected base kernels block-quantized.

    Args:
      target: an NNX module (changed in place: each selected ``Linear``/``Einsum`` kernel becomes
        a :class:`~lowrank_jax.reparam.QuantizedKernel`) or a parameter tree (a new tree is
        returned with :class:`~lowrank_jax.reparam.quant.QuantizedTensor` leaves).
      config: ``"nf4"``, ``"int8"`` or a :class:`~lowrank_jax.reparam.QuantConfig`.
      targets: an :class:`~lowrank_jax.reparam.Adapters` (its sites), or the usual targets
        (regex, callable, bool tree, ``None``). ``None`` selects the adapted layers' bases of a
        wrapped model, else every float matrix that is not an embedding, head, norm or bias.
      dims: :class:`~lowrank_jax.MatrixDims` of the selected tree leaves (default ``(-2, -1)``:
        blocks run along the in axis, as bitsandbytes' on a PyTorch weight).

    Returns:
      The model, or the quantized tree.

    Raises:
      ValueError: a bad format or block size (naming the leaf and the fix), a target that
        selects nothing, or ``loftq_iters > 0`` (LoftQ needs adapters: :func:`loftq`).

    Example:
      >>> import jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"q_proj": {"kernel": jnp.ones((64, 32))}, "norm": {"scale": jnp.ones(32)}}
      >>> q = reparam.quantize_base(params, "nf4")
      >>> q["q_proj"]["kernel"].codes.shape, q["norm"]["scale"].shape
      ((1024,), (32,))
    """
    config = as_config(config)
    if config.loftq_iters:
        raise ValueError(
            "quantize_base: loftq_iters > 0 also initialises adapters; use reparam.loftq(params, "
            "adapters, ...) or reparam.wrap(model, rp, quantize_base=QuantConfig(loftq_iters=T))."
        )
    if isinstance(target, nnx.Module):
        layers = _layers(target)
        adapted = [n for _, n in nnx.iter_graph(target) if isinstance(n, Adapted)]
        if isinstance(targets, Adapters):
            chosen = {s.path: s.dims for s in targets.sites}
        elif targets is None and adapted:
            chosen = {n.site.path: n.site.dims for n in adapted}
        else:
            kernels = {p: _kernel_value(layer.kernel) for p, (layer, _) in layers.items()}
            chosen = _select(kernels, targets, dims)
        for path, site_dims in chosen.items():
            if path not in layers:
                raise ValueError(
                    f"quantize_base: no Linear/Einsum layer of the model has kernel '{path}' "
                    f"(kernels: {sorted(layers)[:20]})."
                )
            layer = layers[path][0]
            if isinstance(layer.kernel, QuantizedKernel):
                raise ValueError(f"quantize_base: leaf '{path}' is already quantized.")
            layer.kernel = QuantizedKernel(config.quantize(path, layer.kernel[...], site_dims))
        return target
    leaves = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    if isinstance(targets, Adapters):
        chosen = {s.path: s.dims for s in targets.sites}
    else:
        chosen = _select(leaves, targets, dims)
    stored = {p: config.quantize(p, leaves[p], d) for p, d in chosen.items()}
    return jax.tree_util.tree_map_with_path(lambda kp, x: stored.get(path_str(kp), x), target)


def _kernel_value(kernel: Any) -> Any:
    """A float kernel, or a stand-in of a quantized one's shape and dtype (for targeting)."""
    value = kernel.get_value()
    if _is_quantized(value):
        return jax.ShapeDtypeStruct(value.shape, np.dtype(value.dtype))
    return value


def dequantize_base(target: Any, dtype: Any = None) -> Any:
    """The float base: every quantized kernel of a model (in place, back to ``nnx.Param``) or
    every :class:`~lowrank_jax.reparam.quant.QuantizedTensor` leaf of a tree, dequantized.

    Args:
      target: an NNX module or a tree from :func:`quantize_base` / :func:`loftq`.
      dtype: the result dtype (default: each kernel's original dtype).

    Returns:
      The model or a float tree (for ``reparam.apply`` / ``reparam.merge``).
    """
    if isinstance(target, nnx.Module):
        for layer, _ in _layers(target).values():
            if isinstance(layer.kernel, QuantizedKernel):
                layer.kernel = nnx.Param(quant.dequantize(layer.kernel.get_value(), dtype))
        return target
    return jax.tree.map(
        lambda x: quant.dequantize(x, dtype) if _is_quantized(x) else x,
        target,
        is_leaf=_is_quantized,
    )


def loftq(
    params: Any, adapters: Adapters, config: str | QuantConfig = "nf4", *, iters: int = 1
) -> tuple[Any, Adapters]:
    r"""LoftQ on a parameter tree: the quantized base and LoRA/DoRA factors fitted to its error.

    Per site, ``T = iters`` alternations of ``Q = quant(W - sAB)`` and ``sAB = `` the best
    rank-``r`` approximation of ``W - dequant(Q)`` (:mod:`~lowrank_jax.reparam.loftq_init`); DoRA's
    magnitude becomes ``‖dequant(Q) + sAB‖_c``, so the adapted model starts at
    ``dequant(Q) + sAB ≈ W``.

    Args:
      params: the float base parameters.
      adapters: LoRA or DoRA adapters of ``params`` (``init`` ``"kaiming"`` or ``"gaussian"``;
        their factors are replaced).
      config: the storage format (``"nf4"``, ``"int8"`` or a :class:`QuantConfig`).
      iters: ``T >= 1`` (``1`` is ZeroQuant-V2's low-rank compensation).

    Returns:
      ``(qparams, adapters)``: the tree with quantized sites, and the new adapters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax import reparam
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 64))}
      >>> _, adapters = reparam.lora(rank=8).init(jax.random.key(1), params)
      >>> qparams, adapters = reparam.loftq(params, adapters, "nf4", iters=2)
      >>> approx = reparam.apply(reparam.dequantize_base(qparams), adapters)["w"]
      >>> plain = reparam.dequantize_base(reparam.quantize_base(params, "nf4"))["w"]
      >>> bool(jnp.linalg.norm(approx - params["w"]) < jnp.linalg.norm(plain - params["w"]))
      True

    Reference: Li et al., ICLR 2024, https://arxiv.org/abs/2310.08659.
    """
    config = dataclasses.replace(as_config(config), loftq_iters=iters)
    leaves = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    stored, adapters = loftq_sites(leaves, adapters, config)
    qparams = jax.tree_util.tree_map_with_path(lambda kp, x: stored.get(path_str(kp), x), params)
    return qparams, adapters


def _stored(target: Any) -> dict[str, quant.QuantizedTensor]:
    if isinstance(target, nnx.Module):
        return {
            path: layer.kernel.get_value()
            for path, (layer, _) in sorted(_layers(target).items())
            if isinstance(layer.kernel, QuantizedKernel)
        }
    return {path: x for path, x in _flat(target) if _is_quantized(x)}


def save_base(path: str, target: Any) -> None:
    """Writes the quantized kernels of a model or tree to the directory ``path``.

    ``quantized_base.safetensors`` holds the arrays (``<leaf path>::codes`` ...),
    ``quantized_base.json`` the format of each leaf and the tensor file's SHA-256; both are
    replaced atomically (the JSON last), beside any adapter files.

    Example:
      >>> import jax.numpy as jnp, tempfile
      >>> from lowrank_jax import reparam
      >>> q = reparam.quantize_base({"w": jnp.ones((64, 64))}, "nf4")
      >>> folder = tempfile.mkdtemp()
      >>> reparam.save_base(folder, q)
      >>> reparam.load_base(folder)["w"].format
      'nf4'
    """
    stored = _stored(target)
    if not stored:
        raise ValueError("save_base: nothing is quantized; call quantize_base or wrap first.")
    tensors, leaves = {}, []
    for leaf_path, q in stored.items():
        arrays = [name for name in _ARRAYS if getattr(q, name) is not None]
        tensors.update({f"{leaf_path}::{name}": getattr(q, name) for name in arrays})
        leaves.append({"path": leaf_path, "arrays": arrays,
                       **{name: getattr(q, name) for name in _STATIC}})
    blob = st_flax.save(tensors, metadata={"format": FORMAT})
    config = {"format": FORMAT, "version": 1, "tensors_sha256": hashlib.sha256(blob).hexdigest(),
              "leaves": leaves}
    os.makedirs(path, exist_ok=True)
    io.write_atomic(os.path.join(path, TENSORS), blob)
    io.write_atomic(os.path.join(path, CONFIG), json.dumps(config, indent=2).encode())


def load_base(path: str, target: Any = None) -> Any:
    """Reads :func:`save_base`'s files; installs them into ``target`` when given.

    Args:
      path: the directory.
      target: ``None`` (return ``{leaf path: QuantizedTensor}``), an NNX module (its layers get
        the stored kernels, in place) or a tree (returned with the stored leaves).

    Returns:
      The dict, the module or the tree.

    Raises:
      ValueError: missing or mismatched files, or a leaf that ``target`` lacks or has with
        another shape (the base was saved for a different model).
    """
    config_file, tensor_file = os.path.join(path, CONFIG), os.path.join(path, TENSORS)
    if not (os.path.isfile(config_file) and os.path.isfile(tensor_file)):
        raise ValueError(f"no quantized base at '{path}': expected {CONFIG} and {TENSORS} there.")
    with open(config_file) as f:
        config = json.load(f)
    with open(tensor_file, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != config.get("tensors_sha256"):
            raise ValueError(
                f"quantized base at '{path}': {TENSORS} does not match {CONFIG} (an interrupted "
                f"save or files from two saves); save it again."
            )
    stored = {}
    with safe_open(tensor_file, framework="flax") as f:
        for leaf in config["leaves"]:
            arrays = {n: (f.get_tensor(f"{leaf['path']}::{n}") if n in leaf["arrays"] else None)
                      for n in _ARRAYS}
            static = {n: tuple(leaf[n]) if isinstance(leaf[n], list) else leaf[n] for n in _STATIC}
            stored[leaf["path"]] = quant.QuantizedTensor(**arrays, **static)
    if target is None:
        return stored
    if isinstance(target, nnx.Module):
        layers = _layers(target)
        for leaf_path, q in stored.items():
            layer = layers.get(leaf_path, (None,))[0]
            _check_fits(path, leaf_path, q, None if layer is None else layer.kernel.get_value())
            layer.kernel = QuantizedKernel(q)
        return target
    leaves = dict(_flat(target))
    for leaf_path, q in stored.items():
        _check_fits(path, leaf_path, q, leaves.get(leaf_path))
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: stored.get(path_str(kp), x), target, is_leaf=_is_quantized
    )


def _flat(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs, quantized tensors as leaves."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_quantized)[0]
    return [(path_str(kp), x) for kp, x in flat]


def _check_fits(folder: str, leaf_path: str, q: quant.QuantizedTensor, found: Any) -> None:
    if found is None or tuple(np.shape(found)) != q.shape:
        have = "no such leaf" if found is None else f"shape {tuple(np.shape(found))}"
        raise ValueError(
            f"the quantized base at '{folder}' was saved for a different model: leaf "
            f"'{leaf_path}' has shape {q.shape} there, the target has {have}."
        )
