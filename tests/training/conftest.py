from __future__ import annotations

import random

import pytest

WORDS = ("the of and to in is was that for on with as by at from his her they which memory "
         "segment stream model attention layer token byte transformer recall copy").split()


def make_text(num_bytes: int, seed: int = 0) -> bytes:
    """Deterministic word salad: learnable structure (words, spaces) without any file."""
    rng = random.Random(seed)
    out = []
    size = 0
    while size < num_bytes:
        word = rng.choice(WORDS) + (".\n" if rng.random() < 0.1 else " ")
        out.append(word)
        size += len(word)
    return "".join(out).encode()[:num_bytes]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(make_text(20_000))
    return path
