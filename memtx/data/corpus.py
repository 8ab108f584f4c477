"""Byte-level text corpora (vocabulary of 256 byte values) with train/valid/test splits.

A :class:`ByteCorpus` is built from a single file or from a folder of files:

* a single file is memory-mapped with :class:`numpy.memmap` (``uint8``), so a corpus of
  hundreds of megabytes costs no RAM until its bytes are touched;
* a folder is read into one in-memory ``uint8`` array: all regular, non-hidden files below it
  (hidden means any path component starting with ``.``), sorted by their relative POSIX path and
  concatenated with no separator. :attr:`ByteCorpus.file_spans` records where each file landed.

Splits are contiguous byte ranges taken in a fixed order: **train is the first bytes, then
valid, then test** (the enwik8 convention). Sizes come either from fractions of the corpus
(``valid_fraction``/``test_fraction``, rounded down) or from explicit byte counts
(``valid_bytes``/``test_bytes``, which win over the fractions); train gets everything else.

:func:`load_corpus` turns a user-facing spec (a path, or the dataset name ``"enwik8"``) into a
corpus.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BYTE_VOCAB_SIZE",
    "SPLIT_NAMES",
    "ByteCorpus",
    "ByteSplit",
    "CorpusNotFoundError",
    "EmptyCorpusError",
    "FileSpan",
    "InvalidSplitError",
    "load_corpus",
]

BYTE_VOCAB_SIZE = 256
SPLIT_NAMES: tuple[str, str, str] = ("train", "valid", "test")
DEFAULT_VALID_FRACTION = 0.05
DEFAULT_TEST_FRACTION = 0.05


class CorpusNotFoundError(FileNotFoundError):
    """The corpus path does not exist (or is neither a file nor a folder)."""


class EmptyCorpusError(ValueError):
    """The corpus file, or every file in the corpus folder, is empty."""


class InvalidSplitError(ValueError):
    """Split fractions or byte counts are out of range, or a split name is unknown."""


@dataclass(frozen=True)
class ByteSplit:
    """A contiguous byte range ``[start, end)`` of a :class:`ByteCorpus`; a view, never a copy."""

    corpus: ByteCorpus
    name: str
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    def numpy(self) -> np.ndarray:
        """The split's bytes as a ``uint8`` array view (of the memory map for single files)."""
        return self.corpus.numpy()[self.start : self.end]

    def __getitem__(self, index: int | slice) -> Any:
        """Index relative to the split: an ``int`` gives a Python int, a slice a ``uint8`` array."""
        if isinstance(index, slice):
            return self.numpy()[index]
        return int(self.numpy()[index])

    def tensor(self, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Bytes ``[start, stop)`` of the split (relative offsets) as a 1-D ``LongTensor``."""
        return _to_long_tensor(self.numpy()[start:stop])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"ByteSplit(name={self.name!r}, start={self.start}, end={self.end}, len={len(self)})"


@dataclass(frozen=True)
class FileSpan:
    """Where one file of a folder corpus sits in the concatenated byte stream."""

    relative_path: str
    start: int
    end: int


class ByteCorpus:
    """Bytes of a file or folder, split into train / valid / test byte ranges (in that order).

    Args:
        path: a file (memory-mapped) or a folder (its non-hidden files concatenated in sorted
            relative-path order, held in memory).
        valid_fraction: fraction of the bytes for the valid split (rounded down). Ignored when
            ``valid_bytes`` is given.
        test_fraction: fraction of the bytes for the test split (rounded down). Ignored when
            ``test_bytes`` is given.
        valid_bytes: explicit size of the valid split in bytes.
        test_bytes: explicit size of the test split in bytes.

    Raises:
        CorpusNotFoundError: ``path`` does not exist.
        EmptyCorpusError: the file, or every file in the folder, is empty.
        InvalidSplitError: fractions/counts leave no byte for train, are negative, or a
            positive fraction rounds down to an empty split.
    """

    vocab_size: int = BYTE_VOCAB_SIZE

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        valid_fraction: float = DEFAULT_VALID_FRACTION,
        test_fraction: float = DEFAULT_TEST_FRACTION,
        valid_bytes: int | None = None,
        test_bytes: int | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self._data, self.file_spans = _read_bytes(self.path)
        total = int(self._data.shape[0])
        valid_size = _split_size("valid", total, valid_fraction, valid_bytes, self.path)
        test_size = _split_size("test", total, test_fraction, test_bytes, self.path)
        train_size = total - valid_size - test_size
        if train_size <= 0:
            raise InvalidSplitError(
                f"corpus {self.path} has {total} bytes, but valid ({valid_size}) + test "
                f"({test_size}) leave {train_size} for train; use smaller valid/test sizes"
            )
        self._boundaries = {
            "train": (0, train_size),
            "valid": (train_size, train_size + valid_size),
            "test": (train_size + valid_size, total),
        }

    @property
    def files(self) -> list[Path]:
        """The files making up the corpus, in concatenation order."""
        if self.path.is_file():
            return [self.path]
        return [self.path / span.relative_path for span in self.file_spans]

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: end - start for name, (start, end) in self._boundaries.items()}

    def __len__(self) -> int:
        return int(self._data.shape[0])

    def numpy(self) -> np.ndarray:
        """All bytes as a ``uint8`` array (a memory map for single-file corpora)."""
        return self._data

    def __getitem__(self, index: int | slice) -> Any:
        """An ``int`` gives a Python int, a slice a ``uint8`` array view."""
        if isinstance(index, slice):
            return np.asarray(self._data[index])
        return int(self._data[index])

    def tensor(self, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Bytes ``[start, stop)`` as a 1-D ``LongTensor`` (a copy: int64 is 8x the bytes)."""
        return _to_long_tensor(self._data[start:stop])

    def split(self, name: str) -> ByteSplit:
        """The ``"train"``, ``"valid"`` or ``"test"`` byte range as a :class:`ByteSplit` view."""
        if name not in self._boundaries:
            raise InvalidSplitError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        start, end = self._boundaries[name]
        return ByteSplit(self, name, start, end)

    @property
    def train(self) -> ByteSplit:
        return self.split("train")

    @property
    def valid(self) -> ByteSplit:
        return self.split("valid")

    @property
    def test(self) -> ByteSplit:
        return self.split("test")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={size}" for name, size in self.split_sizes.items())
        return f"ByteCorpus(path={str(self.path)!r}, bytes={len(self)}, {sizes})"


def load_corpus(
    spec: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    valid_fraction: float | None = None,
    test_fraction: float | None = None,
) -> ByteCorpus:
    """Load a corpus from a spec: the dataset name ``"enwik8"``, or a file/folder path.

    ``"enwik8"`` always means the dataset (cached under ``cache_dir``, downloaded if allowed, with
    the standard 90M/5M/5M split); to read a local file that happens to be called ``enwik8``, pass
    a path such as ``"./enwik8"``. For paths, the split fractions default to 0.05 each.
    """
    if isinstance(spec, str) and spec == "enwik8":
        if valid_fraction is not None or test_fraction is not None:
            raise InvalidSplitError(
                "enwik8 uses the standard split (90M train / 5M valid / 5M test); "
                "do not pass valid_fraction/test_fraction for it"
            )
        # Imported here because enwik8.py builds on ByteCorpus from this module.
        from memtx.data.enwik8 import load_enwik8

        return load_enwik8(cache_dir, download=download)
    return ByteCorpus(
        spec,
        valid_fraction=DEFAULT_VALID_FRACTION if valid_fraction is None else valid_fraction,
        test_fraction=DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction,
    )


def _to_long_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.int64))


def _split_size(
    name: str, total: int, fraction: float, explicit_bytes: int | None, path: Path
) -> int:
    if explicit_bytes is not None:
        if isinstance(explicit_bytes, bool) or not isinstance(explicit_bytes, (int, np.integer)):
            raise InvalidSplitError(f"{name}_bytes must be an int, got {explicit_bytes!r}")
        if explicit_bytes < 0:
            raise InvalidSplitError(f"{name}_bytes must be >= 0, got {explicit_bytes}")
        return int(explicit_bytes)
    if isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0.0 <= fraction < 1.0:
        raise InvalidSplitError(f"{name}_fraction must be in [0, 1), got {fraction!r}")
    size = int(total * fraction)
    if fraction > 0 and size == 0:
        raise InvalidSplitError(
            f"{name}_fraction={fraction} of the {total} bytes of {path} rounds down to an empty "
            f"{name} split; use a larger corpus, a larger fraction, or pass {name}_bytes"
        )
    return size


def _read_bytes(path: Path) -> tuple[np.ndarray, list[FileSpan]]:
    if path.is_file():
        size = path.stat().st_size
        if size == 0:
            raise EmptyCorpusError(f"corpus file {path} is empty; point to a file with text in it")
        # Read-only map: several data loaders may share one corpus file safely.
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(size,)), []
    if path.is_dir():
        return _read_folder(path)
    if path.exists():
        raise CorpusNotFoundError(f"corpus path {path} is neither a regular file nor a folder")
    raise CorpusNotFoundError(
        f"corpus path {path} does not exist; pass an existing text file or folder of text files"
    )


def _read_folder(folder: Path) -> tuple[np.ndarray, list[FileSpan]]:
    files: list[tuple[str, Path]] = []
    for directory, subdirectories, filenames in os.walk(folder):
        # Pruning in place stops os.walk from descending into hidden folders (.git, .cache, ...).
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        for filename in filenames:
            if filename.startswith("."):
                continue
            file_path = Path(directory) / filename
            if file_path.is_file():
                files.append((file_path.relative_to(folder).as_posix(), file_path))
    files.sort(key=lambda item: item[0])

    sizes = [file_path.stat().st_size for _, file_path in files]
    total = sum(sizes)
    if total == 0:
        what = "has no non-hidden files" if not files else "contains only empty files"
        raise EmptyCorpusError(
            f"corpus folder {folder} {what}; put text files in it or point to a file instead"
        )
    data = np.empty(total, dtype=np.uint8)
    spans: list[FileSpan] = []
    offset = 0
    for (relative_path, file_path), size in zip(files, sizes):
        data[offset : offset + size] = np.fromfile(file_path, dtype=np.uint8, count=size)
        spans.append(FileSpan(relative_path, offset, offset + size))
        offset += size
    return data, spans
