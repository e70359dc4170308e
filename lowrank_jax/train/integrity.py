"""Integrity records of a checkpoint: a checksum per saved array, a CRC-32 per written file.

:func:`tree_checksums` summarises every array of a pytree in 64 bits, computed on the devices
with integer arithmetic (order-free, so the same on any mesh and in every process); the
:class:`~lowrank_jax.train.checkpoint.Checkpointer` saves them with the arrays and compares
after a restore. :func:`write_file_listing` records the size and CRC-32 of every file of a
written step in ``files.json``; :func:`verify_file_listing` names the first file that is
missing, truncated or altered, before orbax reads it.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FILES", "tree_checksums", "verify_file_listing", "write_file_listing"]

FILES = "files.json"


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as ``uint32`` words (one per element for ≤ 32-bit dtypes)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """``[Σ w_i, Σ (2i+1) w_i]`` mod 2³² over the words ``w_i`` in row-major order ``i``.

    Integer sums are exact and order-free, so the value is the same whatever the sharding;
    any single flipped bit changes the first sum, swapped elements change the second.
    """
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    for axis, n in enumerate(words.shape):
        index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
    weighted = words * (2 * index + 1)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32)])


@jax.jit
def _checksums(leaves: list) -> list:
    return [_leaf_checksum(x) for x in leaves]


def _leaf_path(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_checksums(tree: Any) -> dict[str, str]:
    """``{leaf path: 16 hex digits}``: a checksum of every array of ``tree`` (see
    :func:`_leaf_checksum`), the same on any mesh and in every process.

    Example:
      >>> tree_checksums({"w": jnp.zeros(3)})
      {'w': '0000000000000000'}
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = _checksums([jnp.asarray(x) for _, x in flat])
    return {
        _leaf_path(path): "".join(f"{int(v):08x}" for v in np.asarray(s.addressable_data(0)))
        for (path, _), s in zip(flat, sums)
    }


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(root: str) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(folder, n), root) for n in names]
    return sorted(f for f in found if f != FILES)


def write_file_listing(root: str) -> None:
    """Writes ``root/files.json``: ``{relative path: [size, crc32]}`` of every file under
    ``root`` (atomically: a temporary file, then a rename)."""
    listing = {}
    for name in _files(root):
        full = os.path.join(root, name)
        listing[name] = [os.path.getsize(full), _crc32(full)]
    tmp = os.path.join(root, f"{FILES}.tmp")
    with open(tmp, "w") as f:
        json.dump(listing, f)
    os.replace(tmp, os.path.join(root, FILES))


def verify_file_listing(root: str) -> str | None:
    """The first problem with the files under ``root`` against its ``files.json``, or ``None``
    (also when there is no listing: a step saved by a process killed before writing it).

    Example:
      >>> import tempfile
      >>> root = tempfile.mkdtemp()
      >>> _ = open(os.path.join(root, "a"), "w").write("data")
      >>> write_file_listing(root)
      >>> verify_file_listing(root) is None
      True
      >>> _ = open(os.path.join(root, "a"), "w").write("dat")
      >>> verify_file_listing(root).endswith("has 3 bytes, 4 were written")
      True
    """
    listing_path = os.path.join(root, FILES)
    if not os.path.exists(listing_path):
        return None
    try:
        with open(listing_path) as f:
            listing = json.load(f)
        entries = sorted((str(k), int(v[0]), int(v[1])) for k, v in listing.items())
    except (OSError, ValueError, TypeError, AttributeError, IndexError):
        return f"{listing_path} is unreadable"
    for name, size, crc in entries:
        full = os.path.join(root, name)
        if not os.path.isfile(full):
            return f"{full} is missing"
        actual = os.path.getsize(full)
        if actual != size:
            return f"{full} has {actual} bytes, {size} were written"
        if _crc32(full) != crc:
            return f"{full} fails its CRC-32 check (altered since it was written)"
    return None
