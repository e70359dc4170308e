"""Exact-match scoring of generated answers against references.

An answer matches when the two strings are equal after :func:`normalize_answer`: surrounding
whitespace stripped and inner runs of whitespace collapsed to one space (case and punctuation
count). Greedy generation of the held-out prompts is
:func:`lowrank_jax.generate.evaluate_exact_match`.

Example:
  >>> from lowrank_jax.data.evaluation import exact_match
  >>> exact_match([" 19 ", "12"], ["19", "13"])
  0.5
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["exact_match", "normalize_answer"]


def normalize_answer(text: str) -> str:
    """``text`` stripped, with every run of whitespace replaced by one space."""
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of ``predictions`` equal to their ``answers`` after :func:`normalize_answer`.

    Raises:
      ValueError: the two lists differ in length or are empty.
    """
    if len(predictions) != len(answers) or not answers:
        raise ValueError(
            f"exact_match needs equally many predictions and answers (got {len(predictions)} "
            f"and {len(answers)}), at least one"
        )
    hits = sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers))
    return hits / len(answers)
