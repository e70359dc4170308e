"""Where text comes from: the embedded corpus, local text files, or a TFDS dataset.

Every source returns a list of documents (strings) in a fixed order, so the token stream and
the train/validation split built from them are deterministic. ``resolve_source`` maps the CLI's
``--data`` value to one of them:

* ``None``, ``"kjv"`` or ``"embedded"``: the King James Bible shipped in the package
  (``lowrank_jax/data/corpus/README.md`` records its provenance and licence);
* ``"tfds:NAME[:SPLIT]"``, e.g. ``tfds:tiny_shakespeare`` or ``tfds:lm1b:train[:1%]``: a
  TensorFlow Datasets text dataset (the ``data`` extra; read with ``tfds.data_source``, no
  TensorFlow needed; the dataset must be prepared or downloadable by TFDS);
* anything else: a file, a directory (its ``*.txt`` files, recursively) or a glob pattern
  (``'corpus/**/*.py'`` reads other extensions).

Files must be UTF-8 text: a file with a NUL byte (binary data) or invalid UTF-8 is refused with
its path, never trained on.
"""

from __future__ import annotations

import glob
import lzma
import os
from importlib import resources

__all__ = ["DataError", "embedded_corpus", "file_documents", "resolve_source", "tfds_documents"]

EMBEDDED_NAMES = ("kjv", "embedded")
#: what a ``--data`` directory contributes (a glob reads anything)
DIRECTORY_EXTENSIONS = (".txt",)


class DataError(ValueError):
    """The data cannot be used as asked: a missing path, an empty corpus, too few tokens..."""


def embedded_corpus() -> str:
    """The embedded corpus: the King James Bible, one verse per line (4.4 MB of ASCII)."""
    blob = resources.files("lowrank_jax.data").joinpath("corpus", "kjv.txt.xz").read_bytes()
    return lzma.decompress(blob).decode("ascii")


def file_documents(pattern: str) -> list[str]:
    """The text of every file that ``pattern`` names (a file, a directory or a glob), sorted.

    A directory contributes its ``*.txt`` files (:data:`DIRECTORY_EXTENSIONS`, recursively);
    a glob any file it matches.

    Raises:
      DataError: nothing matches (a directory without text files says which extensions are
        read), or a file is binary (a NUL byte) or not UTF-8.
    """
    if os.path.isdir(pattern):
        paths = sorted(
            path
            for ext in DIRECTORY_EXTENSIONS
            for path in glob.glob(os.path.join(pattern, "**", f"*{ext}"), recursive=True)
            if os.path.isfile(path)
        )
        if not paths:
            reads = ", ".join(f"*{ext}" for ext in DIRECTORY_EXTENSIONS)
            raise DataError(
                f"--data {pattern!r}: the directory has no {reads} files (a directory is read "
                f"for those, recursively); give a glob for other files, e.g. "
                f"'{os.path.join(pattern, '**', '*.py')}'"
            )
    elif os.path.isfile(pattern):
        paths = [pattern]
    else:
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"--data {pattern!r}: no such file, directory or matching files")
    return [_read_text(path) for path in paths]


def _read_text(path: str) -> str:
    """``path`` as UTF-8 text; binary data and invalid UTF-8 are refused."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"--data: {path} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(
            f"--data: {path} is not a text file (a NUL byte at offset {nul}: binary data); "
            "remove it or narrow --data to text files"
        )
    return text


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
