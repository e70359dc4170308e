"""Generation: greedy with the KV cache equals greedy re-running the full forward, and
transformers' greedy generate; sampling, top-p, eos stop, the text API, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.data.hf_tokenizer import HFTokenizer
from lowrank_jax.generate import generate, generate_ids, sample_logits
from lowrank_jax.models import Llama, load_hf
from tests.data.tiny_tokenizer import write_checkpoint_tokenizer
from tests.models.families import randomize, require_transformers, tiny_config, tiny_reference

full_forward = nnx.jit(lambda model, tokens: model(tokens))


def _greedy_without_cache(model, prompt, steps):
    """Re-runs the whole forward for every new token (one fixed-length buffer: causal
    attention makes the trailing zeros irrelevant, and one shape compiles once)."""
    buffer = np.zeros((1, len(prompt) + steps), np.int32)
    buffer[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + steps):
        buffer[0, t] = int(jnp.argmax(full_forward(model, jnp.asarray(buffer))[0, t - 1]))
    return buffer[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", ["llama_bias", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_greedy_with_cache_equals_greedy_without(name):
    model = randomize(Llama(tiny_config(name), rngs=nnx.Rngs(0)), scale=1.0)
    prompts = [[5, 17, 3, 44, 8, 9, 10], [60, 2]]  # different lengths: left padding
    got = generate_ids(model, prompts, max_new_tokens=9)
    for prompt, ids in zip(prompts, got):
        assert ids == _greedy_without_cache(model, prompt, 9)


@pytest.mark.parametrize("name, seed, sharpen", [("qwen2", 1, 8.0), ("gemma3", 2, 4.0)])
def test_greedy_matches_transformers_generate(tmp_path, name, seed, sharpen):
    torch, _ = require_transformers()
    # seeds and scales that make the random models' greedy text vary (checked below)
    reference = tiny_reference(name, seed=seed, sharpen=sharpen)
    reference.save_pretrained(tmp_path)
    model = load_hf(str(tmp_path))
    prompt = [5, 17, 3, 44, 8, 9, 10, 11]
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert len(set(expected)) > 3  # a sequence, not one repeated token
    assert generate_ids(model, [prompt], max_new_tokens=10)[0] == expected


def test_eos_stops_each_row_and_is_kept():
    model = randomize(Llama(tiny_config("llama_bias"), rngs=nnx.Rngs(0)), scale=1.0)
    free = generate_ids(model, [[1, 2, 3]], max_new_tokens=8)[0]
    stop = free[3]
    ids = generate_ids(model, [[1, 2, 3], [4, 5]], max_new_tokens=8, eos_ids=[stop])
    assert ids[0] == free[: free.index(stop) + 1]
    assert len(ids[1]) <= 8 and (stop not in ids[1][:-1])


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = jax.vmap(lambda k: sample_logits(logits, k, 1.0, 0.75))(keys)
    assert set(np.unique(draw).tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    assert abs(float(jnp.mean(draw == 0)) - 0.5 / 0.8) < 0.04
    full = jax.vmap(lambda k: sample_logits(logits, k, 1.0, 1.0))(keys)
    assert set(np.unique(full).tolist()) == {0, 1, 2, 3}
    cold = jax.vmap(lambda k: sample_logits(logits, k, 0.05, 1.0))(keys)
    assert float(jnp.mean(cold == 0)) > 0.99
    assert sample_logits(logits, keys[0]).tolist() == [0]  # greedy
    model = Llama(tiny_config("qwen3"), rngs=nnx.Rngs(0))
    a = generate_ids(model, [[1, 2]], max_new_tokens=6, temperature=1.0, seed=3)
    assert a == generate_ids(model, [[1, 2]], max_new_tokens=6, temperature=1.0, seed=3)
    assert a != generate_ids(model, [[1, 2]], max_new_tokens=6, temperature=1.0, seed=4)


def test_generate_text_with_the_chat_template(tmp_path):
    tokenizer = HFTokenizer.from_pretrained(str(write_checkpoint_tokenizer(tmp_path)))
    config = tiny_config("qwen2", vocab_size=tokenizer.vocab_size)
    model = randomize(Llama(config, rngs=nnx.Rngs(0)), scale=1.0)
    reply = generate(model, tokenizer, "What is 12 + 7?", max_new_tokens=6)
    messages = [{"role": "user", "content": "What is 12 + 7?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = generate_ids(model, [prompt.tolist()], max_new_tokens=6, eos_ids=tokenizer.eos_ids)[0]
    assert reply == tokenizer.decode([t for t in ids if t not in tokenizer.eos_ids])
    both = generate(model, tokenizer, ["What is 12 + 7?", messages], max_new_tokens=6)
    assert both == [reply, reply]
    raw = generate(model, tokenizer, "What is", chat=False, max_new_tokens=3)
    assert isinstance(raw, str)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[[]]), "at least one token"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
    ],
)
def test_bad_generation_arguments(kwargs, message):
    model = Llama(tiny_config("mistral"), rngs=nnx.Rngs(0))
    args = dict(prompts=[[1]], max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=message):
        generate_ids(model, args.pop("prompts"), **args)
