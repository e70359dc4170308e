"""Load and save HuggingFace checkpoints (``config.json`` + safetensors) as a :class:`Llama`.

The layout is ``LlamaForCausalLM``'s: ``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``model.layers.{i}.mlp.{gate,up,down}_proj
.weight``, ``model.layers.{i}.{input,post_attention}_layernorm.weight``, ``model.norm.weight`` and
``lm_head.weight`` (PyTorch ``(out, in)`` weights; our kernels are their transposes), plus what
the family adds: ``self_attn.{q,k,v}_proj.bias`` (Qwen2), ``self_attn.{q,k}_norm.weight``
(Qwen3, Gemma 3), ``{pre,post}_feedforward_layernorm.weight`` (Gemma 3). A multimodal Gemma 3
checkpoint (``model_type: gemma3``) loads its language model; the vision tower is skipped.
A single ``model.safetensors`` and sharded ``model.safetensors.index.json`` checkpoints both
load; saving shards when ``max_shard_bytes`` is given.

Everything the config says is honoured (see :mod:`lowrank_jax.models.hf_config`), and a feature
this model does not implement (another activation, dropout, other rope types, quantisation)
raises :class:`UnsupportedCheckpointError` instead of loading something silently different.

Example:
  >>> from lowrank_jax.models import hf
  >>> model = hf.load_hf("path/to/llama")          # doctest: +SKIP
  >>> hf.save_hf(model, "out/", max_shard_bytes=2**30)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.models.hf_config import (
    UnsupportedCheckpointError,
    config_from_hf,
    config_to_hf,
)
from lowrank_jax.models.llama import Llama, LlamaConfig

__all__ = [
    "UnsupportedCheckpointError",
    "config_from_hf",
    "config_to_hf",
    "from_tensors",
    "hf_name_map",
    "layer_weights",
    "load_hf",
    "save_hf",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_LAYER_WEIGHTS = (
    (("attn", "q_proj", "kernel"), "self_attn.q_proj.weight", True),
    (("attn", "k_proj", "kernel"), "self_attn.k_proj.weight", True),
    (("attn", "v_proj", "kernel"), "self_attn.v_proj.weight", True),
    (("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", True),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", True),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", True),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", True),
    (("input_norm", "scale"), "input_layernorm.weight", False),
    (("post_attn_norm", "scale"), "post_attention_layernorm.weight", False),
)


def layer_weights(config: LlamaConfig) -> Iterator[tuple[tuple, str, bool]]:
    """``(our path in a layer, HF name in a layer, transpose)`` of every weight of a layer."""
    yield from _LAYER_WEIGHTS
    biases = [("q", "attn", config.qkv_bias), ("k", "attn", config.qkv_bias)]
    biases += [("v", "attn", config.qkv_bias), ("o", "attn", config.o_bias)]
    biases += [(p, "mlp", config.mlp_bias) for p in ("gate", "up", "down")]
    for proj, block, present in biases:
        if present:
            hf_block = "self_attn" if block == "attn" else "mlp"
            yield (block, f"{proj}_proj", "bias"), f"{hf_block}.{proj}_proj.bias", False
    if config.qk_norm:
        yield ("attn", "q_norm", "scale"), "self_attn.q_norm.weight", False
        yield ("attn", "k_norm", "scale"), "self_attn.k_norm.weight", False
    if config.sandwich_norms:
        yield ("pre_mlp_norm", "scale"), "pre_feedforward_layernorm.weight", False
        yield ("post_mlp_norm", "scale"), "post_feedforward_layernorm.weight", False


def hf_name_map(
    config: LlamaConfig, prefix: str = "model.", head: str = "lm_head.weight"
) -> Iterator[tuple[tuple, int | None, str, bool]]:
    """``(our path, layer index or None, HF tensor name, transpose)`` for every parameter of a
    model of ``config``, in HF's layout (``transpose``: ours is the transposed ``(in, out)``
    kernel). A scanned model's layer paths have no index (the layer axis is stacked).

    Example:
      >>> from lowrank_jax.models import get_config
      >>> names = hf_name_map(get_config("llama_tiny"))
      >>> next(p for p in names if p[0][-2:] == ("q_proj", "kernel"))
      (('layers', 0, 'attn', 'q_proj', 'kernel'), 0, 'model.layers.0.self_attn.q_proj.weight', True)
    """
    yield ("embed", "embedding"), None, f"{prefix}embed_tokens.weight", False
    for i in range(config.num_layers):
        for path, name, transpose in layer_weights(config):
            ours = ("layers",) + path if config.scan_layers else ("layers", i) + path
            yield ours, i, f"{prefix}layers.{i}.{name}", transpose
    yield ("final_norm", "scale"), None, f"{prefix}norm.weight", False
    if not config.tie_embeddings:
        yield ("lm_head", "kernel"), None, head, True


# Where a multimodal Gemma 3 keeps its language model: transformers 5 and 4 layouts.
_MULTIMODAL_PREFIXES = (
    ("model.language_model.", "lm_head.weight"),
    ("language_model.model.", "language_model.lm_head.weight"),
)


def _prefixes(model_type: str, files: dict) -> tuple[str, str, tuple[str, ...]]:
    """``(weight prefix, head name, ignorable name prefixes)`` of a checkpoint's tensors."""
    if model_type == "gemma3":
        for prefix, head in _MULTIMODAL_PREFIXES:
            if f"{prefix}embed_tokens.weight" in files:
                other = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.")
                return prefix, head, other + ("model.multi_modal_projector.",)
    return "model.", "lm_head.weight", ()


def _get(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _open_tensors(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file holding it."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    if not os.path.exists(single):
        raise UnsupportedCheckpointError(
            f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} (PyTorch .bin is not supported)."
        )
    from safetensors import safe_open

    with safe_open(single, framework="flax") as f:
        return {name: single for name in f.keys()}


def load_hf(path: str, **overrides: Any) -> Llama:
    """Loads an HF checkpoint directory of a supported family into a :class:`Llama`.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
      **overrides: :class:`LlamaConfig` fields of ours (``scan_layers``, ``remat``, ``dtype``,
        ``param_dtype``, ...); weights are cast to ``param_dtype`` (default float32).

    Returns:
      The model, its parameters equal to the checkpoint's (transposed to ``(in, out)``).

    Raises:
      UnsupportedCheckpointError: unsupported architecture, missing or mis-shaped tensors.
    """
    from safetensors import safe_open

    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise UnsupportedCheckpointError(f"{path} has no config.json.")
    with open(config_path) as f:
        hf = json.load(f)
    config = config_from_hf(hf, **overrides)
    files = _open_tensors(path)
    prefix, head, ignorable = _prefixes(hf.get("model_type", "llama"), files)
    names = list(hf_name_map(config, prefix, head))
    missing = [name for _, _, name, _ in names if name not in files]
    if missing:
        raise UnsupportedCheckpointError(f"the checkpoint has no tensor {missing[0]!r}.")
    loaded: dict[str, Any] = {}
    for file in sorted({files[name] for _, _, name, _ in names}):
        with safe_open(file, framework="flax") as f:
            loaded.update({n: f.get_tensor(n) for _, _, n, _ in names if files[n] == file})
    wanted = {name for _, _, name, _ in names}
    extra = sorted(
        n
        for n in files
        if n not in wanted
        and not n.endswith(("rotary_emb.inv_freq", head))
        and not n.startswith(ignorable)
    )
    if extra:
        raise UnsupportedCheckpointError(
            f"the checkpoint has tensors this {config.model_type} model does not use: {extra[:5]}"
            + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        )
    return from_tensors(
        config,
        [(ours, layer, loaded[name], transpose, name) for ours, layer, name, transpose in names],
    )


def from_tensors(config: LlamaConfig, tensors: Sequence[tuple]) -> Llama:
    """A :class:`Llama` of ``config`` whose parameters are the given tensors.

    Args:
      config: the architecture.
      tensors: ``(our path, layer index or None, array, transpose, name for messages)`` for
        every parameter, as :func:`hf_name_map` lists them (a scanned model's layer paths have no
        index: the layers are stacked in index order).

    Raises:
      UnsupportedCheckpointError: a tensor's shape differs from the config's.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    params = nnx.to_pure_dict(abstract)
    dtype = jnp.dtype(config.param_dtype)
    stacks: dict[tuple, list] = {}
    for ours, layer, array, transpose, name in tensors:
        value = (array.T if transpose else array).astype(dtype)
        if config.scan_layers and layer is not None:
            stacks.setdefault(ours, []).append((layer, value))
        else:
            _check_shape(name, value, _get(params, ours))
            _set(params, ours, value)
    for ours, values in stacks.items():
        value = jnp.stack([v for _, v in sorted(values, key=lambda lv: lv[0])])
        _check_shape(ours, value, _get(params, ours))
        _set(params, ours, value)
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)


def _check_shape(name: Any, value: Any, target: Any) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise UnsupportedCheckpointError(
            f"tensor {name!r} has shape {tuple(value.shape)} but config.json implies "
            f"{tuple(target.shape)}."
        )


def save_hf(model: Llama, path: str, *, max_shard_bytes: int | None = None) -> list[str]:
    """Saves ``model`` as an HF checkpoint directory of its family (``config.model_type``).

    Args:
      model: a :class:`Llama` (scanned or not).
      path: output directory (created).
      max_shard_bytes: split the weights into ``model-0000k-of-0000n.safetensors`` files of at
        most this size (one tensor may exceed it) with a ``model.safetensors.index.json``;
        ``None`` writes one ``model.safetensors``.

    Returns:
      The safetensors files written.
    """
    from safetensors.flax import save_file

    config = model.config
    hf_config = config_to_hf(config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors: dict[str, jax.Array] = {}
    for ours, layer, name, transpose in hf_name_map(config):
        value = _get(params, ours)
        if config.scan_layers and layer is not None:
            value = value[layer]
        tensors[name] = jnp.asarray(value.T if transpose else value)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    shards = _shard(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1 and max_shard_bytes is None:
        target = os.path.join(path, SINGLE_FILE)
        save_file(shards[0], target, metadata=metadata)
        return [target]
    written, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata=metadata)
        weight_map.update({name: file for name in shard})
        written.append(os.path.join(path, file))
    total = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in tensors.values())
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return written


def _shard(tensors: dict[str, jax.Array], max_bytes: int | None) -> list[dict[str, jax.Array]]:
    if max_bytes is None:
        return [tensors]
    shards: list[dict[str, jax.Array]] = [{}]
    size = 0
    for name, value in tensors.items():
        n_bytes = math.prod(value.shape) * value.dtype.itemsize
        if shards[-1] and size + n_bytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += n_bytes
    return shards
