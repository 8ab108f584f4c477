"""Data-parallel training under ``torchrun``: process group setup, metric reduction, barriers.

``torchrun --nproc_per_node=N -m memtx train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (and the rendezvous address) in each process's environment; :func:`setup`
reads them. Without them, everything here degrades to a single process and the collective
helpers are no-ops, so the training loop is written once.

Each rank owns its own streams of the data (``StreamBatcher(rank=, world_size=)``) and its own
memory state, so a memory always belongs to the rows it was computed from; only gradients (by
DDP) and metrics (by :func:`all_reduce_sum`) cross ranks. gloo is used on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from memtx.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from err


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` picks this rank's GPU when CUDA is available, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but CUDA is not available; use device='cpu'")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank % torch.cuda.device_count())
    return resolved


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    world_size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the group (1 without ``torchrun``)."""
    return dist.get_world_size() if is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks (in place, and returned); identity in a single process."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def wrap_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """The model wrapped in DDP when there are several ranks, else the model itself."""
    if not info.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # broadcast_buffers=False: memtx models keep no running statistics, and syncing buffers
    # every forward would cost a collective per segment for nothing. A model whose state
    # writer gets no gradient when the graph is cut after one segment needs DDP to look for
    # unused parameters (the writer runs without a graph on a step's last segment, see
    # MemoryLM.forward's detach_state, so DDP finds it unused), else the second step fails.
    unused = bool(getattr(model, "writes_state_with_parameters", False))
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                   find_unused_parameters=unused)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)
