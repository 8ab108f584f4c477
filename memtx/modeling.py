"""The contract every memtx model keeps.

.. code-block:: python

    out = model(input_ids, state=None, targets=None)   # input_ids: LongTensor (B, T), T <= seq_len
    out.logits     # (B, T, vocab)
    out.state      # memory for the next segment; the state passed in is never modified
                   # (model(..., detach_state=True): returned detached, and built without a graph
                   # where the model can, e.g. Memory-XL's long-memory write)
    out.loss       # mean cross-entropy in nats over targets (ignore_index -100), else None
    out.aux_loss   # the model's own auxiliary loss, already weighted (0-dim zero if none)
    state = model.init_state(batch_size, device=..., dtype=...)  # an empty memory

An architecture subclasses :class:`MemoryLM` and implements :meth:`MemoryLM.forward_segment`,
:meth:`MemoryLM.init_state` and :meth:`MemoryLM.state_limits`. Checking inputs and states, the
loss, saving and streaming generation are written once here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memtx.config import ModelConfig
from memtx.errors import CheckpointError, InputError, StateError
from memtx.state import State

if TYPE_CHECKING:
    from memtx.generation import Stream

IGNORE_INDEX = -100
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class LMOutput:
    """What every model's forward returns (see the module docstring)."""

    logits: Tensor
    state: State
    loss: Tensor | None
    aux_loss: Tensor


class MemoryLM(nn.Module):
    """Base class of all architectures: a language model that reads one segment at a time."""

    arch: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]
    state_class: ClassVar[type[State]]
    # parameters that only write the next state (Memory-XL's long-memory writer, Memformer's
    # slot writer): a loss reaches them only through a later segment, so with the graph cut
    # after every segment they get no gradient at all (DDP must be told: see wrap_model)
    writes_state_with_parameters: ClassVar[bool] = False
    _detaching_state = False  # inside forward(..., detach_state=True)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config

    # -- to implement --------------------------------------------------------------------------
    def forward_segment(self, input_ids: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        """Logits (B, T, V), the next state and the weighted auxiliary loss for one segment.

        Inputs are already checked; ``state`` is a valid state of this model.
        """
        raise NotImplementedError

    def init_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> State:
        """An empty memory for ``batch_size`` rows (a valid ``state`` argument)."""
        raise NotImplementedError

    def state_limits(self) -> dict[str, int]:
        """Largest size of each state dimension that may grow (e.g. ``{"mem": mem_len}``)."""
        return {}

    def segments_to_fill(self) -> int:
        """Full segments after which an empty state has reached its steady size (0 for a
        fixed-size state). A model whose memory is still growing attends over less and holds
        less, so benchmarks run this many segments before they time or measure anything.

        The default is the longest growing dimension of :meth:`state_limits` over ``seq_len``;
        models whose memory fills in stages override it.
        """
        longest = max(self.state_limits().values(), default=0)
        return math.ceil(longest / self.config.seq_len)

    # -- properties ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        """Number of parameters; ``non_embedding`` leaves out token embedding tables."""
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            for module in self.modules():
                if isinstance(module, nn.Embedding):
                    params.pop(id(module.weight), None)
        return sum(p.numel() for p in params.values())

    # -- the contract --------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        state: State | None = None,
        targets: Tensor | None = None,
        *,
        detach_state: bool = False,
    ) -> LMOutput:
        """One segment: logits, the next state, the loss against ``targets`` and the auxiliary
        loss (see the module docstring).

        ``detach_state=True`` returns the next state detached, as ``out.state.detach()`` would,
        for a caller that cuts the graph after this segment (truncated backprop through one
        segment, or the last segment of a step). A model whose next state would carry a graph
        of its own (Memory-XL's long-memory writer, Memformer's slot writer) then computes it
        without one, so no activations are kept for a backward pass that never reaches them
        (Memory-XL at mem 1024: peak training memory 13.5 MiB lower, steps 1.02x faster).
        Logits, losses and their gradients are the same.
        """
        self.check_input_ids(input_ids)
        batch_size = input_ids.shape[0]
        if state is None:
            state = self.init_state(batch_size, device=input_ids.device)
        else:
            self.check_state(state, batch_size, input_ids.device)
        if targets is not None:
            self.check_targets(targets, input_ids)
        self._detaching_state = detach_state
        try:
            logits, next_state, aux_loss = self.forward_segment(input_ids, state)
        finally:
            self._detaching_state = False
        if detach_state:
            next_state = next_state.detach()
        loss = None if targets is None else lm_loss(logits, targets)
        return LMOutput(logits=logits, state=next_state, loss=loss, aux_loss=aux_loss)

    def state_update(self) -> contextlib.AbstractContextManager:
        """Context for the part of :meth:`forward_segment` that only builds the next state:
        without autograd inside ``forward(..., detach_state=True)``, as is."""
        return torch.no_grad() if self._detaching_state else contextlib.nullcontext()

    def check_input_ids(self, input_ids: Tensor) -> None:
        """Raise :class:`InputError` unless ``input_ids`` is a valid (B, T) segment."""
        cfg = self.config
        if not isinstance(input_ids, Tensor):
            raise InputError(f"input_ids must be a LongTensor (B, T), got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise InputError(
                f"input_ids must have shape (batch, time), got {tuple(input_ids.shape)}; "
                "add a batch dimension with input_ids[None] for one sequence"
            )
        length = input_ids.shape[1]
        if length == 0 or input_ids.shape[0] == 0:
            raise InputError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        if length > cfg.seq_len:
            raise InputError(
                f"a segment of {length} tokens is longer than seq_len={cfg.seq_len}; feed long "
                "sequences one segment at a time with the state carried (memtx.forward_segments does it), "
                "or build the model with a larger seq_len"
            )
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= cfg.vocab_size:
            bad = low if low < 0 else high
            raise InputError(
                f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}); "
                f"byte-level text needs vocab_size=256, other tokenisers their own vocab_size"
            )
        if input_ids.device != self.device:
            raise InputError(
                f"input_ids are on {input_ids.device} but the model is on {self.device}; "
                "move one of them with .to(device)"
            )

    def check_targets(self, targets: Tensor, input_ids: Tensor) -> None:
        if targets.shape != input_ids.shape:
            raise InputError(
                f"targets must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        scored = targets[targets != IGNORE_INDEX]
        if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= self.config.vocab_size):
            raise InputError(
                f"targets must be token ids in [0, {self.config.vocab_size}) or {IGNORE_INDEX} "
                "(ignored)"
            )

    def check_state(self, state: State, batch_size: int, device: torch.device) -> None:
        """Raise :class:`StateError` unless ``state`` belongs to this model and batch."""
        if not isinstance(state, self.state_class):
            raise StateError(
                f"this {self.arch} model carries a {self.state_class.__name__}, got a "
                f"{type(state).__name__} (a state from another architecture?); pass state=None "
                f"or model.init_state(batch_size)"
            )
        sizes = state.sizes()
        if sizes.get("batch") != batch_size:
            raise StateError(
                f"the state holds {sizes.get('batch')} rows but input_ids has batch size "
                f"{batch_size}; use state.select(rows) to pick rows, or init_state({batch_size})"
            )
        expected = self.init_state(batch_size, device=device).sizes()
        limits = self.state_limits()
        for axis, size in sizes.items():
            if axis in limits:
                if size > limits[axis]:
                    raise StateError(
                        f"the state's '{axis}' dimension is {size}, more than this model's "
                        f"limit {limits[axis]}; was it built for a model with another config?"
                    )
            elif axis in expected and expected[axis] != size:
                raise StateError(
                    f"the state's '{axis}' dimension is {size} but this model expects "
                    f"{expected[axis]}; was it built for a model with another config?"
                )
        model_dtype = self.dtype
        for name, tensor, _ in state.items():
            if tensor.device != device:
                raise StateError(
                    f"state.{name} is on {tensor.device} but the input is on {device}; "
                    "use state.to(device)"
                )
            if tensor.is_floating_point() and tensor.dtype != model_dtype:
                raise StateError(
                    f"state.{name} has dtype {tensor.dtype} but the model runs in {model_dtype}; "
                    f"use state.to({model_dtype})"
                )

    # -- streaming -----------------------------------------------------------------------------
    def stream(self, state: State | None = None, batch_size: int = 1) -> "Stream":
        """A :class:`memtx.generation.Stream` that feeds tokens one or a few at a time.

        The default recomputes the current partial segment for every new token (cost bounded by
        ``seq_len``); architectures override it with a cache.
        """
        from memtx.generation import RecomputeStream

        return RecomputeStream(self, state, batch_size)

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``.

        Files are written under temporary names and renamed, so an interrupted save never
        leaves a half-written model where a good one was.
        """
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "architecture": self.arch,
            "config": self.config.to_dict(),
        }
        weights_tmp = directory / (WEIGHTS_FILE + ".tmp")
        config_tmp = directory / (CONFIG_FILE + ".tmp")
        save_model(self, str(weights_tmp), metadata={"architecture": self.arch})
        config_tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(weights_tmp, directory / WEIGHTS_FILE)
        os.replace(config_tmp, directory / CONFIG_FILE)
        return directory


def forward_segments(
    model: MemoryLM,
    input_ids: Tensor,
    state: State | None = None,
    targets: Tensor | None = None,
    *,
    detach_state: bool = False,
) -> LMOutput:
    """Run a (B, N) sequence of any length through ``model`` one ``seq_len`` segment at a time,
    carrying the state; logits (B, N, V) are concatenated and the loss is the mean over all
    scored targets. The auxiliary loss is the mean over segments. ``detach_state`` is passed
    to the last segment (see :meth:`MemoryLM.forward`); the segments before it keep the graph
    through the state."""
    seq_len = model.config.seq_len
    logits, aux_losses = [], []
    for start in range(0, input_ids.shape[1], seq_len):
        seg = slice(start, start + seq_len)
        last = start + seq_len >= input_ids.shape[1]
        out = model(input_ids[:, seg], state, detach_state=detach_state and last)
        state = out.state
        logits.append(out.logits)
        aux_losses.append(out.aux_loss)
    all_logits = torch.cat(logits, dim=1)
    loss = None if targets is None else lm_loss(all_logits, targets)
    assert state is not None
    return LMOutput(logits=all_logits, state=state, loss=loss, aux_loss=torch.stack(aux_losses).mean())


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy in nats over targets that are not ``IGNORE_INDEX`` (0 if none)."""
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def read_config(directory: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """(architecture, config dict) from a ``save_pretrained`` directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"no {CONFIG_FILE} in {directory}: not a saved memtx model (save one with "
            "model.save_pretrained(dir))"
        )
    try:
        meta = json.loads(path.read_text())
        return meta["architecture"], meta["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}); re-save the model") from err


def load_weights(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Load ``model.safetensors`` from ``directory`` into ``model`` (strict, no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the directory has a config but no weights; the save was "
            "interrupted or the file was moved"
        )
    try:
        load_model(model, str(path), strict=True, device=str(model_device(model)))
    except SafetensorError as err:
        raise CheckpointError(f"{path} is corrupt or truncated ({err}); re-save the model") from err
    except RuntimeError as err:
        raise CheckpointError(
            f"{path} does not match the model described by {CONFIG_FILE}: {err}"
        ) from err


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
