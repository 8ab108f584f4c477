"""Memory replay back-propagation (Wu et al. 2020, *Memformer*, section 3.3).

Backprop through time over S segments keeps the activations of all S segments alive until the
backward pass. Memory replay keeps only the memory *entering* each segment:

1. forward every segment without a graph, storing the (small) state that enters it;
2. for segments S-1 .. 0: recompute segment i from its stored input state with a graph,
   back-propagate its own loss plus the gradient that arrived at its output state from
   segment i+1 (``torch.autograd.backward([loss_i, state_out_i], [1, grad_i])``), and hand
   the gradient of its input state to segment i-1.

The parameter gradients equal those of full backprop through time (up to float rounding), at
the price of running each segment's forward twice, while peak activation memory is that of one
segment. Unlike the seed's ``memory_replay_backprop`` (target only on the last segment), every
segment may carry targets, and any memtx model works whose state keeps its autograd graph
(Memformer's does; states detached inside the model, like Transformer-XL's, simply pass no
gradient back, which is what plain backprop through them would do too).

Random number generator states are saved before each segment's first forward and restored for
its replay, so dropout draws the same masks twice.

Shape legend: B batch, T segment length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from memtx.errors import InputError
from memtx.modeling import IGNORE_INDEX
from memtx.state import State

# (inputs (B, T), targets (B, T) or None) or (inputs, targets, reset rows): reset rows (a (B,)
# bool mask, or True for all rows) clear the memory before the segment, as a new document starts
SegmentSpec = tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Any]


@dataclass
class MRBPResult:
    """What :func:`mrbp` returns.

    Attributes:
        objective: the value whose gradient was accumulated (0-dim, detached).
        loss_sum: summed cross-entropy in nats over all scored targets (0-dim, detached).
        num_scored: number of scored targets over all segments.
        aux_loss: mean of the segments' auxiliary losses (0-dim, detached).
        state: the state after the last segment, detached.
    """

    objective: Tensor
    loss_sum: Tensor
    num_scored: int
    aux_loss: Tensor
    state: State


def _rng_snapshot(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(snapshot: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1], device)


def _split(segment: SegmentSpec) -> tuple[Tensor, Tensor | None, Any]:
    if len(segment) == 2:
        return segment[0], segment[1], None
    if len(segment) == 3:
        return segment[0], segment[1], segment[2]
    raise InputError(f"a segment is (inputs, targets) or (inputs, targets, reset), got {len(segment)} items")


def _apply_reset(state: State, reset: Any) -> State:
    if reset is None or reset is False:
        return state
    if reset is True:
        reset = torch.ones(state.batch_size, dtype=torch.bool, device=state.device)
    return state.reset(reset)


def _with_grad_leaves(state: State) -> State:
    """A copy of ``state`` whose floating fields are fresh leaves that record their gradient."""
    return state.apply(
        lambda _, t, __: t.detach().requires_grad_() if t.is_floating_point() else t.detach()
    )


def mrbp(
    model: nn.Module,
    segments: Sequence[SegmentSpec],
    state: State | None = None,
    *,
    ce_scale: float | None = None,
    aux_scale: float | None = None,
) -> MRBPResult:
    """Accumulate into ``.grad`` the gradient, through the memory across all ``segments``, of

        ``ce_scale * (summed cross-entropy over every scored target of every segment)
        + aux_scale * (sum of the segments' auxiliary losses)``

    while holding the activations of one segment at a time (see the module docstring).

    Args:
        model: a memtx model (``model(inputs, state, targets)`` returns ``.loss``, ``.aux_loss``
            and ``.state``), possibly wrapped (DDP: gradients are reduced on every backward, so
            prefer ``no_sync`` around all but the last call if that matters).
        segments: consecutive ``(inputs, targets)`` pairs, oldest first; ``targets`` may be None
            for a segment that only feeds the memory. An optional third item resets rows.
        state: the memory entering the first segment (detached here; None: empty).
        ce_scale: default ``1 / num_scored``, so the objective is the mean cross-entropy over all
            scored targets (the loss of :func:`memtx.forward_segments`); the trainer passes its
            global normaliser.
        aux_scale: default ``1 / len(segments)`` (the mean auxiliary loss over segments).

    Returns:
        An :class:`MRBPResult`; ``.state`` is detached, ready for the next call.
    """
    if not segments:
        raise InputError("mrbp needs at least one segment")
    specs = [_split(s) for s in segments]
    first_inputs = specs[0][0]
    device = first_inputs.device
    if state is None:
        base = getattr(model, "module", model)
        state = base.init_state(first_inputs.shape[0], device=device)
    num_scored = sum(int((t != IGNORE_INDEX).sum()) for _, t, _ in specs if t is not None)
    ce_scale = 1.0 / max(num_scored, 1) if ce_scale is None else ce_scale
    aux_scale = 1.0 / len(specs) if aux_scale is None else aux_scale

    # 1. forward without a graph: keep only the state entering each segment (and the RNG)
    entering: list[State] = []
    rng: list[tuple[Tensor, Tensor | None]] = []
    current = state.detach()
    with torch.no_grad():
        for inputs, targets, reset in specs[:-1]:
            current = _apply_reset(current, reset)
            entering.append(current)
            rng.append(_rng_snapshot(device))
            current = model(inputs, current, targets).state.detach()
    entering.append(_apply_reset(current, specs[-1][2]))
    rng.append(_rng_snapshot(device))

    # 2. replay backwards, one segment's graph at a time
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    final_state: State | None = None
    grad_out: list[Tensor | None] | None = None  # gradient at the output state's float fields
    for i in reversed(range(len(specs))):
        inputs, targets, _ = specs[i]
        leaves = _with_grad_leaves(entering[i])
        _rng_restore(rng[i], device)
        # the state leaving the last segment gets no gradient: built without a graph
        out = model(inputs, leaves, targets, detach_state=i == len(specs) - 1)
        if final_state is None:
            final_state = out.state.detach()
            rng_after = _rng_snapshot(device)  # where one plain pass over all segments ends
        roots: list[Tensor] = []
        root_grads: list[Tensor] = []
        seg_objective = out.aux_loss.float() * aux_scale
        aux_sum += out.aux_loss.detach().float()
        if targets is not None:
            seg_ce = out.loss.float() * (targets != IGNORE_INDEX).sum()
            seg_objective = seg_objective + seg_ce * ce_scale
            loss_sum += seg_ce.detach()
        if seg_objective.requires_grad:
            roots.append(seg_objective)
            root_grads.append(torch.ones_like(seg_objective))
        if grad_out is not None:
            for (_, tensor, _), grad in zip(out.state.items(), grad_out):
                if grad is not None and tensor.requires_grad:
                    roots.append(tensor)
                    root_grads.append(grad)
        if roots:
            torch.autograd.backward(roots, root_grads)
        grad_out = [t.grad if t.is_floating_point() else None for _, t, _ in leaves.items()]
    _rng_restore(rng_after, device)
    assert final_state is not None
    objective = loss_sum * ce_scale + aux_sum * aux_scale
    return MRBPResult(
        objective=objective.detach(),
        loss_sum=loss_sum.detach(),
        num_scored=num_scored,
        aux_loss=(aux_sum / len(specs)).detach(),
        state=final_state,
    )
