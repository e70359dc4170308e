"""Fine-tuning records: JSONL read and checked line by line, rendered and tokenized with a mask
that marks the response tokens (the only ones the loss counts).

A JSONL line is one JSON object of one of three kinds:

* ``{"prompt": str, "response": str}``: with a chat template, the user turn and the assistant
  turn; without one (a base model), ``prompt`` then ``response`` then eos, each encoded on its
  own (the prompt with the tokenizer's special tokens);
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the chat template;
  every assistant turn is a response (a conversation needs at least one);
* ``{"text": str}``: plain text, every token counts (also what a ``.txt`` file gives).

An optional ``"answer"`` (string or number) is the reference of :func:`exact_match`; without
it the last response is. A line that is not JSON fails with its file and line number; a record
missing a field names the field.

Response tokens under a chat template are found by rendering: the assistant turn ``i`` spans
from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i+1])`` (its content and the end-of-turn tokens, so the model learns to
stop); the tokens of the whole rendering whose first character falls in a span are marked.

Example:
  >>> from lowrank_jax.data.sft import parse_record
  >>> parse_record({"prompt": "2+2?", "response": "4"}, "x.jsonl:1").answer
  '4'
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lowrank_jax.data.sources import DataError, file_documents

__all__ = [
    "Example",
    "Tokenized",
    "parse_record",
    "prompt_ids",
    "read_examples",
    "read_jsonl",
    "tokenize_example",
]


@dataclasses.dataclass(frozen=True)
class Example:
    """One record.

    Attributes:
      kind: ``"prompt_response"``, ``"messages"`` or ``"text"``.
      messages: the conversation (a prompt/response record is a user and an assistant turn).
      text: the plain text (``kind == "text"``).
      answer: the exact-match reference (``None`` for text).
      where: ``"file.jsonl:LINE"``, for messages.
    """

    kind: str
    messages: tuple[dict, ...] = ()
    text: str = ""
    answer: str | None = None
    where: str = ""


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """Token ids and ``mask``: ``True`` where the token is a response token (a loss target)."""

    ids: np.ndarray
    mask: np.ndarray
    example: Example


def _string(record: Mapping, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _answer(record: Mapping, default: str | None, where: str) -> str | None:
    if "answer" not in record:
        return default
    value = record["answer"]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field 'answer' must be a string or a number")
    return str(value)


def parse_record(record: Any, where: str) -> Example:
    """The :class:`Example` of one parsed JSONL record.

    Raises:
      DataError: not an object, an unknown kind, a missing or mistyped field (``where`` and
        the field are named).
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list")
        for k, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise DataError(f"{where}: messages[{k}] must be an object")
            _string(message, "role", f"{where}: messages[{k}]")
            _string(message, "content", f"{where}: messages[{k}]")
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        if not replies:
            raise DataError(f"{where}: the conversation has no assistant message to train on")
        return Example(
            "messages",
            tuple(dict(m) for m in messages),
            answer=_answer(record, replies[-1], where),
            where=where,
        )
    if "prompt" in record or "response" in record:
        prompt, response = _string(record, "prompt", where), _string(record, "response", where)
        turns = ({"role": "user", "content": prompt}, {"role": "assistant", "content": response})
        return Example(
            "prompt_response", turns, answer=_answer(record, response, where), where=where
        )
    if "text" in record:
        return Example("text", text=_string(record, "text", where), where=where)
    raise DataError(
        f"{where}: a record needs 'prompt' and 'response', 'messages', or 'text'; "
        f"it has {sorted(record)}"
    )


def read_jsonl(path: str) -> list[Example]:
    """The examples of a JSONL file (blank lines skipped).

    Raises:
      DataError: a missing file, or a line that is not valid (named ``path:LINE``).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: not valid JSON ({err.msg}, column {err.colno})"
                ) from None
            examples.append(parse_record(record, where))
    if not examples:
        raise DataError(f"{path}: no records")
    return examples


def read_examples(path: str) -> list[Example]:
    """Examples from a ``.jsonl`` file, or plain-text documents from a text file, a directory
    of ``*.txt`` files or a glob (one ``text`` example per file).

    Raises:
      DataError: nothing to read, or a bad record.
    """
    if path.endswith(".jsonl"):
        return read_jsonl(path)
    return [Example("text", text=d, where=path) for d in file_documents(path) if d.strip()]


def _render(tokenizer: Any, messages: Sequence[Mapping], prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=prompt)


def _response_spans(tokenizer: Any, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    messages = example.messages
    full = _render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (upto.startswith(head) and full.startswith(upto)):
            raise DataError(
                f"{example.where}: the chat template renders earlier turns differently once "
                "later ones follow, so the response tokens cannot be located; use "
                "prompt/response records or a template without that behaviour"
            )
        spans.append((len(head), len(upto)))
    return full, spans


def tokenize_example(example: Example, tokenizer: Any) -> Tokenized:
    """Ids and response mask of ``example`` (see the module docstring for the rules).

    Args:
      example: an :class:`Example`.
      tokenizer: an :class:`~lowrank_jax.data.hf_tokenizer.HFTokenizer` (a tokenizer with
        ``encode`` and ``eos_id`` suffices for text and template-free prompt/response).

    Raises:
      DataError: a ``messages`` record and a tokenizer without a chat template.
    """
    eos = np.asarray([tokenizer.eos_id], np.int32)
    if example.kind == "text":
        ids = np.concatenate([tokenizer.encode(example.text), eos])
        return Tokenized(ids, np.ones(len(ids), bool), example)
    if getattr(tokenizer, "chat_template", None):
        text, spans = _response_spans(tokenizer, example)
        ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False)
        starts = offsets[:, 0]
        mask = np.zeros(len(ids), bool)
        for lo, hi in spans:
            mask |= (starts >= lo) & (starts < hi)
        return Tokenized(ids, mask, example)
    if example.kind == "messages":
        raise DataError(
            f"{example.where}: a 'messages' record needs a tokenizer with a chat_template"
        )
    prompt, response = (m["content"] for m in example.messages)
    prompt_ids = np.asarray(tokenizer.encode(prompt), np.int32)
    response_ids = np.concatenate([_encode_plain(tokenizer, response), eos])
    mask = np.concatenate([np.zeros(len(prompt_ids), bool), np.ones(len(response_ids), bool)])
    return Tokenized(np.concatenate([prompt_ids, response_ids]), mask, example)


def _encode_plain(tokenizer: Any, text: str) -> np.ndarray:
    try:
        return np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
    except TypeError:  # a tokenizer without special tokens (ByteTokenizer)
        return np.asarray(tokenizer.encode(text), np.int32)


def prompt_ids(example: Example, tokenizer: Any) -> np.ndarray:
    """The ids a model continues to answer ``example``: the conversation up to its last
    assistant turn with the template's generation prompt, or (no template) the prompt."""
    if example.kind == "text":
        raise DataError(f"{example.where}: a text record has no prompt to answer")
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    if getattr(tokenizer, "chat_template", None):
        text = _render(tokenizer, example.messages[:last], True)
        return tokenizer.encode(text, add_special_tokens=False)
    if example.kind == "messages":
        raise DataError(
            f"{example.where}: a 'messages' record needs a tokenizer with a chat_template"
        )
    return np.asarray(tokenizer.encode(example.messages[0]["content"]), np.int32)
