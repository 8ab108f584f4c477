"""The registry of architectures: ``memtx.build(name, **overrides)`` looks names up here."""

from __future__ import annotations

import difflib
from typing import Any, TypeVar

from memtx.config import ModelConfig
from memtx.errors import ConfigError
from memtx.modeling import MemoryLM

_MODELS: dict[str, type[MemoryLM]] = {}
M = TypeVar("M", bound=type[MemoryLM])


def register(name: str):
    """Class decorator: make a :class:`MemoryLM` subclass buildable as ``name``."""

    def wrap(cls: M) -> M:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"architecture {name!r} is already registered")
        cls.arch = name
        _MODELS[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_MODELS)


def model_class(name: str) -> type[MemoryLM]:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown architecture {name!r}.{hint} Known architectures: {', '.join(available())}"
        )
    return _MODELS[name]


def config_class(name: str) -> type[ModelConfig]:
    return model_class(name).config_class


def make_config(name: str, config: ModelConfig | dict[str, Any] | None = None, **overrides: Any) -> ModelConfig:
    """The config of architecture ``name``: its defaults, then ``config``, then ``overrides``."""
    cls = config_class(name)
    if isinstance(config, ModelConfig):
        if not isinstance(config, cls):
            raise ConfigError(f"{name} needs a {cls.__name__}, got {type(config).__name__}")
        values = config.to_dict()
    else:
        values = dict(config or {})
    values.update(overrides)
    return cls.from_dict(values)


def build(name: str, config: ModelConfig | dict[str, Any] | None = None, **overrides: Any) -> MemoryLM:
    """Build architecture ``name`` with its default config updated by ``config`` and keywords.

    >>> model = build("transformer_xl", dim=128, depth=2, seq_len=64, mem_len=64)
    """
    return model_class(name)(make_config(name, config, **overrides))
