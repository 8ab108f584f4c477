"""memtx.allocator: freed CPU memory kept for reuse (each case in a fresh interpreter, since the
setting is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc on Linux")

PROBE = """
import json, resource, sys, torch
from memtx.allocator import retain_freed_memory, retain_freed_memory_from_env, is_retaining
applied = retain_freed_memory_from_env() if sys.argv[1] == "env" else (
    retain_freed_memory() if sys.argv[1] == "on" else False)

def step():  # a training step in miniature: two 64 MiB tensors made and freed
    x = torch.ones(64 * 2**20 // 4); y = x * 2; del x, y

for _ in range(5):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 10
print(json.dumps({"applied": applied, "retaining": is_retaining(), "faults_per_step": faults}))
"""


def _probe(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_memory_is_reused_instead_of_faulted_in_again():
    default = _probe("off")
    retained = _probe("on")
    # 128 MiB a step is 32,768 pages of 4 KiB: faulted in afresh every step by default
    assert not default["retaining"] and default["faults_per_step"] > 16_000
    assert retained["applied"] and retained["retaining"]
    assert retained["faults_per_step"] < default["faults_per_step"] / 4


def test_environment_variable_turns_it_off():
    assert _probe("env", MEMTX_RETAIN_FREED_MEMORY="0")["applied"] is False
    assert _probe("env", MEMTX_RETAIN_FREED_MEMORY="1")["applied"] is True
