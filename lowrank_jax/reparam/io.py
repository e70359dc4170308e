"""Saving and loading adapters: ``adapter_model.safetensors`` plus ``adapter_config.json``.

The JSON config records, per site, the leaf path, the method and its fields, the matrix dims and
the base leaf's shape and dtype, so :func:`load` rebuilds the :class:`Adapters` on its own and
refuses a base model that does not fit. Each file is written to a temporary file, flushed and
``os.replace``-d (atomic on POSIX); the config is written last and holds the SHA-256 of the
tensor file, so a reader never sees a half-written file and detects a tensor file that does not
belong to the config (a crash between the two renames).

Seeded methods (VeRA, NOLA) store their 8-byte key data, never their random bases.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import flax as st_flax
from safetensors import safe_open

from lowrank_jax.reparam.core import Adapters, Site, _contributions
from lowrank_jax.reparam.method import method_class
from lowrank_jax.targets import MatrixDims

__all__ = ["load", "save", "write_atomic"]

FORMAT = "lowrank_jax.reparam"
VERSION = 1
TENSORS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def write_atomic(target: str, data: bytes) -> None:
    """Writes ``data`` to ``target`` through a temporary file and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(target))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path: str, what: str) -> dict:
    """The JSON object in ``path``; a missing, unreadable or cut-short file is one
    ``ValueError`` naming the file and where it breaks.

    Args:
      path: the file.
      what: how to fix it, for the message (e.g. ``"save the adapter again"``).
    """
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"'{path}' does not exist; {what}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f"line {err.lineno} column {err.colno}: " if hasattr(err, "lineno") else ""
        reason = err.msg if hasattr(err, "msg") else err.reason
        raise ValueError(
            f"'{path}' is not valid JSON ({where}{reason}; truncated or corrupt?); {what}."
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"'{path}' holds a JSON {type(config).__name__}, not an object; {what}.")
    return config


def _key(group: str, path: str, name: str) -> str:
    return f"{group}::{path}::{name}"


def method_to_json(method: Any) -> dict:
    return {"name": type(method).__name__, "fields": dataclasses.asdict(method)}


def method_from_json(spec: dict) -> Any:
    cls = method_class(spec["name"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["fields"].items()}
    return cls(**fields)


def save(path: str, adapters: Adapters) -> None:
    """Writes ``adapters`` to the directory ``path`` (created if needed).

    Args:
      path: a directory; its ``adapter_model.safetensors`` and ``adapter_config.json`` are
        replaced atomically.
      adapters: what ``Reparam.init`` returned (trained or not).

    Example:
      >>> import jax, jax.numpy as jnp, tempfile
      >>> from lowrank_jax import reparam
      >>> params = {"w": jnp.ones((8, 4))}
      >>> _, adapters = reparam.lora(rank=2).init(jax.random.key(0), params)
      >>> folder = tempfile.mkdtemp()
      >>> reparam.save(folder, adapters)
      >>> reparam.load(folder, params).paths
      ('w',)
    """
    tensors = {}
    for group in ("trainable", "frozen"):
        for site_path, arrays in getattr(adapters, group).items():
            for name, arr in arrays.items():
                tensors[_key(group, site_path, name)] = jnp.asarray(arr)
    blob = st_flax.save(tensors, metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "version": VERSION,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "sites": [
            {
                "path": s.path,
                "method": method_to_json(s.method),
                "dims": [s.dims.in_axis, s.dims.out_axis],
                "shape": list(s.shape),
                "dtype": s.dtype,
            }
            for s in adapters.sites
        ],
    }
    os.makedirs(path, exist_ok=True)
    write_atomic(os.path.join(path, TENSORS), blob)
    write_atomic(os.path.join(path, CONFIG), json.dumps(config, indent=2).encode())


def load(path: str, params: Any = None) -> Adapters:
    """Reads adapters written by :func:`save`.

    Args:
      path: the directory given to :func:`save`.
      params: optional base parameters; every site must exist there with the recorded shape
        (a clear ``ValueError`` otherwise: the adapter was saved for a different model).

    Returns:
      The :class:`Adapters`, arrays on the default device.
    """
    config_file, tensor_file = os.path.join(path, CONFIG), os.path.join(path, TENSORS)
    if not (os.path.isfile(config_file) and os.path.isfile(tensor_file)):
        raise ValueError(f"no adapter at '{path}': expected {CONFIG} and {TENSORS} there.")
    config = read_json(config_file, "save the adapter again")
    if config.get("format") != FORMAT:
        hint = " (a PEFT adapter: use reparam.from_peft)" if "peft_type" in config else ""
        raise ValueError(f"'{config_file}' is not a lowrank_jax adapter config{hint}.")
    with open(tensor_file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != config["tensors_sha256"]:
        raise ValueError(
            f"adapter at '{path}': {TENSORS} does not match {CONFIG} (an interrupted save or "
            f"files from two different saves); save the adapter again."
        )
    sites = tuple(
        Site(
            s["path"],
            method_from_json(s["method"]),
            MatrixDims(*s["dims"]),
            tuple(s["shape"]),
            s["dtype"],
        )
        for s in config["sites"]
    )
    groups: dict[str, dict] = {"trainable": {s.path: {} for s in sites}}
    groups["frozen"] = {s.path: {} for s in sites}
    with safe_open(tensor_file, framework="flax") as f:
        for key in f.keys():
            group, site_path, name = key.split("::")
            groups[group][site_path][name] = jax.device_put(np.asarray(f.get_tensor(key)))
    adapters = Adapters(groups["trainable"], groups["frozen"], sites)
    if params is not None:
        try:
            _contributions(params, [(adapters, 1.0)])
        except ValueError as err:
            raise ValueError(
                f"the adapter at '{path}' was saved for a different model: {err}"
            ) from err
    return adapters
