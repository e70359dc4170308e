"""PEFT interop: LoRA and DoRA adapters in PEFT's ``adapter_config.json`` + safetensors layout.

PEFT stores, per module ``m`` (PyTorch ``(out, in)`` weights):
``base_model.model.<m>.lora_A.weight (r, in) = Aᵀ``, ``...lora_B.weight (out, r) = Bᵀ`` and, for
DoRA, ``...lora_magnitude_vector (out,)``. Module names come from leaf paths through
``module_name(path, index)`` -- by default the path without its last key, ``/`` -> ``.``
(``layers/0/q_proj/kernel`` -> ``layers.0.q_proj``). Kernels with batch axes (scan-stacked
``[L, in, out]``) export one module per matrix: give ``module_name`` that uses ``index``.

Only plain factors are exportable: residual inits (PiSSA, OLoRA, LoRA-GA) adapt a modified
base, so convert them with :func:`~lowrank_jax.reparam.to_base_lora` first, as PEFT requires.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import flax as st_flax
from safetensors import safe_open

from lowrank_jax.reparam.core import Adapters, Site, _contributions
from lowrank_jax.reparam.dora import DoRA
from lowrank_jax.reparam.io import read_json, write_atomic
from lowrank_jax.reparam.lora import _RESIDUAL, LoRA, _init_name
from lowrank_jax.targets import MatrixDims, path_str

__all__ = ["default_module_name", "from_peft", "to_peft"]

ModuleName = Callable[[str, tuple], str]
_PREFIX = "base_model.model."
_KEY = re.compile(
    rf"{re.escape(_PREFIX)}(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)"
)


def default_module_name(path: str, index: tuple = ()) -> str:
    """``layers/0/q_proj/kernel`` -> ``layers.0.q_proj`` (2-D kernels only)."""
    if index:
        raise ValueError(
            f"leaf '{path}' has batch axes; pass module_name=lambda path, index: ... naming the "
            f"PEFT module of each matrix (index is its position along the batch axes)."
        )
    return ".".join(path.split("/")[:-1])


def _batches(shape: tuple) -> list[tuple]:
    return list(np.ndindex(*shape)) if shape else [()]


def _common(values: list) -> Any:
    return max(set(values), key=values.count)


def _pattern(values: dict, default: Any) -> dict:
    # PEFT reads the keys as regexes matched against a suffix of the module name; escaped full
    # names, longest first, select exactly one module each.
    rows = sorted(((n, v) for n, v in values.items() if v != default), key=lambda e: -len(e[0]))
    return {re.escape(n): v for n, v in rows}


def to_peft(
    path: str,
    adapters: Adapters,
    *,
    module_name: ModuleName = default_module_name,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes LoRA or DoRA ``adapters`` as a PEFT adapter directory (``PeftModel.from_pretrained``).

    Args:
      path: output directory (files replaced atomically).
      adapters: LoRA/DoRA adapters, one method type, no residual init.
      module_name: ``(leaf_path, batch_index) -> PEFT module name``.
      base_model_name_or_path: recorded in the config.

    Example:
      >>> import jax, jax.numpy as jnp, tempfile
      >>> from lowrank_jax import reparam
      >>> params = {"q_proj": {"kernel": jnp.ones((6, 4))}}
      >>> _, adapters = reparam.lora(rank=2).init(jax.random.key(0), params)
      >>> folder = tempfile.mkdtemp()
      >>> reparam.to_peft(folder, adapters)  # keys base_model.model.q_proj.lora_A.weight, ...
      >>> reparam.from_peft(folder, params).paths
      ('q_proj/kernel',)
    """
    methods = {type(s.method) for s in adapters.sites}
    if not methods <= {LoRA, DoRA} or len(methods) != 1:
        raise ValueError(f"to_peft exports LoRA or DoRA adapters (one kind); got {methods}.")
    tensors, ranks, alphas, targets = {}, {}, {}, []
    for site in adapters.sites:
        m = site.method
        if _init_name(m.init_weights) in _RESIDUAL:
            raise ValueError(
                f"leaf '{site.path}' uses init={m.init_weights!r}, which changes the base weights; "
                f"export reparam.to_base_lora(adapters, initial_adapters) instead."
            )
        a, b = m._ab(adapters.frozen[site.path], adapters.trainable[site.path])
        mag = adapters.trainable[site.path].get("magnitude")
        for index in _batches(a.shape[:-2]):
            name = module_name(site.path, index)
            key = f"{_PREFIX}{name}"
            tensors[f"{key}.lora_A.weight"] = jnp.asarray(a[index]).T
            tensors[f"{key}.lora_B.weight"] = jnp.asarray(b[index]).T
            if mag is not None:
                tensors[f"{key}.lora_magnitude_vector"] = jnp.asarray(mag[index])
            ranks[name], alphas[name] = m.rank, m.alpha
            targets.append(name)
    first = adapters.sites[0].method
    r, alpha = _common(list(ranks.values())), _common(list(alphas.values()))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout,
        "use_rslora": first.rslora,
        "use_dora": isinstance(first, DoRA),
        "target_modules": sorted(set(targets)),
        "rank_pattern": _pattern(ranks, r),
        "alpha_pattern": _pattern(alphas, alpha),
        "fan_in_fan_out": False,
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    os.makedirs(path, exist_ok=True)
    write_atomic(os.path.join(path, "adapter_model.safetensors"), st_flax.save(tensors))
    write_atomic(os.path.join(path, "adapter_config.json"), json.dumps(config, indent=2).encode())


def _pattern_value(table: dict, name: str, default: Any) -> Any:
    for key, value in table.items():  # PEFT's get_pattern_key: the key matches a suffix
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def from_peft(
    path: str,
    params: Any,
    *,
    module_name: ModuleName = default_module_name,
    dims: Any = None,
) -> Adapters:
    """Reads a PEFT LoRA/DoRA adapter directory into :class:`Adapters` for ``params``.

    Args:
      path: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the JAX base parameters the adapter is for.
      module_name: as for :func:`to_peft`; maps each candidate leaf (float, ≥2-D) to a module.
      dims: :class:`~lowrank_jax.MatrixDims` of the kernels (default Flax ``(in, out)``).

    Returns:
      Adapters whose sites are the leaves named by the file; a module that matches no leaf, or
      a shape that does not fit, is a ``ValueError``.
    """
    config = read_json(
        os.path.join(path, "adapter_config.json"), "export the adapter again with PEFT"
    )
    if config.get("peft_type") != "LORA":
        kind = config.get("peft_type")
        raise ValueError(f"'{path}' is a {kind} adapter; only LORA (and DoRA) is supported.")
    dims = dims or MatrixDims()
    owners: dict[str, tuple[str, tuple]] = {}
    leaves, unnamed = {}, []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = path_str(kp)
        if np.ndim(leaf) < 2 or not jnp.issubdtype(np.dtype(leaf.dtype), jnp.floating):
            continue
        d = dims.normalize(np.ndim(leaf), p)
        batch = [n for a, n in enumerate(np.shape(leaf)) if a not in d]
        leaves[p] = (leaf, d)
        try:
            named = {module_name(p, index): (p, index) for index in _batches(tuple(batch))}
        except ValueError:  # a leaf module_name cannot name (a stacked kernel by default)
            unnamed.append(p)
            continue
        owners.update(named)
    found: dict[str, dict] = {}
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="flax") as f:
        for key in f.keys():
            match = _KEY.fullmatch(key)
            if match is None:
                raise ValueError(f"unsupported tensor {key!r} in the PEFT adapter at '{path}'.")
            name, part = match.groups()
            if name not in owners:
                hint = f" Leaves module_name could not name: {unnamed[:5]}." if unnamed else ""
                raise ValueError(
                    f"PEFT module {name!r} matches no leaf of params (module_name maps leaf paths "
                    f"to names like {sorted(owners)[:5]}); the adapter is for a different model."
                    + hint
                )
            found.setdefault(name, {})[part.split(".")[0]] = np.asarray(f.get_tensor(key))
    by_leaf: dict[str, dict] = {}
    for name, parts in found.items():
        leaf_path, index = owners[name]
        by_leaf.setdefault(leaf_path, {})[index] = (name, parts)
    cls = DoRA if config.get("use_dora") else LoRA
    trainable, sites = {}, []
    for leaf_path, per_index in sorted(by_leaf.items()):
        leaf, d = leaves[leaf_path]
        batch = tuple(n for a, n in enumerate(np.shape(leaf)) if a not in d)
        if len(per_index) != len(_batches(batch)):
            raise ValueError(f"the PEFT adapter covers only part of stacked leaf '{leaf_path}'.")
        order = _batches(batch)
        names = [per_index[i][0] for i in order]

        def stack(part: str, order=order, per_index=per_index, batch=batch) -> np.ndarray:
            rows = [per_index[i][1][part] for i in order]
            return np.stack(rows).reshape(*batch, *rows[0].shape)

        arrays = {
            "A": np.swapaxes(stack("lora_A"), -1, -2),
            "B": np.swapaxes(stack("lora_B"), -1, -2),
        }
        if cls is DoRA:
            arrays["magnitude"] = stack("lora_magnitude_vector")
        rank = _pattern_value(config.get("rank_pattern") or {}, names[0], config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, names[0], config["lora_alpha"])
        method = cls(
            rank=int(rank),
            alpha=float(alpha),
            rslora=bool(config.get("use_rslora", False)),
            dropout=float(config.get("lora_dropout", 0.0)),
        )
        shape = tuple(np.shape(leaf))
        site = Site(leaf_path, method, d, shape, np.dtype(leaf.dtype).name)
        if arrays["A"].shape != (*batch, shape[d.in_axis], rank):
            raise ValueError(
                f"PEFT module {names[0]!r}: lora_A has shape {arrays['A'].shape[-2:][::-1]}, "
                f"but leaf '{leaf_path}' needs (r={rank}, in={shape[d.in_axis]})."
            )
        trainable[leaf_path] = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
        sites.append(site)
    adapters = Adapters(trainable, {s.path: {} for s in sites}, tuple(sites))
    _contributions(params, [(adapters, 1.0)])
    return adapters
