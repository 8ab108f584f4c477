"""Bringing models from the reference packages into memtx.

``memtx.from_reference(reference_model)`` returns the equivalent memtx model with the reference
weights copied in. Each architecture registers a converter for the reference class it mirrors
with :func:`register_converter`; parity tests and users importing checkpoints both go through it.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from memtx.errors import InputError
from memtx.modeling import MemoryLM

Converter = Callable[[nn.Module], MemoryLM]
_CONVERTERS: dict[str, Converter] = {}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_converter(qualified_class_name: str):
    """Decorator: ``fn(reference_model) -> MemoryLM`` for models of that reference class."""

    def wrap(fn: Converter) -> Converter:
        _CONVERTERS[qualified_class_name] = fn
        return fn

    return wrap


def supported_reference_classes() -> list[str]:
    return sorted(_CONVERTERS)


def from_reference(reference_model: nn.Module) -> MemoryLM:
    """The memtx model equivalent to ``reference_model``, with its weights copied in."""
    for cls in type(reference_model).__mro__:
        fn = _CONVERTERS.get(_qualified_name(cls))
        if fn is not None:
            return fn(reference_model)
    known = ", ".join(supported_reference_classes()) or "none yet"
    raise InputError(
        f"memtx cannot convert a {_qualified_name(type(reference_model))}; "
        f"supported reference classes: {known}"
    )
