"""SentencePiece GGUF vocabularies (``tokenizer.ggml.model == "llama"``: LLaMA 1/2, Mistral,
Gemma): a tiny hand-made vocabulary written with the ``gguf`` package tokenizes as llama.cpp
does (merges in score order, byte fallback, the "▁" prefix) and as transformers' GGUF
tokenizer does."""

import pytest

from lowrank_jax.models.gguf import gguf_tokenizer
from lowrank_jax.models.hf_config import UnsupportedCheckpointError
from tests.models.gguf_writer import write_vocab

pytest.importorskip("gguf", reason="needs the gguf package (the `finetune` extra)")
pytest.importorskip("tokenizers", reason="needs the tokenizers package")

S = "\u2581"  # SentencePiece's space
# multi-character pieces, best (first merged) first: scores -1, -2, ...
MERGED = [
    S + "t", "he", S + "a", "in", S + "the", "er", S + "c", "at", S + "cat", S + "w",
    "or", "ld", S + "wor", S + "world", S + "he", "ll", "llo", S + "hello", "on", S + "on",
    "ing", S + "s", "it", S + "sit", "th",
]  # fmt: skip
CHARS = [S, "t", "h", "e", "a", "i", "n", "r", "c", "w", "o", "l", "d", "s", "g", "T", "!", ","]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
TOKENS = ["<unk>", "<s>", "</s>", *BYTES, *MERGED, *CHARS, "<sep>", "<|end|>", "<unused0>"]
# llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
TYPES = [2, 3, 3] + [6] * 256 + [1] * (len(MERGED) + len(CHARS)) + [4, 3, 5]
SCORES = (
    [0.0] * 259
    + [-1.0 - i for i in range(len(MERGED))]
    + [-100.0 - i for i in range(len(CHARS))]
    + [0.0] * 3
)
ID = {t: i for i, t in enumerate(TOKENS)}
SPECIAL_IDS = dict(unk=0, bos=1, eos=2)
PLAIN = [
    "the cat",
    "hello world",
    "sitting on the hello",
    "Zé 😀 the",
    "a  b",
    "hello\nworld",
    "the cat!",
    "",
]


def _pieces(*names):
    return [ID[n] for n in names]


def _write(tmp_path, name="v.gguf", scores=SCORES, **kwargs):
    kwargs.setdefault("special_ids", SPECIAL_IDS)
    return write_vocab(tmp_path / name, TOKENS, scores=scores, types=TYPES, **kwargs)


@pytest.fixture
def tokenizer(tmp_path):
    return gguf_tokenizer(_write(tmp_path))


def test_ids_follow_scores_with_byte_fallback(tokenizer):
    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False).tolist()

    assert ids("the cat") == _pieces(S + "the", S + "cat")
    assert ids("hello world") == _pieces(S + "hello", S + "world")
    # "▁sit" + "t" + "ing": "▁sit" outranks "it"+"t" and leaves "t", "ing" behind
    assert ids("sitting on") == _pieces(S + "sit", "t", "ing", S + "on")
    # llama.cpp prefixes "▁" however the text starts
    assert ids("  the") == _pieces(S, S, S + "the")
    assert ids(" ") == _pieces(S, S)
    # characters without a piece are their UTF-8 bytes
    assert ids("Zé") == _pieces(S, "<0x5A>", "<0xC3>", "<0xA9>")
    assert ids("the 😀") == _pieces(S + "the", S, "<0xF0>", "<0x9F>", "<0x98>", "<0x80>")
    assert ids("hello\nworld") == _pieces(S + "hello", "<0x0A>", "w", "or", "ld")
    assert ids("") == []


def test_merge_order_is_the_score_order(tmp_path):
    """With "th" scored above "▁t", "▁the" is no longer reachable: "▁" "th" "e"."""
    scores = list(SCORES)
    scores[ID["th"]] = 1.0
    tok = gguf_tokenizer(_write(tmp_path, scores=scores))
    assert tok.encode("the", add_special_tokens=False).tolist() == _pieces(S, "th", "e")


def test_special_and_user_defined_tokens_are_matched_whole(tokenizer):
    """As llama.cpp: control, unknown and user-defined tokens are cut out of the text first,
    and the text after each gets its "▁" prefix again."""
    assert tokenizer.encode("the<sep>cat", add_special_tokens=False).tolist() == _pieces(
        S + "the", "<sep>", S + "cat"
    )
    assert tokenizer.encode("the<|end|>cat").tolist() == _pieces(
        "<s>", S + "the", "<|end|>", S + "cat"
    )
    assert tokenizer.encode("<unk>at", add_special_tokens=False).tolist() == _pieces(
        "<unk>", S + "a", "t"
    )
    assert tokenizer.decode(_pieces("<s>", S + "the", "<|end|>", "</s>")) == "the"


def test_decode_inverts_encode(tokenizer):
    for text in [*PLAIN, "  leading spaces", "trailing  ", "東京 ✓ naïve\ttab"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bos_is_added_as_the_file_says(tmp_path):
    """``add_bos_token`` true or absent (llama.cpp's SentencePiece default): bos first."""
    for add_bos, expected in [(True, [ID["<s>"]]), (None, [ID["<s>"]]), (False, [])]:
        name = f"bos_{add_bos}.gguf"
        tok = gguf_tokenizer(_write(tmp_path, name, add_bos=add_bos))
        assert tok.encode("the").tolist() == expected + _pieces(S + "the")
        assert tok.encode("the", add_special_tokens=False).tolist() == _pieces(S + "the")
        assert (tok.bos_id, tok.eos_id) == (ID["<s>"], ID["</s>"])


def test_gemma_style_vocabulary_without_space_prefix(tmp_path):
    tok = gguf_tokenizer(_write(tmp_path, arch="gemma3", add_space_prefix=False))
    assert tok.encode("the cat").tolist() == _pieces("<s>", "t", "he", S + "cat")
    assert tok.encode("  the", add_special_tokens=False).tolist() == _pieces(S, S + "the")
    for text in [*PLAIN, "  leading", " x"]:
        assert tok.decode(tok.encode(text)) == text


# transformers' tokenizer builds a Metaspace pre-tokenizer (prefix only at the start of the
# text, and none when the text already starts with a space), where llama.cpp always prefixes
# and again after each special token: the two agree on text without either
PARITY = [*PLAIN, "the<sep>", "hello </s>", "T, the!", "cat<s>"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_ids_equal_transformers_gguf_tokenizer(tmp_path, arch):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is an optional dependency (the parity reference)"
    )
    gemma = arch == "gemma3"
    path = _write(tmp_path, arch=arch, add_space_prefix=False if gemma else None)
    ours = gguf_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="v.gguf")
    texts = PARITY + (["  the", "<s>hello", "the<sep>cat", "<unk>x"] if gemma else [])
    for text in texts:
        assert ours.encode(text).tolist() == theirs(text)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(list(ids), skip_special_tokens=True), text


@pytest.mark.parametrize("model", ["bert", "t5"])
def test_other_vocabularies_are_clear_errors(tmp_path, model):
    path = _write(tmp_path, model=model)
    expected = f"'{model}' is not supported.*tokenizer.json"
    with pytest.raises(UnsupportedCheckpointError, match=expected):
        gguf_tokenizer(path)
