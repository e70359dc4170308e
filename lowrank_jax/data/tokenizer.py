"""Tokenizers: bytes by default, or a BPE trained locally with HuggingFace ``tokenizers``.

Both map a document to ``int32`` ids and report ``vocab_size`` (which the CLI gives the model)
and the special ids ``pad_id``, ``bos_id``, ``eos_id``. The byte tokenizer needs nothing and
never fails; the BPE (the ``data`` extra) is trained on the run's corpus (all of it: the split is
made after tokenization, so validation text shapes the merges too) and saved
as ``tokenizer.json`` next to the run, so a resumed run uses the same one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from lowrank_jax.data.sources import DataError

__all__ = ["BPETokenizer", "ByteTokenizer", "Tokenizer", "make_tokenizer"]

TOKENIZERS = ("byte", "bpe")


class Tokenizer(Protocol):
    """What the pipeline needs of a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids ``0..255``, then ``<pad>=256``, ``<bos>=257``, ``<eos>=258``."""

    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258
    name = "byte"

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as ``int32`` ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids in ``ids`` (special ids dropped, invalid UTF-8 replaced)."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE from HuggingFace ``tokenizers``, trained on local text.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` with ``<pad>``, ``<bos>``, ``<eos>`` tokens.
    """

    name = "bpe"
    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = (tokenizer.token_to_id(s) for s in self.SPECIALS)

    @classmethod
    def train(cls, documents: Sequence[str], vocab_size: int) -> BPETokenizer:
        """Trains a byte-level BPE of ``vocab_size`` ids on ``documents`` (deterministic)."""
        tokenizers = _import_tokenizers()
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(cls.SPECIALS),
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(documents, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str) -> BPETokenizer:
        """Loads a ``tokenizer.json`` written by :meth:`save`."""
        return cls(_import_tokenizers().Tokenizer.from_file(path))

    def save(self, path: str) -> None:
        """Writes ``tokenizer.json`` (atomically: a temporary file, then a rename)."""
        tmp = f"{path}.tmp"
        self._tok.save(tmp)
        os.replace(tmp, path)

    def encode(self, text: str) -> np.ndarray:
        """The BPE ids of ``text``."""
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode` of each text, in parallel."""
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self._tok.decode([int(i) for i in ids])


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError(
            "--tokenizer bpe needs the `tokenizers` package: pip install 'lowrank_jax[data]'"
        ) from None
    return tokenizers


def make_tokenizer(
    kind: str,
    documents: Sequence[str] = (),
    *,
    vocab_size: int = 4096,
    path: str | None = None,
) -> Tokenizer:
    """The tokenizer ``kind`` (``"byte"`` or ``"bpe"``).

    For ``"bpe"``: loads ``path`` when it exists, else trains on ``documents`` and saves to
    ``path`` (when given).

    Raises:
      DataError: unknown ``kind`` (the message lists the choices).
    """
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise DataError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(TOKENIZERS)}")
    if path and os.path.exists(path):
        return BPETokenizer.load(path)
    tokenizer = BPETokenizer.train(documents, vocab_size)
    if path:
        tokenizer.save(path)
    return tokenizer
