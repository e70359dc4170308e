"""A checkpoint's own tokenizer: ``tokenizer.json`` through the ``tokenizers`` library.

:meth:`HFTokenizer.from_pretrained` reads a checkpoint directory as transformers'
``AutoTokenizer`` does for a fast tokenizer: the model, normalizer, pre-tokenizer and added
tokens from ``tokenizer.json``; the special tokens (``bos/eos/pad/unk``) from
``tokenizer_config.json`` (or ``special_tokens_map.json``); whether ``encode`` adds bos/eos is
the ``tokenizer.json`` post-processor's business (transformers 5 ignores the config's
``add_bos_token`` / ``add_eos_token`` when a ``tokenizer.json`` exists, and so do we); the chat
template from ``chat_template.jinja``,
``chat_template.json`` or ``tokenizer_config.json``; the stop ids from the eos token and
``generation_config.json``'s ``eos_token_id`` (an id or a list). The pad id falls back to
``generation_config.json``'s ``pad_token_id``, then to the eos id.

Example:
  >>> from lowrank_jax.data.hf_tokenizer import HFTokenizer
  >>> tok = HFTokenizer.from_pretrained("path/to/checkpoint")   # doctest: +SKIP
  >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
  ... # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lowrank_jax.data.chat_template import render_chat
from lowrank_jax.data.sources import DataError

__all__ = ["HFTokenizer", "bos_eos_processor"]

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError(
            "a checkpoint's tokenizer.json needs the `tokenizers` package: "
            "pip install 'lowrank_jax[finetune]'"
        ) from None
    return tokenizers


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _chat_template(path: str, config: dict) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
    template = template or config.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with its checkpoint's special tokens and chat template.

    Args:
      tokenizer: the ``tokenizers.Tokenizer`` (its post-processor adds bos/eos, if any).
      special_tokens: ``{"bos_token": "<s>", "eos_token": "</s>", "pad_token": ...}``.
      chat_template: jinja2 source, or ``None``.
      eos_ids: extra stop ids (``generation_config.json``), after the eos token's.
      pad_id: the padding id when there is no pad token (default: the eos id).
    """

    name = "hf"

    def __init__(
        self,
        tokenizer: Any,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        eos_ids: Sequence[int] = (),
        pad_id: int | None = None,
    ):
        self._tok = tokenizer
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        _add_missing_specials(tokenizer, self.special_tokens.values())
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._id("bos_token")
        self.eos_id = self._id("eos_token")
        if self.eos_id is None and eos_ids:
            self.eos_id = int(eos_ids[0])
        ids = ([] if self.eos_id is None else [self.eos_id]) + [int(i) for i in eos_ids]
        self.eos_ids = tuple(dict.fromkeys(ids))
        pad = self._id("pad_token")
        self.pad_id = pad if pad is not None else (pad_id if pad_id is not None else self.eos_id)

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._tok.token_to_id(token)

    @classmethod
    def from_pretrained(cls, path: str) -> HFTokenizer:
        """Loads the tokenizer of the checkpoint directory ``path`` (see the module docstring).

        Raises:
          DataError: no ``tokenizer.json`` (the message says how to make one), malformed JSON.
        """
        tokenizers = _import_tokenizers()
        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise DataError(
                f"{path} has no tokenizer.json. Slow tokenizers (tokenizer.model, vocab.json) "
                "are not read; convert once with transformers: "
                "AutoTokenizer.from_pretrained(path).save_pretrained(path)"
            )
        tok = tokenizers.Tokenizer.from_file(file)
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        specials_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        specials = {}
        for name in SPECIAL_NAMES:
            value = _token_text(config.get(name)) or _token_text(specials_map.get(name))
            if value is not None:
                specials[name] = value
        generation = _read_json(os.path.join(path, "generation_config.json"))
        eos = generation.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            tok,
            special_tokens=specials,
            chat_template=_chat_template(path, config),
            eos_ids=eos_ids,
            pad_id=generation.get("pad_token_id"),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """The ids of ``text`` (with the post-processor's bos/eos when ``add_special_tokens``)."""
        return np.asarray(
            self._tok.encode(text, add_special_tokens=add_special_tokens).ids, np.int32
        )

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list:
        """:meth:`encode` of each text."""
        encoded = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [np.asarray(e.ids, np.int32) for e in encoded]

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, offsets)``: each token's ``[start, end)`` character span in ``text``."""
        encoding = self._tok.encode(text, add_special_tokens=add_special_tokens)
        offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
        return np.asarray(encoding.ids, np.int32), offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped unless ``skip_special_tokens=False``)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | np.ndarray:
        """``messages`` rendered with the chat template (ids when ``tokenize``, encoded without
        adding special tokens: the template writes them, as in transformers).

        Raises:
          DataError: the tokenizer has no chat template.
        """
        if not self.chat_template:
            raise DataError(
                "this tokenizer has no chat_template (a base model?); use prompt/response "
                "records without a template, or give the checkpoint a chat_template"
            )
        text = render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, path: str) -> None:
        """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (transformers loads them)."""
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


def _add_missing_specials(tok: Any, tokens: Any) -> None:
    """As transformers: a special token the vocabulary lacks becomes an added special token."""
    tokenizers = _import_tokenizers()
    missing = [t for t in tokens if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(
            [tokenizers.AddedToken(t, special=True, normalized=False) for t in missing]
        )


def bos_eos_processor(tok: Any, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool):
    """A post-processor ``[bos] $A [eos]`` (transformers' for ``add_bos_token``/``add_eos_token``).

    Args:
      tok: the ``tokenizers.Tokenizer`` (bos and eos must be in its vocabulary).
      bos, eos: the tokens' text; add_bos, add_eos: whether to add them.
    """
    tokenizers = _import_tokenizers()
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = (
        f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    )
    special = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return tokenizers.processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special
    )
