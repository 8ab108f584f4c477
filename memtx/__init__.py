"""memtx: memory-augmented transformers for long sequences.

.. code-block:: python

    import memtx
    model = memtx.build("transformer_xl", dim=256, depth=4, seq_len=256, mem_len=256)
    state = None
    for segment in segments:                       # (B, T) LongTensors, T <= seq_len
        out = model(segment, state=state, targets=...)
        state = out.state                          # memory carried to the next segment
    new_tokens = memtx.generate(model, prompt_ids, 100, temperature=0.8)
"""

from __future__ import annotations

import os

from memtx.config import ModelConfig
from memtx.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    MemtxError,
    NonFiniteLossError,
    StateError,
)
from memtx.generation import Stream, generate
from memtx.modeling import IGNORE_INDEX, LMOutput, MemoryLM, forward_segments, lm_loss
from memtx.reference import from_reference
from memtx.registry import available, build, config_class, make_config, model_class, register
from memtx.state import FifoMemory, State

# importing the architectures registers them
from memtx.models.transformer_xl import TransformerXL, TransformerXLConfig  # noqa: E402
from memtx.models.gateloop import GateLoop, GateLoopConfig, GateLoopState  # noqa: E402
from memtx.models.memformer import Memformer, MemformerConfig, MemformerState  # noqa: E402
from memtx.models.expire_span import ExpireSpan, ExpireSpanConfig, ExpireSpanMemory  # noqa: E402
from memtx.models.memory_xl import MemoryXL, MemoryXLConfig, MemoryXLState  # noqa: E402
from memtx.models.compressive import CompressiveConfig, CompressiveMemory, CompressiveTransformer  # noqa: E402

__version__ = "0.1.0"


def load(directory: str | os.PathLike[str], *, device: str | None = None) -> MemoryLM:
    """Load a model written by :meth:`MemoryLM.save_pretrained` (``config.json`` +
    ``model.safetensors``; nothing is unpickled)."""
    from memtx.modeling import load_weights, read_config

    arch, values = read_config(directory)
    model = build(arch, values)
    if device is not None:
        model = model.to(device)
    load_weights(model, directory)
    return model


__all__ = [
    "CheckpointError",
    "CompressiveConfig",
    "CompressiveMemory",
    "CompressiveTransformer",
    "ConfigError",
    "ExpireSpan",
    "ExpireSpanConfig",
    "ExpireSpanMemory",
    "FifoMemory",
    "GateLoop",
    "GateLoopConfig",
    "GateLoopState",
    "IGNORE_INDEX",
    "InputError",
    "LMOutput",
    "Memformer",
    "MemformerConfig",
    "MemformerState",
    "MemoryLM",
    "MemoryXL",
    "MemoryXLConfig",
    "MemoryXLState",
    "MemtxError",
    "ModelConfig",
    "NonFiniteLossError",
    "State",
    "StateError",
    "Stream",
    "TransformerXL",
    "TransformerXLConfig",
    "available",
    "build",
    "config_class",
    "forward_segments",
    "from_reference",
    "generate",
    "lm_loss",
    "load",
    "make_config",
    "model_class",
    "register",
]
