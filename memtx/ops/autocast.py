"""Autocast helpers for ops that choose their own compute dtype."""

from __future__ import annotations

import contextlib

import torch


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return (torch.is_autocast_cpu_enabled() if device_type == "cpu"
                else torch.is_autocast_enabled())


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on ``device_type``, or does nothing when it is already
    off (entering ``torch.autocast`` costs several microseconds, which a streamed token pays per
    layer)."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
