"""Training checkpoints that survive being killed at any moment, and load without unpickling.

Layout of a run directory::

    RUN/config.toml                      the run config (rebuilds the same run)
    RUN/metrics.jsonl                    one JSON line per logged step / evaluation
    RUN/checkpoints/step_000100/         one directory per checkpoint:
        config.json, model.safetensors     the model (memtx.load() reads this directory)
        trainer.pt                         optimizer, schedule, step, data cursor, run config
        rank_000.pt                        per process: memory state and RNG states
    RUN/checkpoints/latest               name of the newest complete checkpoint

A checkpoint is assembled in ``checkpoints/.tmp-step_000100`` and renamed into place in one
``os.replace``; ``latest`` is written to a temporary file and renamed too. A run killed at any
moment therefore leaves either the old or the new checkpoint complete, never a half-written one
under a real name. ``.pt`` files hold only tensors, numbers, strings, lists and dicts and are
read with ``torch.load(weights_only=True)``; weights are safetensors.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtx.errors import CheckpointError, MemtxError
from memtx.modeling import MemoryLM, load_weights
from memtx.state import State

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
TRAINER_FILE = "trainer.pt"
FORMAT_VERSION = 1


class RunDirectoryError(MemtxError, PermissionError):
    """A run directory that cannot be written, or that holds a run that must not be replaced."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:03d}.pt"


# -- RNG states as plain tensors and numbers -------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), Python ``random`` and numpy global RNG states, as tensors/ints."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python_version": version,
        "python_internal": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_kind": np_kind,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(
        (state["python_version"], tuple(int(v) for v in state["python_internal"].tolist()),
         state["python_gauss"])
    )
    np.random.set_state(
        (state["numpy_kind"], state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
         state["numpy_has_gauss"], state["numpy_gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- writing ---------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is assembled before it is renamed into place."""
    return Path(run_dir) / CHECKPOINT_DIR / f".tmp-{step_dir_name(step)}"


def prepare_staging(run_dir: Path, step: int) -> Path:
    """Create an empty staging directory (removing a leftover of a killed run). Main rank only."""
    tmp = staging_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_part(tmp: Path, rank: int, memory: State | None) -> None:
    """This process's memory state and RNG states (every rank writes its own part)."""
    part: dict[str, Any] = {"rng": rng_state()}
    if memory is not None:
        part["memory"] = memory.to_tensors()
        part["memory_class"] = type(memory).__name__
    torch.save(part, tmp / rank_file(rank))


def write_main_part(
    tmp: Path,
    *,
    model: MemoryLM,
    optimizer: torch.optim.Optimizer,
    step: int,
    schedule: dict[str, Any],
    data_cursor: dict[str, Any],
    run_config: dict[str, Any],
    world_size: int,
) -> None:
    """Model weights and the trainer state (main rank only); ``trainer.pt`` is written last,
    so a directory without it is known to be incomplete."""
    model.save_pretrained(tmp)
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "schedule": schedule,
            "data": data_cursor,
            "run_config": run_config,
            "world_size": world_size,
        },
        tmp / TRAINER_FILE,
    )


def publish(run_dir: Path, step: int, keep: int) -> Path:
    """Rename the staged checkpoint of ``step`` into place, point ``latest`` at it, and delete
    checkpoints older than the ``keep`` newest. Main rank only, after every rank wrote its part."""
    root = Path(run_dir) / CHECKPOINT_DIR
    tmp = staging_dir(run_dir, step)
    final = root / step_dir_name(step)
    if final.exists():
        # a run killed after the rename but before `latest` moved, resumed from an older
        # checkpoint: the old copy of this step is moved aside first (os.replace cannot
        # replace a non-empty directory)
        _remove_dir(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep]:
        _remove_dir(old)
    return final


def _remove_dir(path: Path) -> None:
    # renamed away first so a half-deleted checkpoint never sits under a real name
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    model: MemoryLM,
    optimizer: torch.optim.Optimizer,
    step: int,
    schedule: dict[str, Any],
    data_cursor: dict[str, Any],
    run_config: dict[str, Any],
    memory: State | None,
    keep: int = 2,
) -> Path:
    """Write a complete checkpoint of a single-process run (see the module docstring).

    Distributed runs call :func:`prepare_staging`, :func:`write_rank_part`,
    :func:`write_main_part` and :func:`publish` with barriers between them.
    """
    run_dir = Path(run_dir)
    tmp = prepare_staging(run_dir, step)
    write_rank_part(tmp, 0, memory)
    write_main_part(tmp, model=model, optimizer=optimizer, step=step, schedule=schedule,
                    data_cursor=data_cursor, run_config=run_config, world_size=1)
    return publish(run_dir, step, keep)


# -- reading ---------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step_") and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``latest`` points to; the newest complete one if the pointer is missing
    or stale; None when the run has none."""
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / TRAINER_FILE).is_file():
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory from either a run directory or a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory or a checkpoint in one")
    if (path / TRAINER_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"{path} holds no complete checkpoint (no {CHECKPOINT_DIR}/step_*/{TRAINER_FILE}); "
            "was the run stopped before its first checkpoint?"
        )
    return found


def _torch_load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt files surface as many different exception types
        raise CheckpointError(f"{path} is corrupt or not a memtx checkpoint ({err})") from err


def read_trainer_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """``trainer.pt`` of a checkpoint: step, optimizer, schedule, data cursor, run config."""
    state = _torch_load(Path(checkpoint) / TRAINER_FILE)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{checkpoint} has checkpoint format {state.get('format_version')!r}; this memtx "
            f"reads format {FORMAT_VERSION}"
        )
    return state


def read_rank_part(checkpoint: str | os.PathLike[str], rank: int) -> dict[str, Any]:
    return _torch_load(Path(checkpoint) / rank_file(rank))


def load_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    model: MemoryLM,
    optimizer: torch.optim.Optimizer | None = None,
    rank: int = 0,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``), restore the RNG states, and return
    the rest: ``step``, ``schedule``, ``data`` (cursor), ``run_config``, ``world_size`` and
    ``memory`` (this rank's memory state, on the model's device, or None)."""
    checkpoint = Path(checkpoint)
    trainer = read_trainer_state(checkpoint)
    part = read_rank_part(checkpoint, rank)
    load_weights(model, checkpoint)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(trainer["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"the optimizer state in {checkpoint} does not fit this model ({err})"
            ) from err
    memory = None
    if "memory" in part:
        memory = model.state_class.from_tensors(part["memory"]).to(model.device)
    if restore_rng:
        set_rng_state(part["rng"])
    return {
        "step": int(trainer["step"]),
        "schedule": trainer["schedule"],
        "data": trainer["data"],
        "run_config": trainer["run_config"],
        "world_size": int(trainer["world_size"]),
        "memory": memory,
    }
