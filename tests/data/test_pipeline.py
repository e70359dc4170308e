"""The offline text pipeline: corpus, tokenizers, packing, split, resumable batches, errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_jax import data
from lowrank_jax.data import BatchIterator, ByteTokenizer, DataError, IteratorState


def test_embedded_corpus_is_the_kjv():
    text = data.embedded_corpus()
    assert len(text) == 4_404_412
    assert text.startswith("Ge1:1 In the beginning God created the heaven and the earth.")
    assert text.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert text.count("\n") == 31_102
    name, documents = data.resolve_source(None)
    assert "King James" in name and documents == [text]


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    text = "naïve café — ünïcödé"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(list(ids) + [tok.eos_id]) == text
    assert tok.vocab_size == 259 and {tok.pad_id, tok.bos_id, tok.eos_id} == {256, 257, 258}


def test_pack_appends_eos_and_drops_the_tail():
    streams = [np.arange(5, dtype=np.int32), np.arange(10, 13, dtype=np.int32)]
    blocks = data.pack(streams, eos_id=99, seq_len=3)
    np.testing.assert_array_equal(blocks, [[0, 1, 2, 3], [4, 99, 10, 11]])
    assert data.pack(streams, eos_id=99, seq_len=9).shape == (1, 10)
    with pytest.raises(DataError, match="10 tokens, fewer than one sequence of --seq-len 10"):
        data.pack(streams, eos_id=99, seq_len=10)


def test_split_is_deterministic_and_disjoint():
    docs = [f"document number {i} " * 7 for i in range(40)]
    a = data.build_dataset("t", docs, ByteTokenizer(), seq_len=31, val_fraction=0.1)
    b = data.build_dataset("t", docs, ByteTokenizer(), seq_len=31, val_fraction=0.1)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert a.seq_len == 31 and a.train.shape[1] == 32
    n = len(a.train) + len(a.val)
    assert len(a.val) == n // 10
    everything = data.pack([ByteTokenizer().encode(d) for d in docs], 258, 31)
    np.testing.assert_array_equal(a.val, everything[9::10])


@settings(max_examples=25, deadline=None)
@given(
    n_blocks=st.integers(4, 40),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    split=st.integers(0, 30),
    total=st.integers(1, 40),
)
def test_iterator_resumes_exactly(n_blocks, batch, seed, split, total):
    blocks = np.arange(n_blocks * 3).reshape(n_blocks, 3)
    straight = BatchIterator(blocks, batch, seed)
    expected = [next(straight) for _ in range(total)]
    first = BatchIterator(blocks, batch, seed)
    got = [next(first) for _ in range(min(split, total))]
    resumed = BatchIterator(blocks, batch, seed, IteratorState(*first.state))
    got += [next(resumed) for _ in range(total - len(got))]
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_iterator_visits_every_block_once_per_epoch():
    blocks = np.arange(10).reshape(10, 1)
    it = BatchIterator(blocks, 3, seed=7)
    epoch0 = np.concatenate([next(it) for _ in range(3)]).ravel()
    assert len(set(epoch0)) == 9 and it.state == IteratorState(0, 9)
    epoch1 = np.concatenate([next(it) for _ in range(3)]).ravel()
    assert it.state.epoch == 1 and len(set(epoch1)) == 9
    assert not np.array_equal(epoch0, epoch1)


def test_local_files_glob_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "skip.md").write_text("not text")
    assert data.file_documents(str(tmp_path)) == ["first file", "second file"]
    assert data.file_documents(str(tmp_path / "*.md")) == ["not text"]
    assert data.file_documents(str(tmp_path / "a.txt")) == ["first file"]
    name, docs = data.resolve_source(str(tmp_path / "*.txt"))
    assert docs == ["first file", "second file"]


def test_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="no such file") as err:
        data.resolve_source(str(tmp_path / "missing" / "*.txt"))
    assert "\n" not in str(err.value)
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="the corpus is empty"):
        data.resolve_source(str(tmp_path / "empty.txt"))
    (tmp_path / "small.txt").write_text("tiny corpus")
    _, docs = data.resolve_source(str(tmp_path / "small.txt"))
    with pytest.raises(DataError, match="fewer than one sequence of --seq-len 64"):
        data.build_dataset("small", docs, ByteTokenizer(), seq_len=64)
    with pytest.raises(DataError, match="fewer than --batch-size 8"):
        data.build_dataset("small", docs * 3, ByteTokenizer(), seq_len=4, min_train_blocks=8)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not UTF-8"):
        data.file_documents(str(tmp_path / "binary.txt"))
    with pytest.raises(DataError, match="choose one of: byte, bpe"):
        data.make_tokenizer("sentencepiece")


def test_bpe_tokenizer_trained_locally(tmp_path):
    pytest.importorskip("tokenizers", reason="needs `tokenizers` (the `data` extra)")
    docs = ["the quick brown fox jumps over the lazy dog. " * 20, "a second document here. " * 20]
    path = str(tmp_path / "tokenizer.json")
    tok = data.make_tokenizer("bpe", docs, vocab_size=300, path=path)
    assert tok.vocab_size <= 300 and tok.eos_id is not None
    ids = tok.encode(docs[0])
    assert len(ids) < len(docs[0]) / 2  # merges learnt
    assert tok.decode(ids) == docs[0]
    again = data.make_tokenizer("bpe", ["unrelated text"], vocab_size=300, path=path)
    np.testing.assert_array_equal(again.encode(docs[1]), tok.encode(docs[1]))
    ds = data.build_dataset("bpe", docs, tok, seq_len=16)
    assert ds.train.max() < tok.vocab_size


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip(
        "tensorflow_datasets", reason="needs tensorflow-datasets (the `data` extra)"
    )
    with tfds.testing.mock_data(num_examples=7):
        name, docs = data.resolve_source("tfds:tiny_shakespeare:train")
        assert name == "tfds:tiny_shakespeare:train"
        assert len(docs) == 7 and all(isinstance(d, str) for d in docs)
        with pytest.raises(DataError, match="no feature 'content'"):
            data.tfds_documents("tiny_shakespeare", text_key="content")
    ds = data.build_dataset(name, docs, ByteTokenizer(), seq_len=4, val_fraction=0.2)
    assert ds.train.shape[1] == 5


def test_folder_without_text_files_says_what_is_read_and_a_glob_reads_the_rest(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    with pytest.raises(DataError) as err:
        data.resolve_source(str(tmp_path))
    text = str(err.value)
    assert "the directory has no *.txt files" in text and "\n" not in text
    assert f"'{tmp_path}/**/*.py'" in text
    assert data.resolve_source(str(tmp_path / "**" / "*.py"))[1] == ["x = 1\n"]


def test_binary_files_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("fine text")
    (tmp_path / "b.txt").write_bytes(b"text with a \x00 inside")
    with pytest.raises(DataError) as err:
        data.resolve_source(str(tmp_path))
    assert str(err.value) == (
        f"--data: {tmp_path / 'b.txt'} is not a text file (a NUL byte at offset 12: binary "
        "data); remove it or narrow --data to text files"
    )
