"""Two gloo processes under torchrun follow the loss trajectory of one process with the same
global batch: each rank owns half of the streams and its own memory, and gradients and metrics
are averaged so that the split changes nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from memtx.training import read_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)
            if r["kind"] == "train"]


@pytest.mark.parametrize("model", ["transformer_xl", "memory_xl"])
def test_two_gloo_processes_match_one_process(tmp_path, model):
    # the task scores a different number of answers on each rank: the loss must be normalised
    # by the global count for the trajectories to agree (the text layout is checked in-process
    # by test_loop.py::test_text_source_ranks_split_the_global_streams). Memory-XL's writer
    # gets no gradient when the graph is cut after every segment: DDP must expect that
    common = ["--model", model, "--data", "task:recall", "--preset", "tiny", "--steps", "6", "--lr", "3e-3",
              "--warmup-steps", "2", "--log-every", "1", "--checkpoint-every", "0",
              "--eval-batch-size", "2", "--eval-segments", "2", "--device", "cpu",
              "--grad-accum", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    single = subprocess.run(
        [sys.executable, "-m", "memtx", "train", *common, "--batch-size", "4",
         "--out", str(tmp_path / "single")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", "-m", "memtx", "train", *common, "--batch-size", "2",
         "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert ddp.returncode == 0, ddp.stderr
    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert [s for s, _, _ in one] == [s for s, _, _ in two] == list(range(1, 7))
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(one, two):
        assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6)
        assert norm_b == pytest.approx(norm_a, rel=1e-4, abs=1e-6)
    # only rank 0 prints the summary; both ranks' memories are in the checkpoint
    assert ddp.stdout.count("memory carried") == 1
    checkpoint = tmp_path / "ddp" / "checkpoints" / "step_000006"
    assert {p.name for p in checkpoint.iterdir()} >= {"rank_000.pt", "rank_001.pt", "trainer.pt"}
