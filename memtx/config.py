"""Configuration dataclasses shared by every architecture.

Each architecture declares a ``@dataclass(kw_only=True)`` subclass of :class:`ModelConfig`. The
same field name means the same thing everywhere (``dim``, ``depth``, ``heads``, ``seq_len``,
``mem_len``, ...). Configs check their own fields when they are created, so a wrong value fails
before any model is built, with a message that names the field.

``asdict(config)`` is what goes into every checkpoint; :meth:`ModelConfig.from_dict` rebuilds the
config and rejects unknown keys instead of silently ignoring them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, Union

from memtx.errors import ConfigError

C = TypeVar("C", bound="ModelConfig")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check_type(value: Any, tp: Any) -> bool:
    """True if ``value`` fits the annotation ``tp`` (the subset of typing that configs use)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return any(_check_type(value, arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_check_type(v, args[0]) for v in value)
        if origin is list and args:
            return all(_check_type(v, args[0]) for v in value)
        if origin is tuple and args:
            return len(args) == len(value) and all(_check_type(v, a) for v, a in zip(value, args))
        return True
    if tp is type(None):
        return value is None
    if tp is float:
        # An int is a fine float (``lr=1``), a bool is not.
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _admits_tuple(tp: Any) -> bool:
    """True if the annotation is a tuple type or a union with one (``tuple[int, ...] | None``)."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return any(_admits_tuple(arg) for arg in typing.get_args(tp))
    return origin is tuple


@dataclass(kw_only=True)
class ModelConfig:
    """Fields every architecture has.

    Attributes:
        vocab_size: number of token ids; 256 for byte-level text.
        dim: width of the residual stream.
        depth: number of blocks.
        heads: attention heads per block.
        seq_len: segment length: the most tokens one forward call accepts.
    """

    vocab_size: int = 256
    dim: int = 256
    depth: int = 4
    heads: int = 8
    seq_len: int = 256

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            tp = hints[f.name]
            if isinstance(value, list) and _admits_tuple(tp):
                value = tuple(value)  # JSON and TOML give lists
                object.__setattr__(self, f.name, value)
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if not _check_type(value, tp):
                raise ConfigError(
                    f"{type(self).__name__}.{f.name} must be {_type_name(tp)}, "
                    f"got {value!r} ({type(value).__name__})"
                )

    def validate(self) -> None:
        """Check constraints between fields; subclasses extend it (call ``super().validate()``)."""
        self.require(self.vocab_size >= 2, "vocab_size", "must be at least 2")
        self.require(self.dim >= 1, "dim", "must be positive")
        self.require(self.depth >= 1, "depth", "must be at least 1")
        self.require(self.heads is None or self.heads >= 1, "heads", "must be at least 1")
        self.require(self.seq_len >= 1, "seq_len", "must be at least 1")

    def require(self, condition: bool, field_name: str, message: str) -> None:
        """Raise a :class:`ConfigError` naming ``field_name`` unless ``condition`` holds."""
        if not condition:
            value = getattr(self, field_name)
            raise ConfigError(f"{type(self).__name__}.{field_name}={value!r} {message}")

    def require_probabilities(self, *field_names: str) -> None:
        """Each named field (a dropout rate) must lie in [0, 1)."""
        for name in field_names:
            self.require(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """Build a config from a plain dict, refusing unknown keys (with a suggestion)."""
        known = cls.field_names()
        for key in values:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(
                    f"{cls.__name__} has no field {key!r}.{suggestion} "
                    f"Known fields: {', '.join(known)}"
                )
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed, validated like a new config."""
        return type(self).from_dict({**self.to_dict(), **changes})
