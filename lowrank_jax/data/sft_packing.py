"""Packing tokenized fine-tuning examples into fixed-length rows that keep documents apart.

Each row holds whole documents (first fit, in order: a document goes in the first row with
room, so rows fill up and the order is deterministic). Per slot the row carries the input id,
the target (the next id of the same document), the loss mask (the target is a response
token), the document's segment id (``1, 2, ...`` within the row; ``0`` is padding) and its
position within the document (restarting at ``0``). The model's attention honours the
segment ids (:class:`~lowrank_jax.models.Llama`), so packed documents never see each other,
and the last slot of a document has no target.

**Longer than ``seq_len``.** A plain-text document is cut into consecutive pieces of
``seq_len`` tokens (nothing is lost but the target across each cut). A prompt/response or chat
example is, with ``overflow="truncate"`` (the default), cut to its first ``seq_len`` tokens,
and dropped if no response token survives; :class:`PackStats` counts both. With
``overflow="error"`` it is a :class:`~lowrank_jax.data.DataError` naming the record and its
length.

Example:
  >>> import numpy as np
  >>> from lowrank_jax.data.sft import Example, Tokenized
  >>> from lowrank_jax.data.sft_packing import pack_examples
  >>> doc = Tokenized(np.arange(1, 5), np.array([0, 0, 1, 1], bool), Example("text"))
  >>> data, stats = pack_examples([doc, doc], seq_len=8, pad_id=0)
  >>> data.segment_ids.tolist(), data.loss_mask.astype(int).tolist()
  ([[1, 1, 1, 1, 2, 2, 2, 2]], [[0, 1, 1, 0, 0, 1, 1, 0]])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from lowrank_jax.data.sft import Example, Tokenized
from lowrank_jax.data.sources import DataError

__all__ = ["OVERFLOW", "PackStats", "SFTData", "pack_examples", "split_examples"]

OVERFLOW = ("truncate", "error")


class SFTData(NamedTuple):
    """Packed rows, each ``[n, seq_len]``: ``inputs``, ``targets`` (int32), ``loss_mask``
    (bool), ``segment_ids`` and ``positions`` (int32)."""

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The arrays of ``rows`` as a dict (for a train step)."""
        return {name: value[rows] for name, value in self._asdict().items()}


@dataclasses.dataclass(frozen=True)
class PackStats:
    """What packing did: examples in, rows out, tokens, and what did not fit.

    Attributes:
      examples: examples packed; rows: rows made; tokens: non-padding tokens;
      loss_tokens: targets the loss counts; truncated: examples cut to ``seq_len``;
      dropped: truncated examples left without a response token; split: text documents cut
      into pieces; fill: share of slots holding a token.
    """

    examples: int
    rows: int
    tokens: int
    loss_tokens: int
    truncated: int
    dropped: int
    split: int
    fill: float


def _fit(
    docs: Sequence[Tokenized], seq_len: int, overflow: str
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int, int]:
    """Documents of at most ``seq_len`` tokens, and the truncated / dropped / split counts."""
    pieces, truncated, dropped, split = [], 0, 0, 0
    for doc in docs:
        ids, mask = np.asarray(doc.ids, np.int32), np.asarray(doc.mask, bool)
        if len(ids) <= seq_len:
            pieces.append((ids, mask))
        elif doc.example.kind == "text":
            split += 1
            pieces.extend(
                (ids[i : i + seq_len], mask[i : i + seq_len]) for i in range(0, len(ids), seq_len)
            )
        elif overflow == "error":
            raise DataError(
                f"{doc.example.where}: {len(ids)} tokens, more than --max-seq-len {seq_len}; "
                "raise --max-seq-len, shorten the record, or truncate (overflow='truncate')"
            )
        elif mask[1:seq_len].any():
            truncated += 1
            pieces.append((ids[:seq_len], mask[:seq_len]))
        else:
            dropped += 1
    return pieces, truncated, dropped, split


def pack_examples(
    docs: Sequence[Tokenized],
    seq_len: int,
    *,
    pad_id: int,
    overflow: str = "truncate",
    pack: bool = True,
) -> tuple[SFTData, PackStats]:
    """Packs tokenized examples into rows of ``seq_len`` slots (see the module docstring).

    Args:
      docs: :class:`~lowrank_jax.data.sft.Tokenized` examples.
      seq_len: slots per row (the model's input length).
      pad_id: id of the padding slots (their loss mask and segment id are 0).
      overflow: ``"truncate"`` or ``"error"`` for chat / prompt-response examples longer
        than ``seq_len``.
      pack: ``False`` puts each document in a row of its own.

    Returns:
      ``(data, stats)``.

    Raises:
      DataError: a bad ``seq_len``/``overflow``, an overlong example with
        ``overflow="error"``, or nothing left to train on.
    """
    if seq_len < 2:
        raise DataError(f"--max-seq-len must be at least 2, got {seq_len}")
    if overflow not in OVERFLOW:
        raise DataError(f"overflow {overflow!r}; choose one of {OVERFLOW}")
    pieces, truncated, dropped, split = _fit(docs, seq_len, overflow)
    if not pieces:
        raise DataError(f"no example fits --max-seq-len {seq_len} with a response token left")
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    room = np.zeros(0, np.int64)
    for ids, mask in pieces:
        free = np.flatnonzero(room >= len(ids)) if pack else ()
        if len(free):
            rows[free[0]].append((ids, mask))
            room[free[0]] -= len(ids)
        else:
            rows.append([(ids, mask)])
            room = np.append(room, seq_len - len(ids))
    shape = (len(rows), seq_len)
    data = SFTData(
        np.full(shape, pad_id, np.int32),
        np.full(shape, pad_id, np.int32),
        np.zeros(shape, bool),
        np.zeros(shape, np.int32),
        np.zeros(shape, np.int32),
    )
    for r, row in enumerate(rows):
        start = 0
        for segment, (ids, mask) in enumerate(row, start=1):
            end = start + len(ids)
            data.inputs[r, start:end] = ids
            data.targets[r, start : end - 1] = ids[1:]
            data.loss_mask[r, start : end - 1] = mask[1:]
            data.segment_ids[r, start:end] = segment
            data.positions[r, start:end] = np.arange(len(ids))
            start = end
    tokens = int((data.segment_ids > 0).sum())
    stats = PackStats(
        examples=len(docs) - dropped,
        rows=len(rows),
        tokens=tokens,
        loss_tokens=int(data.loss_mask.sum()),
        truncated=truncated,
        dropped=dropped,
        split=split,
        fill=tokens / data.inputs.size,
    )
    return data, stats


def split_examples(
    examples: Sequence[Example], val_fraction: float = 0.1, *, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: a seeded random ``val_fraction`` of the examples (at least one)
    held out, both in file order. Split before packing, so held-out prompts stay whole.

    Raises:
      DataError: ``val_fraction`` not in ``[0, 1)``, or too few examples to hold one out.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(examples), []
    if len(examples) < 2:
        raise DataError(f"{len(examples)} example(s): too few to hold one out for validation")
    count = min(len(examples) - 1, max(1, round(val_fraction * len(examples))))
    held = set(np.random.default_rng(seed).permutation(len(examples))[:count].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]
