"""A SentencePiece BPE vocabulary from a GGUF file (``tokenizer.ggml.model == "llama"``:
LLaMA 1/2, Mistral, Gemma) as a ``tokenizers.Tokenizer`` that tokenizes as llama.cpp does.

llama.cpp's SentencePiece tokenizer writes spaces as ``"▁"`` (and puts one in front of each
piece of text unless ``tokenizer.ggml.add_space_prefix`` is false, as in Gemma), starts from
single characters and repeatedly merges the adjacent pair whose concatenation is the vocabulary
piece with the highest ``tokenizer.ggml.scores`` entry; characters no piece covers become their
UTF-8 bytes ``<0xNN>`` (or the unknown token). That is a BPE whose merges are every split
``(left, right)`` of every piece into two pieces, ranked by the piece's score::

    rank(left, right) = order of -score(left + right)   (ties: earlier piece, longer left)

which is what transformers' GGUF converter builds too. The prefix space is a normalizer, so it
is added again after each special or user-defined token, as llama.cpp does.

Example:
  >>> tok = sentencepiece_bpe(tokenizers, tokens, scores)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["sentencepiece_bpe", "sentencepiece_merges"]

SPACE = "\u2581"  # "▁", SentencePiece's whitespace


def sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """The BPE merges equivalent to SentencePiece's score-ordered merging.

    Every way of cutting a piece into two pieces of the vocabulary is a merge; merges are ranked
    by the score of the piece they make, highest first (ties: the piece listed first, then the
    longer left part).

    Args:
      tokens: the vocabulary (``tokenizer.ggml.tokens``); scores: one per token.
    Returns:
      ``[(left, right), ...]`` best first.
    """
    known = set(tokens)
    ranked = []
    for index, (piece, score) in enumerate(zip(tokens, scores)):
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in known and right in known:
                ranked.append((-float(score), index, -cut, left, right))
    ranked.sort(key=lambda r: r[:3])
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_bpe(
    tokenizers: Any,
    tokens: Sequence[str],
    scores: Sequence[float] | None = None,
    *,
    unk_token: str | None = None,
    add_space_prefix: bool = True,
    merges: Sequence[tuple[str, str]] | None = None,
) -> Any:
    """A ``tokenizers.Tokenizer`` (BPE with byte fallback, no special tokens yet) for a
    SentencePiece vocabulary.

    Args:
      tokenizers: the ``tokenizers`` module.
      tokens: ``tokenizer.ggml.tokens``; scores: ``tokenizer.ggml.scores`` (``None``: the file
        order, best first).
      unk_token: the unknown piece (for characters without byte tokens).
      add_space_prefix: put ``"▁"`` in front of the text (and strip it when decoding).
      merges: the file's ``tokenizer.ggml.merges``, used only when it has no scores.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    if scores is None and merges is None:
        scores = [-float(i) for i in range(len(tokens))]
    if scores is not None:
        merges = sentencepiece_merges(tokens, scores)
    model = tokenizers.models.BPE(
        vocab,
        list(merges),
        unk_token=unk_token,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = tokenizers.Tokenizer(model)
    normalizers = tokenizers.normalizers
    replace = normalizers.Replace(" ", SPACE)
    tok.normalizer = (
        normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if add_space_prefix else replace
    )
    decoders = tokenizers.decoders
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok
