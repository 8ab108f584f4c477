"""Memory states carried from segment to segment.

Every architecture's memory is a dataclass of tensors deriving from :class:`State`. Each field is
declared with :func:`memory_field`, naming its dimensions, e.g. ``("layer", "batch", "mem", "dim")``.
From those names the base class knows where the batch dimension is (for :meth:`State.select` and
:meth:`State.reset`) and which sizes must agree between fields (a ``mem`` axis shared by the
memory and its validity mask), so one generic implementation serves all six architectures.

States are values: every method returns a new state and never modifies the old one in place.
They are registered as pytrees, so ``torch.compile``, ``torch.utils._pytree`` and DDP see through
them, and they round-trip through ``torch.save(weights_only=True)`` or safetensors via
:meth:`State.to_tensors` / :meth:`State.from_tensors`.

Shape legend: L layers, B batch, M memory entries, D model width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Iterator, Sequence, TypeVar

import torch
from torch import Tensor
import torch.utils._pytree as pytree

from memtx.errors import StateError

S = TypeVar("S", bound="State")

Rows = Tensor | Sequence[int] | Sequence[bool] | int


def memory_field(*dims: str, fill: float | bool | int = 0) -> Any:
    """Declare a state tensor and the names of its dimensions.

    Args:
        dims: one name per tensor dimension. ``"batch"`` marks the batch dimension; other names
            are checked for consistency across fields and against the model's sizes.
        fill: the value a row takes when :meth:`State.reset` clears it (the empty memory).
    """
    return dataclasses.field(metadata={"dims": tuple(dims), "fill": fill})


@dataclass(frozen=True)
class State:
    """Base class of all memory states (see the module docstring)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls,
            lambda s: ([getattr(s, f.name) for f in fields(s)], [f.name for f in fields(s)]),
            lambda values, names, cls=cls: cls(**dict(zip(names, values))),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        )

    # -- introspection ------------------------------------------------------------------------
    @classmethod
    def field_dims(cls) -> dict[str, tuple[str, ...]]:
        return {f.name: f.metadata["dims"] for f in fields(cls)}

    def items(self) -> Iterator[tuple[str, Tensor, tuple[str, ...]]]:
        for f in fields(self):
            yield f.name, getattr(self, f.name), f.metadata["dims"]

    @property
    def batch_size(self) -> int:
        for _, tensor, dims in self.items():
            if "batch" in dims:
                return tensor.shape[dims.index("batch")]
        raise StateError(f"{type(self).__name__} has no field with a batch dimension")

    @property
    def device(self) -> torch.device:
        return next(self.items())[1].device

    def sizes(self) -> dict[str, int]:
        """The size of every named dimension (checked to agree across fields)."""
        found: dict[str, tuple[int, str]] = {}
        for name, tensor, dims in self.items():
            if not isinstance(tensor, Tensor):
                raise StateError(
                    f"{type(self).__name__}.{name} must be a tensor, got {type(tensor).__name__}"
                )
            if tensor.dim() != len(dims):
                raise StateError(
                    f"{type(self).__name__}.{name} must have {len(dims)} dimensions "
                    f"{dims}, got shape {tuple(tensor.shape)}"
                )
            for axis, size in zip(dims, tensor.shape):
                if axis in found and found[axis][0] != size:
                    other_size, other_name = found[axis]
                    raise StateError(
                        f"{type(self).__name__}: the '{axis}' dimension is {other_size} in "
                        f"{other_name} but {size} in {name}; the fields of a state must agree"
                    )
                found.setdefault(axis, (size, name))
        return {axis: size for axis, (size, _) in found.items()}

    # -- transformations (each returns a new state) -------------------------------------------
    def apply(self: S, fn: Any) -> S:
        """A new state with ``fn(name, tensor, dims)`` applied to every field."""
        return type(self)(**{name: fn(name, t, dims) for name, t, dims in self.items()})

    def detach(self: S) -> S:
        """Cut the autograd graph (truncated backprop through time)."""
        return self.apply(lambda _, t, __: t.detach())

    def to(self: S, *args: Any, **kwargs: Any) -> S:
        """Move to a device and/or cast floating fields to a dtype.

        Masks, counters and complex fields keep their dtype: only real floating-point tensors
        take a floating dtype.
        """
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)

        def move(_: str, t: Tensor, __: tuple[str, ...]) -> Tensor:
            if dtype is not None and t.is_floating_point() and dtype.is_floating_point:
                return t.to(device=device, dtype=dtype, non_blocking=non_blocking)
            if dtype is not None and t.is_complex() and dtype.is_complex:
                return t.to(device=device, dtype=dtype, non_blocking=non_blocking)
            return t.to(device=device, non_blocking=non_blocking)

        return self.apply(move)

    def _row_mask(self, rows: Rows) -> Tensor:
        batch = self.batch_size
        rows_t = torch.as_tensor(rows, device=self.device)
        if rows_t.dtype == torch.bool:
            if rows_t.shape != (batch,):
                raise StateError(
                    f"a boolean row mask must have shape ({batch},), got {tuple(rows_t.shape)}"
                )
            return rows_t
        rows_t = rows_t.reshape(-1).long()
        if rows_t.numel() and (rows_t.min() < -batch or rows_t.max() >= batch):
            raise StateError(f"row indices {rows_t.tolist()} out of range for batch size {batch}")
        mask = torch.zeros(batch, dtype=torch.bool, device=self.device)
        mask[rows_t] = True
        return mask

    def reset(self: S, rows: Rows) -> S:
        """Clear the memory of some rows (a new document starts there).

        ``rows`` is a boolean mask of shape (B,) or a list/tensor of row indices. Cleared rows are
        exactly as in :meth:`MemoryLM.init_state`'s empty memory; other rows are untouched.
        """
        mask = self._row_mask(rows)
        fills = {f.name: f.metadata["fill"] for f in fields(self)}

        def clear(name: str, t: Tensor, dims: tuple[str, ...]) -> Tensor:
            if "batch" not in dims:
                return t
            shape = [1] * t.dim()
            shape[dims.index("batch")] = -1
            return t.masked_fill(mask.view(shape), fills[name])

        return self.apply(clear)

    def select(self: S, rows: Rows) -> S:
        """Reorder or subset the batch: row i of the result is row ``rows[i]`` of this state."""
        rows_t = torch.as_tensor(rows, device=self.device)
        if rows_t.dtype == torch.bool:
            rows_t = self._row_mask(rows_t).nonzero().flatten()
        rows_t = rows_t.reshape(-1).long()
        batch = self.batch_size
        if rows_t.numel() and (rows_t.min() < -batch or rows_t.max() >= batch):
            raise StateError(f"row indices {rows_t.tolist()} out of range for batch size {batch}")

        def pick(_: str, t: Tensor, dims: tuple[str, ...]) -> Tensor:
            if "batch" not in dims:
                return t
            return t.index_select(dims.index("batch"), rows_t)

        return self.apply(pick)

    # -- serialisation ------------------------------------------------------------------------
    def to_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """A flat ``{name: tensor}`` dict (contiguous), for safetensors or ``torch.save``."""
        return {prefix + name: t.detach().contiguous() for name, t, _ in self.items()}

    @classmethod
    def from_tensors(cls: type[S], tensors: dict[str, Tensor], prefix: str = "") -> S:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if prefix + n not in tensors]
        if missing:
            raise StateError(f"{cls.__name__}: saved state lacks fields {missing}")
        state = cls(**{n: tensors[prefix + n] for n in names})
        state.sizes()  # validates shapes
        return state

    def equal(self, other: "State") -> bool:
        """Exact equality of type and every tensor (for tests and resume checks)."""
        if type(self) is not type(other):
            return False
        return all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
            for (_, a, _), (_, b, _) in zip(self.items(), other.items())
        )


@dataclass(frozen=True)
class FifoMemory(State):
    """Per-layer FIFO memory of past hidden states (Transformer-XL and its descendants).

    ``mem[l]`` holds the inputs of layer ``l`` for the last M positions, oldest first.
    ``valid[b, m]`` is False for entries that do not exist (the start of a stream, or a row
    cleared by :meth:`reset`); attention never looks at them. All layers share the mask because
    every layer writes the same positions.
    """

    mem: Tensor = memory_field("layer", "batch", "mem", "dim")  # (L, B, M, D)
    valid: Tensor = memory_field("batch", "mem", fill=False)  # (B, M) bool


def append_to_fifo(mem: Tensor, valid: Tensor, new: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """The last ``keep`` positions of ``[mem; new]`` and their validity: the FIFO update of a
    :class:`FifoMemory`-shaped memory after a segment.

    Only the positions kept are copied, so the result holds exactly ``min(keep, M + T)`` of
    them (not a view into a concatenation of all ``M + T``, which a state would keep alive
    until the next segment).

    Args:
        mem: (L, B, M, D) memory, oldest first.  valid: (B, M) its validity.
        new: (L, B, T, D) the segment's states, already detached and in ``mem``'s dtype;
            all valid.
        keep: the memory length (``mem_len``), >= 0.
    """
    stored, length = mem.shape[2], new.shape[2]
    new_start = max(length - keep, 0)
    old_start = stored - min(stored, keep - (length - new_start))
    return (
        torch.cat((mem[:, :, old_start:], new[:, :, new_start:]), dim=2),
        torch.cat((valid[:, old_start:], valid.new_ones(valid.shape[0], length - new_start)), dim=1),
    )
