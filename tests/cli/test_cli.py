"""The ``memtx`` command line: train / eval / generate / list against one run directory, and
bad input that fails with a message naming the problem."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import memtx
import memtx.training
from memtx.cli import main
from memtx.training import latest_checkpoint, read_metrics

TINY = ["--preset", "tiny", "--batch-size", "2", "--steps", "4", "--log-every", "1",
        "--checkpoint-every", "2", "--eval-batch-size", "2", "--eval-segments", "4"]


def text(tmp_path, size: int = 6000) -> str:
    path = tmp_path / "text.txt"
    words = b"the memory of the stream and the segment of the model. "
    path.write_bytes((words * (size // len(words) + 1))[:size])
    return str(path)


def test_list_shows_architectures_presets_tasks(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for expected in ("transformer_xl", "tiny", "small", "recall", "task:recall", "task:copy"):
        assert expected in out


def test_train_eval_generate_on_one_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", text(tmp_path), "--out", str(run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "memory carried across segments" in out and "memory wiped" in out
    assert (run / "config.toml").is_file()
    assert latest_checkpoint(run).name == "step_000004"
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2, 3, 4]
    final = [r for r in read_metrics(run) if r["kind"] == "final_eval"][0]

    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    # the eval command reproduces the number the run printed at its end
    assert f"{final['bpc_carried']:.4f}" in out

    assert main(["generate", str(run), "--prompt", "the ", "--max-new-tokens", "12",
                 "--seed", "3"]) == 0
    out = capsys.readouterr().out
    model = memtx.load(latest_checkpoint(run))
    expected = memtx.generate(model, torch.tensor([list(b"the ")]), 12, temperature=0.8,
                              generator=torch.Generator().manual_seed(3))
    assert out == "the " + bytes(expected[0].tolist()).decode("utf-8", errors="replace") + "\n"


def test_resume_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, "--steps", "6"]) == 0
    capsys.readouterr()
    # refused: the directory holds a run and --resume was not given
    assert main(["train", "--out", str(run), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    # resuming a finished run with its saved config does nothing new and says it finished
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.5"]) == 2
    assert f"lr ({memtx.training.RunConfig().lr!r} -> 0.5)" in capsys.readouterr().err


def test_task_run_prints_accuracy_by_distance(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *TINY, "--task-distances", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "answer accuracy by distance" in out
    assert "memory carried" in out and "memory wiped" in out
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert "answer accuracy by distance" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--dimm", "3"], "--dimm", id="unknown-option"),
        pytest.param(["--dim", "wide"], "--dim must be int", id="wrong-type"),
        pytest.param(["--model", "transformer_xll"], "transformer_xl", id="unknown-model"),
        pytest.param(["--data", "/no/such/file.txt"], "does not exist", id="missing-data"),
        pytest.param(["--config", "/no/such.toml"], "does not exist", id="missing-config"),
    ],
)
def test_bad_options_fail_with_a_clear_message(tmp_path, capsys, args, message):
    assert main(["train", "--out", str(tmp_path / "run"), *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_of_a_directory_without_checkpoints_fails_clearly(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_python_dash_m_memtx_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-m", "memtx", "list"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 0 and "transformer_xl" in result.stdout
