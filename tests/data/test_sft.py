"""Fine-tuning records: JSONL checks, response-only masks, packing, the held-out split."""

import json

import numpy as np
import pytest

from lowrank_jax.data import ByteTokenizer, DataError
from lowrank_jax.data.hf_tokenizer import HFTokenizer
from lowrank_jax.data.sft import (
    Example,
    Tokenized,
    parse_record,
    prompt_ids,
    read_examples,
    read_jsonl,
    tokenize_example,
)
from lowrank_jax.data.sft_packing import pack_examples, split_examples
from tests.data.tiny_tokenizer import write_checkpoint_tokenizer

RECORDS = [
    {"prompt": "What is 12 + 7?", "response": "19"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "3 * 4?"},
            {"role": "assistant", "content": "12"},
            {"role": "user", "content": "And 45 - 17?"},
            {"role": "assistant", "content": "28"},
        ],
        "answer": 28,
    },
    {"text": "The quick brown fox."},
]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def tokenizer(tmp_path):
    return HFTokenizer.from_pretrained(str(write_checkpoint_tokenizer(tmp_path / "tok")))


def test_reads_the_three_kinds(tmp_path):
    path = _write(
        tmp_path / "d.jsonl", [json.dumps(r) for r in RECORDS[:2]] + ["", json.dumps(RECORDS[2])]
    )
    examples = read_jsonl(path)
    assert [e.kind for e in examples] == ["prompt_response", "messages", "text"]
    assert [e.answer for e in examples] == ["19", "28", None]
    assert examples[0].messages[1] == {"role": "assistant", "content": "19"}
    assert examples[2].where == f"{path}:4"  # blank lines keep the numbering
    (tmp_path / "a.txt").write_text("plain text document")
    assert read_examples(str(tmp_path / "a.txt"))[0].text == "plain text document"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x", "response": "y"', r"d.jsonl:2: not valid JSON"),
        ('{"prompt": "x"}', r"d.jsonl:2: missing field 'response'"),
        ('{"response": "y"}', r"d.jsonl:2: missing field 'prompt'"),
        ('{"prompt": "x", "response": 3}', r"field 'response' must be a string, got int"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\]: missing field 'content'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
        ('{"messages": []}', "non-empty list"),
        (
            '{"input": "x"}',
            r"needs 'prompt' and 'response', 'messages', or 'text'; it has \['input'\]",
        ),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt": "x", "response": "y", "answer": [1]}', "'answer' must be a string or"),
    ],
)
def test_bad_lines_name_the_file_line_and_field(tmp_path, line, message):
    path = _write(tmp_path / "d.jsonl", [json.dumps(RECORDS[0]), line])
    with pytest.raises(DataError, match=message):
        read_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(str(tmp_path / "none.jsonl"))
    with pytest.raises(DataError, match="no records"):
        read_jsonl(_write(tmp_path / "e.jsonl", [""]))


def _masked_text(tokenizer, tokenized):
    ids = tokenized.ids[tokenized.mask]
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_chat_template_mask_covers_every_response_and_its_end_tokens(tokenizer):
    prompt_response = tokenize_example(parse_record(RECORDS[0], "x:1"), tokenizer)
    rendered = tokenizer.apply_chat_template(list(prompt_response.example.messages))
    assert tokenizer.decode(prompt_response.ids, skip_special_tokens=False) == rendered
    assert _masked_text(tokenizer, prompt_response) == "19<|im_end|>\n"
    chat = tokenize_example(parse_record(RECORDS[1], "x:2"), tokenizer)
    assert _masked_text(tokenizer, chat) == "12<|im_end|>\n28<|im_end|>\n"
    text = tokenize_example(parse_record(RECORDS[2], "x:3"), tokenizer)
    assert text.mask.all() and text.ids[-1] == tokenizer.eos_id


def test_mask_agrees_with_transformers_assistant_mask(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs transformers (`compare`)")
    path = write_checkpoint_tokenizer(tmp_path / "gemma", "gemma")
    ours = HFTokenizer.from_pretrained(str(path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(path))
    messages = RECORDS[1]["messages"][1:]
    out = theirs.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    tokenized = tokenize_example(parse_record({"messages": messages}, "x:1"), ours)
    assert tokenized.ids.tolist() == list(out["input_ids"])
    hf_mask = np.asarray(out["assistant_masks"], bool)  # the {% generation %} content only
    assert (tokenized.mask | ~hf_mask).all()
    extra = tokenized.ids[tokenized.mask & ~hf_mask]
    assert ours.decode(extra, skip_special_tokens=False) == "<end_of_turn>\n<end_of_turn>\n"


def test_without_a_template_the_prompt_is_not_a_target(tokenizer):
    byte = tokenize_example(parse_record(RECORDS[0], "x:1"), ByteTokenizer())
    n_prompt = len("What is 12 + 7?")
    assert not byte.mask[:n_prompt].any() and byte.mask[n_prompt:].all()
    assert bytes(byte.ids[n_prompt:-1].tolist()) == b"19" and byte.ids[-1] == ByteTokenizer.eos_id
    tokenizer.chat_template = None
    plain = tokenize_example(parse_record(RECORDS[0], "x:1"), tokenizer)
    assert tokenizer.decode(plain.ids[plain.mask]) == "19"
    np.testing.assert_array_equal(prompt_ids(plain.example, tokenizer), plain.ids[~plain.mask])
    with pytest.raises(DataError, match="x:2: a 'messages' record needs a tokenizer with a chat"):
        tokenize_example(parse_record(RECORDS[1], "x:2"), tokenizer)


def test_prompt_ids_stop_before_the_last_answer(tokenizer):
    example = parse_record(RECORDS[1], "x:2")
    text = tokenizer.decode(prompt_ids(example, tokenizer), skip_special_tokens=False)
    assert text.endswith("And 45 - 17?<|im_end|>\n<|im_start|>assistant\n")
    assert "12<|im_end|>" in text and "28" not in text


def _doc(n, response_from, kind="prompt_response"):
    mask = np.arange(n) >= response_from
    return Tokenized(np.arange(100, 100 + n, dtype=np.int32), mask, Example(kind, where=f"f:{n}"))


def test_packing_keeps_documents_whole_and_apart():
    docs = [_doc(5, 2), _doc(7, 3), _doc(3, 1), _doc(4, 0, "text")]
    data, stats = pack_examples(docs, seq_len=8, pad_id=0)
    # first fit: [5+3], [7], [4]
    assert data.segment_ids.tolist() == [
        [1, 1, 1, 1, 1, 2, 2, 2],
        [1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
    ]
    assert data.positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert data.inputs[0].tolist() == [100, 101, 102, 103, 104, 100, 101, 102]
    # targets: the next token of the same document; the last slot of a document has none
    assert data.targets[0, :4].tolist() == [101, 102, 103, 104]
    assert data.loss_mask[0].tolist() == [0, 1, 1, 1, 0, 1, 1, 0]
    assert data.loss_mask[1].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert (stats.rows, stats.examples, stats.tokens, stats.loss_tokens) == (3, 4, 19, 12)
    assert stats.fill == 19 / 24
    unpacked, _ = pack_examples(docs, seq_len=8, pad_id=0, pack=False)
    assert unpacked.inputs.shape == (4, 8) and unpacked.segment_ids.max() == 1
    assert set(data.batch(np.array([2, 0]))) == set(data._fields)


def test_overlong_examples_truncate_with_counts_or_fail():
    docs = [_doc(12, 3), _doc(12, 10), _doc(20, 0, "text"), _doc(4, 1)]
    data, stats = pack_examples(docs, seq_len=8, pad_id=0)
    assert (stats.truncated, stats.dropped, stats.split) == (1, 1, 1)
    assert stats.examples == 3  # the one whose response began after the cut is gone
    assert data.segment_ids.max(axis=1).tolist() == [1, 1, 1, 2]  # 8 | 8 | 8 | 4+4
    with pytest.raises(DataError, match="f:12: 12 tokens, more than --max-seq-len 8"):
        pack_examples(docs, seq_len=8, pad_id=0, overflow="error")
    with pytest.raises(DataError, match="overflow 'cut'"):
        pack_examples(docs, seq_len=8, pad_id=0, overflow="cut")
    with pytest.raises(DataError, match="no example fits"):
        pack_examples([_doc(12, 10)], seq_len=8, pad_id=0)


def test_held_out_split_is_seeded_and_keeps_file_order():
    examples = [Example("text", text=str(i)) for i in range(20)]
    train, held = split_examples(examples, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert [e.text for e in train + held] != [e.text for e in examples]
    assert [int(e.text) for e in held] == sorted(int(e.text) for e in held)
    assert split_examples(examples, 0.25, seed=1) == (train, held)
    assert split_examples(examples, 0.25, seed=2)[1] != held
    assert len(split_examples(examples[:2], 0.01)[1]) == 1  # at least one held out
    with pytest.raises(DataError, match="too few"):
        split_examples(examples[:1], 0.5)
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        split_examples(examples, 1.0)
