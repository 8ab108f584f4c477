"""enwik8 loader: the whole cache/extract/verify/split path on tiny zips, never the network."""

from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from memtx.data import (
    ENWIK8_SIZE,
    ENWIK8_SPLIT_SIZES,
    ENWIK8_URL,
    CorruptDatasetError,
    DatasetUnavailableError,
    default_cache_dir,
    enwik8_path,
    load_enwik8,
)
from memtx.data.enwik8 import _load_zipped_byte_dataset

FAKE_URL = "http://example.invalid/enwik8.zip"
PAYLOAD = np.random.default_rng(8).integers(0, 256, size=1000, dtype=np.uint8).tobytes()


def _zip_bytes(payload: bytes, member: str = "enwik8") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, payload)
    return buffer.getvalue()


def _load_small(cache: Path, *, download: bool = False, sha1: str | None = "payload"):
    """Run the real pipeline with a 1000-byte "enwik8" split 900/50/50."""
    return _load_zipped_byte_dataset(
        cache,
        name="enwik8",
        url=FAKE_URL,
        expected_size=1000,
        expected_sha1=hashlib.sha1(PAYLOAD).hexdigest() if sha1 == "payload" else sha1,
        split_sizes=(900, 50, 50),
        download=download,
        timeout=1.0,
    )


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch):
    """Any real network call in these tests is a bug: fail loudly instead of hanging."""

    def refuse(*args, **kwargs):
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize(
    "member", [pytest.param("enwik8", id="top-level"), pytest.param("data/enwik8", id="nested")]
)
def test_zip_is_extracted_and_split_90_5_5_style(tmp_path: Path, member: str):
    (tmp_path / "enwik8.zip").write_bytes(_zip_bytes(PAYLOAD, member))

    corpus = _load_small(tmp_path)

    assert (tmp_path / "enwik8").read_bytes() == PAYLOAD
    assert corpus.split_sizes == {"train": 900, "valid": 50, "test": 50}
    assert corpus.train.numpy().tobytes() == PAYLOAD[:900]
    assert corpus.valid.numpy().tobytes() == PAYLOAD[900:950]
    assert corpus.test.numpy().tobytes() == PAYLOAD[950:]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_unzipped_file_is_used_without_a_zip(tmp_path: Path):
    (tmp_path / "enwik8").write_bytes(PAYLOAD)
    corpus = _load_small(tmp_path)
    assert corpus.numpy().tobytes() == PAYLOAD
    assert not (tmp_path / "enwik8.zip").exists()


def test_download_goes_through_a_temp_file_then_extracts(tmp_path: Path, monkeypatch):
    requested = []

    def fake_urlopen(url, timeout):
        requested.append((url, timeout))
        return io.BytesIO(_zip_bytes(PAYLOAD))

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    cache = tmp_path / "new" / "cache"

    corpus = _load_small(cache, download=True)

    assert requested == [(FAKE_URL, 1.0)]
    assert (cache / "enwik8.zip").read_bytes() == _zip_bytes(PAYLOAD)
    assert corpus.test.numpy().tobytes() == PAYLOAD[950:]
    assert sorted(p.name for p in cache.iterdir()) == ["enwik8", "enwik8.zip"]


def test_wrong_size_in_zip_names_the_zip_and_sizes(tmp_path: Path):
    zip_path = tmp_path / "enwik8.zip"
    zip_path.write_bytes(_zip_bytes(PAYLOAD[:999]))

    with pytest.raises(CorruptDatasetError) as error:
        _load_small(tmp_path)

    message = str(error.value)
    assert str(zip_path) in message
    assert "999 bytes" in message and "1,000 bytes" in message
    assert "delete" in message
    # The bad extraction must not be left behind to be trusted next time.
    assert not (tmp_path / "enwik8").exists()


def test_wrong_size_unzipped_file_names_the_file(tmp_path: Path):
    unzipped = tmp_path / "enwik8"
    unzipped.write_bytes(PAYLOAD + b"extra")
    with pytest.raises(CorruptDatasetError, match="1,005 bytes") as error:
        _load_small(tmp_path)
    assert str(unzipped) in str(error.value)
    assert "truncated or corrupt" in str(error.value)


def test_checksum_mismatch_is_reported(tmp_path: Path):
    (tmp_path / "enwik8").write_bytes(PAYLOAD)
    with pytest.raises(CorruptDatasetError, match="SHA-1"):
        _load_small(tmp_path, sha1="0" * 40)
    assert _load_small(tmp_path, sha1=None).numpy().tobytes() == PAYLOAD


@pytest.mark.parametrize(
    "zip_payload",
    [
        pytest.param(b"this is not a zip file", id="not-a-zip"),
        pytest.param(_zip_bytes(PAYLOAD, member="something-else"), id="no-enwik8-member"),
    ],
)
def test_unusable_zip_names_the_zip(tmp_path: Path, zip_payload: bytes):
    zip_path = tmp_path / "enwik8.zip"
    zip_path.write_bytes(zip_payload)
    with pytest.raises(CorruptDatasetError) as error:
        _load_small(tmp_path)
    assert str(zip_path) in str(error.value)


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(urllib.error.URLError("Name or service not known"), id="url-error"),
        pytest.param(TimeoutError("timed out"), id="timeout"),
    ],
)
def test_offline_download_fails_at_once_with_url_and_target_paths(tmp_path, monkeypatch, failure):
    def offline_urlopen(url, timeout):
        raise failure

    monkeypatch.setattr(urllib.request, "urlopen", offline_urlopen)

    with pytest.raises(DatasetUnavailableError) as error:
        _load_small(tmp_path, download=True)

    message = str(error.value)
    assert FAKE_URL in message
    assert str(tmp_path / "enwik8.zip") in message
    assert str(tmp_path / "enwik8") in message
    assert isinstance(error.value, FileNotFoundError)
    assert list(tmp_path.iterdir()) == []  # no half-written temp file left behind


def test_download_false_does_not_touch_the_network(tmp_path: Path):
    with pytest.raises(DatasetUnavailableError, match="download=False") as error:
        _load_small(tmp_path / "cache", download=False)
    assert str(tmp_path / "cache" / "enwik8.zip") in str(error.value)
    assert not (tmp_path / "cache").exists()


def test_public_loader_offline_message_uses_the_real_url_and_env_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTX_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"

    with pytest.raises(DatasetUnavailableError) as error:
        load_enwik8(download=False)
    assert ENWIK8_URL in str(error.value)
    assert str(tmp_path / "env-cache" / "enwik8.zip") in str(error.value)

    # An explicit argument wins over the environment variable.
    with pytest.raises(DatasetUnavailableError, match="explicit"):
        enwik8_path(tmp_path / "explicit", download=False)


def test_default_cache_dir_without_env(monkeypatch):
    monkeypatch.delenv("MEMTX_CACHE", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "memtx"


def test_public_loader_uses_standard_split_on_a_full_size_file(tmp_path: Path):
    # A sparse 10^8-byte file costs no disk or time; the checksum is skipped since it is zeros.
    with open(tmp_path / "enwik8", "wb") as file:
        file.truncate(ENWIK8_SIZE)

    corpus = load_enwik8(tmp_path, download=False, verify_checksum=False)

    assert ENWIK8_SPLIT_SIZES == (90_000_000, 5_000_000, 5_000_000)
    assert (corpus.valid.start, corpus.valid.end) == (90_000_000, 95_000_000)
    assert (corpus.test.start, corpus.test.end) == (95_000_000, 100_000_000)
    assert len(corpus.train) == 90_000_000


def test_public_loader_checks_the_published_sha1(tmp_path: Path):
    with open(tmp_path / "enwik8", "wb") as file:
        file.truncate(ENWIK8_SIZE)
    with pytest.raises(CorruptDatasetError, match="57b8363b814821dc9d47aa4d41f58733519076b2"):
        load_enwik8(tmp_path, download=False)
