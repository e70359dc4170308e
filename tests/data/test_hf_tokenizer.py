"""HFTokenizer: ids and chat templates equal transformers'; special tokens and stop ids."""

import numpy as np
import pytest

from lowrank_jax.data import DataError
from lowrank_jax.data.chat_template import ChatTemplateError, render_chat
from lowrank_jax.data.hf_tokenizer import HFTokenizer
from tests.data.tiny_tokenizer import TEMPLATES, write_checkpoint_tokenizer

TEXTS = [
    "The quick brown fox: 12 + 7 = 19.",
    "  leading spaces and\nnew lines\t tabs",
    "<|im_start|>user\nspecial tokens stay whole<|im_end|>",
    "unicode: café, naïve, 東京, 🙂",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": " 19 "},
    {"role": "user", "content": "And 3 * 4?"},
]


def _auto_tokenizer(path):
    transformers = pytest.importorskip("transformers", reason="needs transformers (`compare`)")
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize(
    "add_bos, bos_in_post_processor", [(None, False), (True, False), (None, True)]
)
def test_ids_and_chat_template_equal_transformers(
    tmp_path, template, add_bos, bos_in_post_processor
):
    path = write_checkpoint_tokenizer(
        tmp_path / "tok", template, add_bos=add_bos, bos_in_post_processor=bos_in_post_processor
    )
    ours, theirs = HFTokenizer.from_pretrained(str(path)), _auto_tokenizer(path)
    for text in TEXTS:
        assert ours.encode(text).tolist() == theirs(text)["input_ids"]
        assert (
            ours.encode(text, add_special_tokens=False).tolist()
            == theirs(text, add_special_tokens=False)["input_ids"]
        )
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        theirs.bos_token_id,
        theirs.eos_token_id,
        theirs.pad_token_id,
    )
    assert ours.vocab_size == len(theirs)
    messages = CONVERSATION[1:] if template == "gemma" else CONVERSATION
    for prompt in (False, True):
        expected = theirs.apply_chat_template(
            messages, add_generation_prompt=prompt, tokenize=False
        )
        assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected
        ids = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        got = ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
        assert got.tolist() == list(ids)
    ids = ours.encode(TEXTS[0])
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_special_tokens_and_stop_ids_without_transformers(tmp_path):
    path = write_checkpoint_tokenizer(
        tmp_path, "chatml", add_bos=True, generation={"eos_token_id": [5, 7], "pad_token_id": 9}
    )
    tok = HFTokenizer.from_pretrained(str(path))
    im_end = tok.encode("<|im_end|>", add_special_tokens=False).tolist()
    assert len(im_end) == 1 and tok.eos_id == im_end[0]
    assert tok.eos_ids == (tok.eos_id, 5, 7)
    assert tok.pad_id == tok.encode("<|endoftext|>", add_special_tokens=False)[0]
    # tokenizer.json's post-processor (none here) decides, not add_bos_token (transformers 5).
    assert tok.bos_id not in tok.encode("hi").tolist()
    ids, offsets = tok.encode_with_offsets("What is 12?")
    assert tok.decode(ids) == "What is 12?" and offsets[-1, 1] == len("What is 12?")
    # A special token the vocabulary lacks is added, as transformers does.
    config = (path / "tokenizer_config.json").read_text().replace("<|endoftext|>", "<pad>")
    (path / "tokenizer_config.json").write_text(config)
    padded = HFTokenizer.from_pretrained(str(path))
    assert padded.pad_id == padded.vocab_size - 1 == tok.vocab_size


def test_template_features_render():
    pytest.importorskip("jinja2", reason="chat templates need jinja2 (the `finetune` extra)")
    text = render_chat(
        TEMPLATES["gemma"],
        [{"role": "user", "content": "hi", "meta": {"a": "é<b>"}}, {"role": "assistant"}],
        special_tokens={"bos_token": "<bos>"},
    )
    # tojson without HTML escaping; a None-free message; the generation block renders.
    assert text == '<bos><start_of_turn>user\nhi{"a": "é<b>"}<end_of_turn>\n' + (
        "<start_of_turn>model\n<end_of_turn>\n"
    )
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        render_chat(TEMPLATES["llama3"], [{"role": "tool", "content": "x"}], special_tokens={})


def test_missing_tokenizer_and_template_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="has no tokenizer.json.*save_pretrained"):
        HFTokenizer.from_pretrained(str(tmp_path))
    path = write_checkpoint_tokenizer(tmp_path / "tok")
    tok = HFTokenizer.from_pretrained(str(path))
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_save_pretrained_round_trip(tmp_path):
    tok = HFTokenizer.from_pretrained(str(write_checkpoint_tokenizer(tmp_path / "a", "llama3")))
    tok.save_pretrained(str(tmp_path / "b"))
    again = HFTokenizer.from_pretrained(str(tmp_path / "b"))
    assert again.chat_template == tok.chat_template
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    np.testing.assert_array_equal(again.encode(TEXTS[3]), tok.encode(TEXTS[3]))
