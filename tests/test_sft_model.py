"""Data and model together: the packed, response-masked loss equals the per-example losses;
held-out exact match through greedy generation."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.data.hf_tokenizer import HFTokenizer
from lowrank_jax.data.sft import parse_record, prompt_ids, tokenize_example
from lowrank_jax.data.sft_packing import pack_examples
from lowrank_jax.generate import evaluate_exact_match, generate_ids
from lowrank_jax.models import Llama
from tests.data.tiny_tokenizer import write_checkpoint_tokenizer
from tests.models.families import randomize, tiny_config

QUESTIONS = [("What is 12 + 7?", "19"), ("3 * 4?", "12"), ("45 - 17?", "28"), ("2 + 2?", "4")]


@nnx.jit
def _nll(model, inputs, targets, mask, positions, segments):
    logits = model(inputs, positions, segments).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask)


def _masked_nll_sum(model, inputs, targets, mask, positions=None, segments=None):
    args = (jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(mask, jnp.float32))
    return float(_nll(model, *args, positions, segments))


def test_packed_response_only_loss_equals_the_per_example_losses(tmp_path):
    tokenizer = HFTokenizer.from_pretrained(str(write_checkpoint_tokenizer(tmp_path)))
    model = randomize(
        Llama(tiny_config("gemma3", vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0))
    )
    docs = [
        tokenize_example(parse_record({"prompt": q, "response": a}, f"x:{i}"), tokenizer)
        for i, (q, a) in enumerate(QUESTIONS)
    ]
    data, stats = pack_examples(docs, seq_len=128, pad_id=tokenizer.pad_id)
    assert stats.rows < len(docs)  # several examples share a row
    packed = _masked_nll_sum(
        model,
        data.inputs,
        data.targets,
        data.loss_mask,
        jnp.asarray(data.positions),
        jnp.asarray(data.segment_ids),
    )
    separate = 0.0
    for d in docs:  # each alone, padded to one length (one compile; causal: pads are inert)
        ids, mask = np.zeros((1, 65), np.int32), np.zeros((1, 65), bool)
        ids[0, : len(d.ids)], mask[0, : len(d.ids)] = d.ids, d.mask
        separate += _masked_nll_sum(model, ids[:, :-1], ids[:, 1:], mask[:, 1:])
    np.testing.assert_allclose(packed, separate, rtol=1e-5)
    assert stats.loss_tokens == sum(int(d.mask[1:].sum()) for d in docs)


def test_exact_match_scores_greedy_answers(tmp_path):
    tokenizer = HFTokenizer.from_pretrained(str(write_checkpoint_tokenizer(tmp_path)))
    model = randomize(
        Llama(tiny_config("qwen3", vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0)), scale=1.0
    )
    examples = [
        parse_record({"prompt": q, "response": a}, f"x:{i}") for i, (q, a) in enumerate(QUESTIONS)
    ]
    prompts = [prompt_ids(e, tokenizer).tolist() for e in examples]
    replies = [
        tokenizer.decode([t for t in ids if t not in tokenizer.eos_ids])
        for ids in generate_ids(model, prompts, max_new_tokens=5, eos_ids=tokenizer.eos_ids)
    ]
    # Make two of the four references the model's own greedy answers: the score is 1/2.
    rigged = [
        parse_record({"prompt": q, "response": a, "answer": replies[i] if i % 2 else "no"}, "x")
        for i, (q, a) in enumerate(QUESTIONS)
    ]
    result = evaluate_exact_match(model, tokenizer, rigged, max_new_tokens=5, batch_size=3)
    assert result.predictions == replies
    assert result.score == 0.5
