"""ByteCorpus: memory-mapped files, folder concatenation, split boundaries and error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from memtx.data import (
    ByteCorpus,
    CorpusNotFoundError,
    DatasetUnavailableError,
    EmptyCorpusError,
    InvalidSplitError,
    load_corpus,
)


def _write(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


@pytest.fixture()
def thousand_bytes() -> bytes:
    return np.random.default_rng(0).integers(0, 256, size=1000, dtype=np.uint8).tobytes()


def test_single_file_is_memory_mapped_and_equals_the_file(tmp_path: Path, thousand_bytes: bytes):
    corpus = ByteCorpus(_write(tmp_path / "text.bin", thousand_bytes))

    assert isinstance(corpus.numpy(), np.memmap)
    assert len(corpus) == 1000
    assert corpus.numpy().tobytes() == thousand_bytes
    assert corpus[17] == thousand_bytes[17]
    assert corpus[10:20].tobytes() == thousand_bytes[10:20]
    assert corpus.tensor(5, 9).dtype == torch.long
    assert corpus.tensor(5, 9).tolist() == list(thousand_bytes[5:9])
    assert corpus.vocab_size == 256


def test_default_fractions_split_train_then_valid_then_test(tmp_path: Path, thousand_bytes: bytes):
    corpus = ByteCorpus(_write(tmp_path / "text.bin", thousand_bytes))

    assert corpus.split_sizes == {"train": 900, "valid": 50, "test": 50}
    train, valid, test = corpus.split("train"), corpus.split("valid"), corpus.split("test")
    assert (train.start, train.end, valid.start, valid.end, test.start, test.end) == (
        0, 900, 900, 950, 950, 1000,
    )
    assert train.numpy().tobytes() == thousand_bytes[:900]
    assert valid.numpy().tobytes() == thousand_bytes[900:950]
    assert test.numpy().tobytes() == thousand_bytes[950:]
    # Indexing is relative to the split.
    assert valid[0] == thousand_bytes[900]
    assert valid[-1] == thousand_bytes[949]
    assert test[2:5].tobytes() == thousand_bytes[952:955]
    assert valid.tensor().tolist() == list(thousand_bytes[900:950])
    assert np.asarray(test).tobytes() == thousand_bytes[950:]


def test_explicit_byte_counts_override_fractions(tmp_path: Path, thousand_bytes: bytes):
    corpus = ByteCorpus(
        _write(tmp_path / "text.bin", thousand_bytes),
        valid_fraction=0.3,
        valid_bytes=7,
        test_bytes=3,
    )

    assert corpus.split_sizes == {"train": 990, "valid": 7, "test": 3}
    assert corpus.valid.numpy().tobytes() == thousand_bytes[990:997]
    assert corpus.test.numpy().tobytes() == thousand_bytes[997:]


def test_fractions_round_down(tmp_path: Path, thousand_bytes: bytes):
    corpus = ByteCorpus(
        _write(tmp_path / "text.bin", thousand_bytes[:999]), valid_fraction=0.1, test_fraction=0.0
    )
    assert corpus.split_sizes == {"train": 900, "valid": 99, "test": 0}


def test_folder_concatenates_sorted_non_hidden_files(tmp_path: Path):
    folder = tmp_path / "corpus"
    _write(folder / "z.txt", b"ZZZ")
    _write(folder / "b.txt", b"bb")
    _write(folder / "sub" / "a.txt", b"sub-a")
    _write(folder / "empty.txt", b"")
    _write(folder / ".hidden", b"HIDDEN")
    _write(folder / ".git" / "config", b"GIT")
    _write(folder / "sub" / ".secret", b"SECRET")

    corpus = ByteCorpus(folder, valid_bytes=1, test_bytes=1)

    # Sorted by relative POSIX path: "b.txt" < "empty.txt" < "sub/a.txt" < "z.txt".
    assert corpus.numpy().tobytes() == b"bbsub-aZZZ"
    assert [(s.relative_path, s.start, s.end) for s in corpus.file_spans] == [
        ("b.txt", 0, 2),
        ("empty.txt", 2, 2),
        ("sub/a.txt", 2, 7),
        ("z.txt", 7, 10),
    ]
    assert [p.name for p in corpus.files] == ["b.txt", "empty.txt", "a.txt", "z.txt"]
    assert corpus.test.numpy().tobytes() == b"Z"


def test_missing_path_error_names_the_path(tmp_path: Path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusNotFoundError, match="does not exist") as error:
        ByteCorpus(missing)
    assert isinstance(error.value, FileNotFoundError)
    assert str(missing) in str(error.value)


@pytest.mark.parametrize(
    "make_path",
    [
        pytest.param(lambda root: _write(root / "empty.txt", b""), id="empty-file"),
        pytest.param(lambda root: (root / "folder").mkdir() or root / "folder", id="empty-folder"),
        pytest.param(
            lambda root: _write(root / "folder" / ".hidden", b"x").parent, id="only-hidden-files"
        ),
        pytest.param(
            lambda root: _write(root / "folder" / "a.txt", b"").parent, id="only-empty-files"
        ),
    ],
)
def test_empty_corpus_error_names_the_path(tmp_path: Path, make_path):
    path = make_path(tmp_path)
    with pytest.raises(EmptyCorpusError) as error:
        ByteCorpus(path)
    assert isinstance(error.value, ValueError)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"valid_fraction": -0.1}, "valid_fraction", id="negative-fraction"),
        pytest.param({"test_fraction": 1.0}, "test_fraction", id="fraction-one"),
        pytest.param({"valid_fraction": 0.5, "test_fraction": 0.5}, "train", id="no-train-left"),
        pytest.param({"valid_fraction": 0.0001}, "rounds down", id="fraction-rounds-to-empty"),
        pytest.param({"valid_bytes": -1}, "valid_bytes", id="negative-bytes"),
        pytest.param({"valid_bytes": 600, "test_bytes": 400}, "train", id="bytes-leave-no-train"),
    ],
)
def test_invalid_split_configuration(tmp_path: Path, thousand_bytes: bytes, kwargs, message):
    path = _write(tmp_path / "text.bin", thousand_bytes)
    with pytest.raises(InvalidSplitError, match=message):
        ByteCorpus(path, **kwargs)


def test_unknown_split_name(tmp_path: Path, thousand_bytes: bytes):
    corpus = ByteCorpus(_write(tmp_path / "text.bin", thousand_bytes))
    with pytest.raises(InvalidSplitError, match="validation"):
        corpus.split("validation")


def test_load_corpus_from_path_and_folder(tmp_path: Path, thousand_bytes: bytes):
    path = _write(tmp_path / "text.bin", thousand_bytes)
    assert load_corpus(str(path)).numpy().tobytes() == thousand_bytes
    assert load_corpus(path, valid_fraction=0.1).split_sizes["valid"] == 100
    assert load_corpus(tmp_path).numpy().tobytes() == thousand_bytes


def test_load_corpus_enwik8_offline_fails_fast(tmp_path: Path):
    with pytest.raises(DatasetUnavailableError, match="mattmahoney"):
        load_corpus("enwik8", cache_dir=tmp_path, download=False)
    with pytest.raises(InvalidSplitError, match="standard split"):
        load_corpus("enwik8", cache_dir=tmp_path, valid_fraction=0.1)
