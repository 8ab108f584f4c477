"""Exceptions raised by memtx.

Every error says what is wrong and what to do about it. They subclass the builtin exception a
caller would expect (``ValueError`` for bad values, ``FileNotFoundError`` for missing files), so
code that already catches those keeps working.
"""

from __future__ import annotations


class MemtxError(Exception):
    """Base class of every error memtx raises on purpose."""


class ConfigError(MemtxError, ValueError):
    """A configuration field is unknown, has the wrong type, or violates a constraint."""


class InputError(MemtxError, ValueError):
    """Input tokens or arguments that a model or function cannot accept."""


class StateError(MemtxError, ValueError):
    """A memory state that does not belong to the model or batch it is used with."""


class CheckpointError(MemtxError, RuntimeError):
    """A saved model or training checkpoint that is missing, corrupt or incompatible."""


class NonFiniteLossError(MemtxError, FloatingPointError):
    """A loss became NaN or infinite during training."""
