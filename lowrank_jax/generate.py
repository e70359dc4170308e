"""Sampling from a :class:`~lowrank_jax.models.Llama` with a KV cache: greedy, temperature, top-p.

One jitted function per (batch, prompt bucket, ``max_new_tokens``, sampling settings) runs
the whole generation: the prompts, left-padded to a multiple of 16, fill the cache in one
forward (padding is segment ``0``, which real tokens, segment ``1``, never attend to; positions
count real tokens only), then a ``lax.while_loop`` decodes one token per step for every row
until each has produced an end-of-sequence id or ``max_new_tokens`` tokens.

* greedy (``temperature=0``): ``argmax`` of the logits;
* sampling: ``softmax(logits / temperature)``, restricted by top-p to the smallest set of most
  likely tokens whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al., 2020).

Example:
  >>> from flax import nnx
  >>> from lowrank_jax.models import Llama, get_config
  >>> from lowrank_jax.generate import generate_ids
  >>> model = Llama(get_config("llama_tiny", vocab_size=64, num_layers=1), rngs=nnx.Rngs(0))
  >>> [len(ids) for ids in generate_ids(model, [[1, 2, 3]], max_new_tokens=4)]
  [4]
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.data.evaluation import exact_match
from lowrank_jax.data.sft import Example, prompt_ids
from lowrank_jax.models.llama import init_cache

__all__ = ["ExactMatch", "evaluate_exact_match", "generate", "generate_ids", "sample_logits"]

BUCKET = 16


def sample_logits(
    logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_p: float = 1.0
) -> jax.Array:
    """Next ids from ``logits [..., vocab]``: argmax when ``temperature == 0``, else a sample of
    ``softmax(logits / temperature)`` within the top-p nucleus.

    Args:
      logits: ``float[..., vocab]``.
      key: PRNG key (unused when greedy).
      temperature: ``0`` for greedy, else the softmax temperature.
      top_p: keep the most likely tokens whose cumulative probability first reaches ``top_p``
        (``1``: all tokens).

    Returns:
      ``int32[...]`` ids.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p"))
def _generate(
    graphdef: Any,
    state: Any,
    tokens: jax.Array,
    segments: jax.Array,
    eos_ids: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    model.eval()  # adapter dropout off
    batch, length = tokens.shape
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    cache = init_cache(model.config, batch, length + max_new_tokens)
    logits, cache = model(tokens, positions, segments, cache=cache)
    key, sub = jax.random.split(key)
    token = sample_logits(logits[:, -1], sub, temperature, top_p)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, eos_ids)
    ones = jnp.ones((batch, 1), jnp.int32)

    def cond(carry):
        step, *_, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, token, position, out, done, key = carry
        logits, cache = model(token[:, None], position[:, None], ones, cache=cache)
        key, sub = jax.random.split(key)
        new = sample_logits(logits[:, 0], sub, temperature, top_p)
        new = jnp.where(done, 0, new)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
        return step + 1, cache, new, position + 1, out, done | jnp.isin(new, eos_ids), key

    carry = (jnp.int32(1), cache, token, positions[:, -1] + 1, out, done, key)
    return jax.lax.while_loop(cond, body, carry)[4]


def generate_ids(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] = (),
    seed: int = 0,
) -> list[list[int]]:
    """New ids after each prompt, up to and including the first of ``eos_ids``.

    Args:
      model: a :class:`~lowrank_jax.models.Llama` (wrapped by :mod:`lowrank_jax.reparam` or not).
      prompts: token ids of each prompt (non-empty).
      max_new_tokens: most ids generated per prompt.
      temperature, top_p: see :func:`sample_logits` (``temperature=0``: greedy).
      eos_ids: ids that end a row's generation (kept in its output).
      seed: PRNG seed of the sampling.

    Raises:
      ValueError: an empty prompt, ``max_new_tokens < 1``, bad temperature or top_p.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // BUCKET) * BUCKET
    tokens = np.zeros((len(prompts), length), np.int32)
    segments = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the last slot
        tokens[row, length - len(prompt) :] = np.asarray(prompt, np.int32)
        segments[row, length - len(prompt) :] = 1
    graphdef, state = nnx.split(model)
    out = _generate(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray(segments),
        jnp.asarray(list(eos_ids) or [-1], jnp.int32),
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
    )
    results = []
    stops = set(int(i) for i in eos_ids)
    for row in np.asarray(out).tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:end])
    return results


def _prompt_ids(tokenizer: Any, prompt: str | Sequence[Mapping], chat: bool | None) -> np.ndarray:
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(prompt, str):  # a conversation
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    if chat or (chat is None and template):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return tokenizer.encode(prompt)


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[Mapping] | Sequence[str | Sequence[Mapping]],
    *,
    chat: bool | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str | list[str]:
    """The model's reply to ``prompt`` (or to each of a list of prompts), as text.

    Args:
      model: a :class:`~lowrank_jax.models.Llama`.
      tokenizer: an :class:`~lowrank_jax.data.hf_tokenizer.HFTokenizer` (or any tokenizer
        with ``encode``/``decode`` and ``eos_id``).
      prompt: a string, a conversation (``[{"role", "content"}, ...]``), or a list of them.
      chat: wrap a string prompt as a user turn of the chat template (``None``: when the
        tokenizer has a template); the template's generation prompt opens the reply.
      max_new_tokens, temperature, top_p, seed: see :func:`generate_ids`.

    Returns:
      The decoded reply (special tokens and the stop token dropped), or a list of them.

    Example:
      >>> generate(model, tokenizer, "What is 12 + 7?", max_new_tokens=8)  # doctest: +SKIP
      '19'
    """
    single = isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], Mapping))
    prompts = [prompt] if single else list(prompt)
    eos_ids = getattr(tokenizer, "eos_ids", None) or (tokenizer.eos_id,)
    outputs = generate_ids(
        model,
        [_prompt_ids(tokenizer, p, chat).tolist() for p in prompts],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_ids=eos_ids,
        seed=seed,
    )
    texts = [tokenizer.decode([t for t in ids if t not in eos_ids]) for ids in outputs]
    return texts[0] if single else texts


class ExactMatch(NamedTuple):
    """Held-out exact match: the score and, per example, the generation and the reference."""

    score: float
    predictions: list[str]
    answers: list[str]


def evaluate_exact_match(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> ExactMatch:
    """Greedy answers to the prompts of ``examples`` scored against their answers.

    Each example's prompt is :func:`~lowrank_jax.data.sft.prompt_ids` (the conversation up to
    its last assistant turn, with the template's generation prompt); the reply, decoded without
    special tokens, matches when equal to ``example.answer`` after
    :func:`~lowrank_jax.data.evaluation.normalize_answer`. Batches keep one shape (the last
    is filled up with repeats), so the generation compiles once per prompt-length bucket.

    Raises:
      ValueError: no example has an answer.
    """
    examples = [e for e in examples if e.answer is not None]
    if not examples:
        raise ValueError("no example has an answer to compare with (text records have none)")
    eos_ids = getattr(tokenizer, "eos_ids", None) or (tokenizer.eos_id,)
    prompts = [prompt_ids(e, tokenizer).tolist() for e in examples]
    predictions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        filled = batch + [batch[-1]] * (min(batch_size, len(prompts)) - len(batch))
        outputs = generate_ids(model, filled, max_new_tokens=max_new_tokens, eos_ids=eos_ids)
        for ids in outputs[: len(batch)]:
            predictions.append(tokenizer.decode([t for t in ids if t not in eos_ids]))
    answers = [e.answer for e in examples]
    return ExactMatch(exact_match(predictions, answers), predictions, answers)
