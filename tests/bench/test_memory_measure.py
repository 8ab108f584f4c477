"""Peak-memory measurement used by every benchmark (memtx.bench.memory)."""

from __future__ import annotations

import operator
import os
import sys

import pytest
import torch

from memtx.bench.memory import in_fresh_process, peak_above_now

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc (Linux)")


@linux
def test_peak_counts_what_the_block_holds_and_not_what_came_before():
    # blocks above glibc's largest mmap threshold (32 MiB), so that freeing returns them
    big = torch.ones(96 * 2**20 // 4)  # 96 MiB, freed before the block: not counted
    big.add_(1)
    del big
    with peak_above_now() as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB live in the block
        block.add_(1)
        del block
    assert 62 <= peak["mib"] < 90, peak


@linux
def test_nothing_allocated_means_no_peak():
    held = torch.ones(64 * 2**20 // 4)  # held across the block, but allocated before it
    with peak_above_now() as peak:
        held.add_(1)
    assert peak["mib"] < 8, peak


def test_fresh_process_returns_the_result_and_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert in_fresh_process(operator.mul, 6, 7, timeout=120) == 42
    # the child returns freed blocks to the OS; this process's environment is unchanged
    assert in_fresh_process(os.getenv, "MALLOC_MMAP_THRESHOLD_", timeout=120) == "131072"
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
