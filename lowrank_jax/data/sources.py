"""Where text comes from: the embedded corpus, local text files, or a TFDS dataset.

Every source returns a list of documents (strings) in a fixed order, so the token stream and
the train/validation split built from them are deterministic. ``resolve_source`` maps the CLI's
``--data`` value to one of them:

* ``None``, ``"kjv"`` or ``"embedded"``: the King James Bible shipped in the package
  (``lowrank_jax/data/corpus/README.md`` records its provenance and licence);
* ``"tfds:NAME[:SPLIT]"``, e.g. ``tfds:tiny_shakespeare`` or ``tfds:lm1b:train[:1%]``: a
  TensorFlow Datasets text dataset (the ``data`` extra; read with ``tfds.data_source``, no
  TensorFlow needed; the dataset must be prepared or downloadable by TFDS);
* anything else: a file, a directory (its ``*.txt`` files) or a glob pattern.
"""

from __future__ import annotations

import glob
import lzma
import os
from importlib import resources

__all__ = ["DataError", "embedded_corpus", "file_documents", "resolve_source", "tfds_documents"]

EMBEDDED_NAMES = ("kjv", "embedded")


class DataError(ValueError):
    """The data cannot be used as asked: a missing path, an empty corpus, too few tokens..."""


def embedded_corpus() -> str:
    """The embedded corpus: the King James Bible, one verse per line (4.4 MB of ASCII)."""
    blob = resources.files("lowrank_jax.data").joinpath("corpus", "kjv.txt.xz").read_bytes()
    return lzma.decompress(blob).decode("ascii")


def file_documents(pattern: str) -> list[str]:
    """The text of every file that ``pattern`` names (a file, a directory or a glob), sorted.

    Raises:
      DataError: nothing matches, or a file is not UTF-8 text.
    """
    if os.path.isdir(pattern):
        paths = sorted(glob.glob(os.path.join(pattern, "**", "*.txt"), recursive=True))
    elif os.path.isfile(pattern):
        paths = [pattern]
    else:
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"--data {pattern!r}: no such file, directory or matching files")
    documents = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                documents.append(f.read())
        except UnicodeDecodeError as err:
            raise DataError(f"--data: {path} is not UTF-8 text ({err.reason})") from None
    return documents


def tfds_documents(
    name: str, split: str = "train", *, text_key: str = "text", data_dir: str | None = None
) -> list[str]:
    """The ``text_key`` feature of every example of a TFDS dataset split, in order.

    Args:
      name: TFDS dataset name (``tiny_shakespeare``, ``lm1b``, ``c4/en``, ...).
      split: TFDS split, slicing allowed (``train[:1%]``).
      text_key: the text feature.
      data_dir: TFDS data directory (default: TFDS's).

    Raises:
      DataError: tensorflow-datasets is not installed, or the dataset has no ``text_key``.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "--data tfds:...: tensorflow-datasets is not installed; pip install 'lowrank_jax[data]'"
        ) from None
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    documents = []
    for i in range(len(source)):
        example = source[i]
        if text_key not in example:
            raise DataError(f"tfds:{name} has no feature {text_key!r}; features: {sorted(example)}")
        text = example[text_key]
        documents.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    return documents


def resolve_source(spec: str | None) -> tuple[str, list[str]]:
    """``(description, documents)`` for a ``--data`` value (see the module docstring).

    Raises:
      DataError: missing path, unreadable file, or an empty corpus.
    """
    if spec is None or spec in EMBEDDED_NAMES:
        name, documents = "embedded King James Bible", [embedded_corpus()]
    elif spec.startswith("tfds:"):
        name_split = spec[len("tfds:") :]
        dataset, _, split = name_split.partition(":")
        name, documents = spec, tfds_documents(dataset, split or "train")
    else:
        name, documents = spec, file_documents(spec)
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise DataError(f"--data {spec!r}: the corpus is empty")
    return name, documents
