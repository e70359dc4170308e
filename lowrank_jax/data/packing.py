"""Packing a token stream into fixed-length sequences, a deterministic split, and a resumable
batch iterator.

The documents are tokenized and concatenated, each followed by ``eos``, into one stream that is
cut into blocks of ``seq_len + 1`` tokens (inputs and their shifted targets); the tail that does
not fill a block is dropped. Every ``k``-th block (``k = round(1 / val_fraction)``) is held out
for validation, so the split depends only on the corpus and ``seq_len``. The train blocks are
visited in a fresh permutation each epoch, drawn from ``(seed, epoch)``; the iterator's whole
state is ``(epoch, index)``, which goes in the checkpoint so a resumed run sees exactly the
batches the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from lowrank_jax.data.sources import DataError
from lowrank_jax.data.tokenizer import Tokenizer

__all__ = ["BatchIterator", "Dataset", "IteratorState", "build_dataset", "pack"]


def pack(streams: Sequence[np.ndarray], eos_id: int, seq_len: int) -> np.ndarray:
    """Blocks ``int32[n, seq_len + 1]`` of the documents' ids, each followed by ``eos_id``.

    Raises:
      DataError: the corpus has fewer than ``seq_len + 1`` tokens.
    """
    eos = np.array([eos_id], np.int32)
    stream = np.concatenate([part for ids in streams for part in (ids, eos)])
    n_blocks = len(stream) // (seq_len + 1)
    if n_blocks == 0:
        raise DataError(
            f"the corpus has {len(stream)} tokens, fewer than one sequence of --seq-len "
            f"{seq_len} (+1 target) needs; lower --seq-len or add data"
        )
    return stream[: n_blocks * (seq_len + 1)].reshape(n_blocks, seq_len + 1)


class Dataset(NamedTuple):
    """Packed blocks, split. ``train`` and ``val`` are ``int32[n, seq_len + 1]``."""

    name: str
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    num_tokens: int

    @property
    def seq_len(self) -> int:
        """Input length of a sequence (a block holds one more token, the last target)."""
        return self.train.shape[1] - 1


def build_dataset(
    name: str,
    documents: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    val_fraction: float = 0.01,
    min_train_blocks: int = 1,
) -> Dataset:
    """Tokenizes, packs and splits ``documents`` (see the module docstring).

    Args:
      name: description of the source, for messages.
      documents: the texts.
      tokenizer: any :class:`~lowrank_jax.data.tokenizer.Tokenizer`.
      seq_len: input length of each sequence.
      val_fraction: share of blocks held out (at least one block).
      min_train_blocks: fewest train blocks acceptable (the batch size).

    Raises:
      DataError: the corpus is too small for ``seq_len`` and the batch size.
    """
    if seq_len < 1:
        raise DataError(f"--seq-len must be positive, got {seq_len}")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    encode_batch = getattr(tokenizer, "encode_batch", None)
    streams = encode_batch(documents) if encode_batch else [tokenizer.encode(d) for d in documents]
    blocks = pack(streams, tokenizer.eos_id, seq_len)
    num_tokens = int(sum(len(s) + 1 for s in streams))
    period = max(2, round(1 / val_fraction))
    is_val = np.arange(len(blocks)) % period == period - 1
    if not is_val.any():
        is_val[-1] = True
    train, val = blocks[~is_val], blocks[is_val]
    if len(train) < min_train_blocks:
        raise DataError(
            f"{name}: {num_tokens} tokens make {len(train)} training sequences of --seq-len "
            f"{seq_len}, fewer than --batch-size {min_train_blocks}; lower --seq-len or "
            "--batch-size, or add data"
        )
    return Dataset(name, train, val, tokenizer, num_tokens)


class IteratorState(NamedTuple):
    """Position of a :class:`BatchIterator`: the epoch and the next index in its permutation."""

    epoch: int
    index: int


class BatchIterator:
    """Shuffled batches of training blocks, resumable from an :class:`IteratorState`.

    Args:
      blocks: ``int[n, seq_len + 1]``.
      batch_size: sequences per batch (an incomplete last batch of an epoch is skipped).
      seed: the shuffling seed; epoch ``e`` uses the permutation drawn from ``(seed, e)``.
      state: where to start (``None``: the beginning).
    """

    def __init__(
        self,
        blocks: np.ndarray,
        batch_size: int,
        seed: int,
        state: IteratorState | None = None,
    ):
        if batch_size > len(blocks):
            raise DataError(f"batch size {batch_size} exceeds the {len(blocks)} training blocks")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        state = state or IteratorState(0, 0)
        self.state = IteratorState(int(state.epoch), int(state.index))
        self._order = self._permutation(self.state.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        epoch, index = self.state
        if index + self.batch_size > len(self.blocks):
            epoch, index = epoch + 1, 0
            self._order = self._permutation(epoch)
        batch = self.blocks[self._order[index : index + self.batch_size]]
        self.state = IteratorState(epoch, index + self.batch_size)
        return batch

    @property
    def epoch_fraction(self) -> float:
        """Epochs completed so far, fractional."""
        return self.state.epoch + self.state.index / len(self.blocks)
