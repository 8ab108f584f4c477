"""The enwik8 benchmark (first 10^8 bytes of a 2006 English Wikipedia XML dump).

Files live in a cache folder: the ``cache_dir`` argument, else the ``MEMTX_CACHE`` environment
variable, else ``~/.cache/memtx``. :func:`load_enwik8` looks for, in order:

1. ``<cache>/enwik8`` (the unzipped file) - used as is;
2. ``<cache>/enwik8.zip`` - extracted to ``<cache>/enwik8``;
3. otherwise, if ``download=True``, the zip is fetched from :data:`ENWIK8_URL` into a temporary
   file in the cache folder and renamed to ``enwik8.zip`` once complete, then extracted.

The unzipped file must be exactly 100,000,000 bytes with the published SHA-1; anything else is
reported as corrupt or truncated (delete it and retry). Without network access (or with
``download=False`` and nothing cached) loading fails at once with a message naming the URL and
where to put the file by hand. The split is the standard one: first 90M bytes train, next 5M
valid, last 5M test.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from memtx.data.corpus import ByteCorpus

__all__ = [
    "ENWIK8_SHA1",
    "ENWIK8_SIZE",
    "ENWIK8_SPLIT_SIZES",
    "ENWIK8_URL",
    "CorruptDatasetError",
    "DatasetUnavailableError",
    "default_cache_dir",
    "enwik8_path",
    "load_enwik8",
]

logger = logging.getLogger(__name__)

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SIZE = 100_000_000
# Published by the Hutter Prize / Large Text Compression Benchmark for the unzipped file.
ENWIK8_SHA1 = "57b8363b814821dc9d47aa4d41f58733519076b2"
ENWIK8_SPLIT_SIZES: tuple[int, int, int] = (90_000_000, 5_000_000, 5_000_000)
CACHE_ENV_VAR = "MEMTX_CACHE"
DEFAULT_DOWNLOAD_TIMEOUT_S = 10.0


class DatasetUnavailableError(FileNotFoundError):
    """The dataset is not cached and could not (or may not) be downloaded."""


class CorruptDatasetError(ValueError):
    """A cached dataset file has the wrong size or checksum, or its zip is unreadable."""


def default_cache_dir() -> Path:
    """``$MEMTX_CACHE`` if set (and non-empty), else ``~/.cache/memtx``."""
    from_env = os.environ.get(CACHE_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "memtx"


def enwik8_path(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    timeout: float = DEFAULT_DOWNLOAD_TIMEOUT_S,
    verify_checksum: bool = True,
) -> Path:
    """Make sure the unzipped enwik8 file is in the cache (see module doc) and return its path."""
    return _ensure_zipped_dataset(
        _resolve_cache_dir(cache_dir),
        name="enwik8",
        url=ENWIK8_URL,
        expected_size=ENWIK8_SIZE,
        expected_sha1=ENWIK8_SHA1 if verify_checksum else None,
        download=download,
        timeout=timeout,
    )


def load_enwik8(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    timeout: float = DEFAULT_DOWNLOAD_TIMEOUT_S,
    verify_checksum: bool = True,
) -> ByteCorpus:
    """enwik8 as a memory-mapped :class:`ByteCorpus` with the standard 90M/5M/5M split.

    Raises:
        DatasetUnavailableError: not cached, and the download failed or ``download=False``.
        CorruptDatasetError: the cached file or zip is truncated or corrupt.
    """
    return _load_zipped_byte_dataset(
        _resolve_cache_dir(cache_dir),
        name="enwik8",
        url=ENWIK8_URL,
        expected_size=ENWIK8_SIZE,
        expected_sha1=ENWIK8_SHA1 if verify_checksum else None,
        split_sizes=ENWIK8_SPLIT_SIZES,
        download=download,
        timeout=timeout,
    )


def _resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def _load_zipped_byte_dataset(
    cache_dir: Path,
    *,
    name: str,
    url: str,
    expected_size: int,
    expected_sha1: str | None,
    split_sizes: tuple[int, int, int],
    download: bool,
    timeout: float,
) -> ByteCorpus:
    """The whole enwik8 pipeline with the sizes as parameters, so tests can run it on tiny zips."""
    if sum(split_sizes) != expected_size or min(split_sizes) < 0:
        raise ValueError(f"split sizes {split_sizes} must be >= 0 and sum to {expected_size}")
    path = _ensure_zipped_dataset(
        cache_dir,
        name=name,
        url=url,
        expected_size=expected_size,
        expected_sha1=expected_sha1,
        download=download,
        timeout=timeout,
    )
    _, valid_bytes, test_bytes = split_sizes
    return ByteCorpus(path, valid_bytes=valid_bytes, test_bytes=test_bytes)


def _ensure_zipped_dataset(
    cache_dir: Path,
    *,
    name: str,
    url: str,
    expected_size: int,
    expected_sha1: str | None,
    download: bool,
    timeout: float,
) -> Path:
    unzipped_path = cache_dir / name
    zip_path = cache_dir / f"{name}.zip"
    if unzipped_path.is_file():
        problem = _find_problem(unzipped_path, expected_size, expected_sha1)
        if problem is not None:
            raise CorruptDatasetError(
                f"{unzipped_path} {problem}: it is truncated or corrupt; delete it and retry"
            )
        return unzipped_path
    if not zip_path.is_file():
        if not download:
            raise DatasetUnavailableError(
                _unavailable_message(name, url, unzipped_path, zip_path, "download=False")
            )
        _download(url, zip_path, timeout, name=name, unzipped_path=unzipped_path)
    _extract(zip_path, name, unzipped_path)
    problem = _find_problem(unzipped_path, expected_size, expected_sha1)
    if problem is not None:
        # The zip is the culprit: drop what came out of it so the next run does not trust it.
        unzipped_path.unlink(missing_ok=True)
        raise CorruptDatasetError(
            f"{name} extracted from {zip_path} {problem}: the zip is truncated or corrupt; "
            f"delete {zip_path} and retry"
        )
    return unzipped_path


def _unavailable_message(
    name: str, url: str, unzipped_path: Path, zip_path: Path, reason: str
) -> str:
    return (
        f"{name} is not cached and cannot be downloaded ({reason}). Download {url} by hand and "
        f"put it at {zip_path} (or put the unzipped file at {unzipped_path}); the cache folder "
        f"can be changed with cache_dir=... or the {CACHE_ENV_VAR} environment variable."
    )


def _download(url: str, zip_path: Path, timeout: float, *, name: str, unzipped_path: Path) -> None:
    """Fetch ``url`` to ``zip_path`` atomically: a crash never leaves a half-written zip there."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", url, zip_path)
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{zip_path.name}.", suffix=".part", dir=zip_path.parent
    )
    temp_path = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as temp_file:
            # Looked up on the module at call time so tests can monkeypatch urlopen.
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, temp_file, length=1 << 20)
        os.replace(temp_path, zip_path)
    except (OSError, http.client.HTTPException) as error:
        # URLError, HTTPError and socket timeouts are all OSErrors.
        raise DatasetUnavailableError(
            _unavailable_message(name, url, unzipped_path, zip_path, f"download failed: {error}")
        ) from error
    finally:
        temp_path.unlink(missing_ok=True)


def _extract(zip_path: Path, name: str, unzipped_path: Path) -> None:
    """Extract the member called ``name`` to ``unzipped_path`` via a temp file and a rename."""
    retry_hint = f"delete {zip_path} and retry (it will be downloaded again)"
    try:
        with zipfile.ZipFile(zip_path) as archive:
            member = _find_member(archive, name)
            if member is None:
                members = ", ".join(archive.namelist()[:10]) or "none"
                raise CorruptDatasetError(
                    f"{zip_path} has no member named {name!r} (members: {members}); {retry_hint}"
                )
            logger.info("extracting %s from %s", member.filename, zip_path)
            handle, temp_name = tempfile.mkstemp(
                prefix=f".{name}.", suffix=".part", dir=unzipped_path.parent
            )
            temp_path = Path(temp_name)
            try:
                with os.fdopen(handle, "wb") as temp_file, archive.open(member) as source:
                    shutil.copyfileobj(source, temp_file, length=1 << 20)
                os.replace(temp_path, unzipped_path)
            finally:
                temp_path.unlink(missing_ok=True)
    except (zipfile.BadZipFile, EOFError) as error:
        raise CorruptDatasetError(
            f"{zip_path} is not a valid zip ({error}); {retry_hint}"
        ) from error


def _find_member(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo | None:
    members = [info for info in archive.infolist() if not info.is_dir()]
    for info in members:
        if info.filename == name:
            return info
    # Some mirrors nest the file in a folder (e.g. "enwik8/enwik8").
    for info in members:
        if info.filename.rsplit("/", 1)[-1] == name:
            return info
    return None


def _find_problem(path: Path, expected_size: int, expected_sha1: str | None) -> str | None:
    """What is wrong with ``path`` as the dataset file, phrased to follow its name; None if OK."""
    size = path.stat().st_size
    if size != expected_size:
        return f"has {size:,} bytes but should have exactly {expected_size:,} bytes"
    if expected_sha1 is not None:
        digest = _sha1_of_file(path)
        if digest != expected_sha1:
            return f"has SHA-1 {digest} but should have {expected_sha1}"
    return None


def _sha1_of_file(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
