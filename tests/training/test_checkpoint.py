"""Checkpoints: exact resume, atomic writes, no unpickling, and failures that keep what a user
saved."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import memtx
from memtx.training import RunConfig, latest_checkpoint, list_checkpoints, read_metrics, train
from memtx.training.checkpoint import (
    RunDirectoryError,
    load_checkpoint,
    read_rank_part,
    rng_state,
    set_rng_state,
    staging_dir,
)

SMALL_EVAL = {"eval_batch_size": 2, "eval_segments": 4, "progress": False}


def tiny_run(data: str, **changes) -> RunConfig:
    values = {"data": data, "preset": "tiny", "steps": 8, "batch_size": 2, "lr": 3e-3,
              "warmup_steps": 2, "log_every": 1, "checkpoint_every": 2,
              "model_config": {"dropout": 0.1}, **SMALL_EVAL}
    values.update(changes)
    return RunConfig(**values)


def weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("kind", ["text", "task"])
def test_resume_continues_exactly(tmp_path, text_file, kind):
    # dropout > 0 makes the RNG state matter; task and text cursors both have to come back
    data = str(text_file) if kind == "text" else "task:recall"
    run = tiny_run(data)
    straight = train(run, tmp_path / "straight", print_fn=quiet, log_fn=quiet)
    first = train(run, tmp_path / "resumed", stop_at=4, print_fn=quiet, log_fn=quiet)
    assert first.step == 4 and first.final_eval == {}
    resumed = train(run, tmp_path / "resumed", resume=True, print_fn=quiet, log_fn=quiet)
    assert resumed.step == straight.step == 8
    a, b = weights(straight.checkpoint), weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    mem_a = read_rank_part(straight.checkpoint, 0)["memory"]
    mem_b = read_rank_part(resumed.checkpoint, 0)["memory"]
    assert all(torch.equal(mem_a[k], mem_b[k]) for k in mem_a)
    losses = lambda d: [(r["step"], r["loss"], r["data"]) for r in read_metrics(d)
                        if r["kind"] == "train"]
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert [r["step"] for r in read_metrics(tmp_path / "resumed") if r["kind"] == "train"] == list(range(1, 9))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    result = train(tiny_run("task:recall", keep_checkpoints=2), tmp_path / "run",
                   print_fn=quiet, log_fn=quiet)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_000006", "step_000008"]
    assert latest_checkpoint(tmp_path / "run") == result.checkpoint
    model = memtx.load(result.checkpoint)  # a checkpoint is also a saved model
    assert model.config.dim == 32


def test_a_checkpoint_interrupted_mid_write_leaves_the_previous_one(tmp_path):
    run = tiny_run("task:recall")
    train(run, tmp_path / "run", stop_at=4, print_fn=quiet, log_fn=quiet)
    # what a kill while writing step 6 leaves behind: a half-filled staging directory
    partial = staging_dir(tmp_path / "run", 6)
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(tmp_path / "run").name == "step_000004"
    # a stale pointer (killed between renaming a checkpoint away and moving `latest`)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000099\n")
    assert latest_checkpoint(tmp_path / "run").name == "step_000004"
    result = train(run, tmp_path / "run", resume=True, print_fn=quiet, log_fn=quiet)
    assert result.step == 8
    assert not partial.exists()


def test_loading_never_unpickles_objects(tmp_path):
    result = train(tiny_run("task:recall", steps=2), tmp_path / "run", print_fn=quiet,
                   log_fn=quiet)
    trainer = result.checkpoint / "trainer.pt"
    state = torch.load(trainer, weights_only=True)
    state["payload"] = torch.nn.Linear(2, 2)  # an arbitrary object needs the unpickler
    torch.save(state, trainer)
    model = memtx.build("transformer_xl", RunConfig(preset="tiny").resolved_model_config())
    with pytest.raises(memtx.CheckpointError, match="corrupt or not a memtx checkpoint"):
        load_checkpoint(result.checkpoint, model=model)


def test_rng_states_round_trip():
    import random

    import numpy as np

    saved = rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    set_rng_state(saved)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_resume_with_an_incompatible_config_names_the_field(tmp_path):
    run = tiny_run("task:recall")
    train(run, tmp_path / "run", stop_at=2, print_fn=quiet, log_fn=quiet)
    before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    with pytest.raises(memtx.ConfigError, match=r"model\.dim \(32 -> 48\)"):
        train(run.replace(model_config={"dropout": 0.1, "dim": 48}), tmp_path / "run",
              resume=True, print_fn=quiet, log_fn=quiet)
    with pytest.raises(memtx.ConfigError, match=r"lr \(0.003 -> 0.1\)"):
        train(run.replace(lr=0.1), tmp_path / "run", resume=True, print_fn=quiet, log_fn=quiet)
    # watching/saving settings may change
    train(run.replace(log_every=4), tmp_path / "run", resume=True, stop_at=4, print_fn=quiet,
          log_fn=quiet)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) != before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = memtx.MemoryLM.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5 and self.training:  # the 5th training segment: step 5
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(memtx.MemoryLM, "forward", poisoned)
    with pytest.raises(memtx.NonFiniteLossError, match=r"step 5.*step_000004"):
        train(tiny_run("task:recall"), tmp_path / "run", print_fn=quiet, log_fn=quiet)
    assert latest_checkpoint(tmp_path / "run").name == "step_000004"
    monkeypatch.setattr(memtx.MemoryLM, "forward", original)
    assert train(tiny_run("task:recall"), tmp_path / "run", resume=True, print_fn=quiet,
                 log_fn=quiet).step == 8
    errors = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "error"]
    assert errors == []  # the resumed run forgot the lines after step 4, the error included


def test_existing_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="--resume"):
        train(tiny_run("task:recall"), run_dir, print_fn=quiet, log_fn=quiet)
    assert os.listdir(run_dir) == ["notes.txt"]


def test_unwritable_run_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a path under a regular file cannot be created, even by root
    with pytest.raises(RunDirectoryError, match="cannot write"):
        train(tiny_run("task:recall"), blocker / "run", print_fn=quiet, log_fn=quiet)


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(RunDirectoryError, match="does not exist"):
        train(tiny_run("task:recall"), tmp_path / "missing", resume=True, print_fn=quiet,
              log_fn=quiet)


@pytest.mark.parametrize(
    "content, match",
    [
        pytest.param(None, "does not exist", id="missing"),
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"x" * 300, "too small", id="smaller-than-a-segment-per-stream"),
    ],
)
def test_bad_data_fails_before_training(tmp_path, content, match):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    run = tiny_run(str(path), batch_size=16)
    with pytest.raises(memtx.InputError, match=match):
        train(run, tmp_path / "run", print_fn=quiet, log_fn=quiet)
    assert not list_checkpoints(tmp_path / "run")


def test_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path):
    run = tiny_run("task:recall", steps=4)
    straight = train(run, tmp_path / "straight", print_fn=quiet, log_fn=quiet)
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(tmp_path / "straight" / "config.toml", killed / "config.toml")
    (killed / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "tr')
    resumed = train(run, killed, resume=True, print_fn=quiet, log_fn=quiet)
    a, b = weights(straight.checkpoint), weights(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(killed) if r["kind"] == "train"] == [1, 2, 3, 4]
