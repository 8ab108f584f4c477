from __future__ import annotations

import pytest
import torch

from memtx.testing import make_text

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def text_file(tmp_path):
    """A 20 KB text file of :func:`memtx.testing.make_text`."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(make_text(20_000))
    return path
