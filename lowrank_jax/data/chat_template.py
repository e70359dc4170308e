"""Chat templates rendered with jinja2 the way transformers' ``apply_chat_template`` renders them.

The environment is transformers': a sandboxed jinja2 environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block tag (rendered
as its body), a ``tojson`` filter that does not escape HTML, and the globals
``raise_exception`` and ``strftime_now``. The template sees ``messages``, ``tools``,
``documents``, ``add_generation_prompt``, the special tokens (``bos_token``, ``eos_token``, ...)
and any extra keyword arguments.

Example:
  >>> from lowrank_jax.data.chat_template import render_chat
  >>> t = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
  >>> render_chat(t, [{"role": "user", "content": "hi"}])
  '<user>hi'
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from lowrank_jax.data.sources import DataError

__all__ = ["ChatTemplateError", "render_chat"]


class ChatTemplateError(DataError):
    """A chat template failed to render (``raise_exception`` in the template, bad messages)."""


def _jinja():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise DataError(
            "chat templates need jinja2 (>= 3.1): pip install 'lowrank_jax[finetune]'"
        ) from None
    return jinja2


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    jinja2 = _jinja()

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body (assistant spans are
        found by rendering prefixes, see :mod:`lowrank_jax.data.sft`)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Messages as plain JSON data, ``None`` entries of a message dropped (as transformers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
    tools: Sequence[Mapping] | None = None,
    documents: Sequence[Mapping] | None = None,
    **kwargs: Any,
) -> str:
    """The text of ``messages`` under ``template``.

    Args:
      template: the jinja2 source (a checkpoint's ``chat_template``).
      messages: ``[{"role": ..., "content": ...}, ...]``.
      add_generation_prompt: end with the header that opens the assistant's turn.
      special_tokens: ``{"bos_token": "<s>", "eos_token": "</s>", ...}`` visible to the template.
      tools, documents: passed through as transformers does.
      **kwargs: extra template variables (``enable_thinking=False``, ...).

    Raises:
      ChatTemplateError: the template raised, or failed to parse.
    """
    jinja2 = _jinja()
    try:
        compiled = _compile(template)
        variables = {**dict(special_tokens or {}), **_plain(kwargs)}  # kwargs win, as in HF
        return compiled.render(
            **variables,
            messages=_plain(list(messages)),
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.exceptions.TemplateError as err:
        raise ChatTemplateError(f"the chat template failed: {err}") from None
