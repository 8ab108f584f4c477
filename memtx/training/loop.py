"""The training loop as flat functions: :func:`train_step`, :func:`evaluate`,
:func:`evaluate_tasks`, and the :func:`train` driver that ties them to a run directory.

Truncated backprop through time: the data is B contiguous streams per process (row b is always
stream b), each step feeds the next ``bptt_segments`` segments of every stream with the memory
carried, and the memory is detached after the step, so gradients never reach further back than
the step's own segments. The memory of a row is reset where its stream starts afresh.

Losses are normalised by the number of scored targets of the *global* batch (all micro-batches,
all segments of the step, all processes), so ``grad_accum`` and ``torchrun`` change how the work
is split, not the numbers: the gradient is that of the mean loss over the global batch.

Shape legend: B rows (streams) per process, T segment length, V vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from memtx.errors import ConfigError, InputError, NonFiniteLossError
from memtx.modeling import IGNORE_INDEX, MemoryLM
from memtx.state import State
from memtx.training import distributed as dist_utils
from memtx.training.distributed import unwrap

LN2 = math.log(2.0)


# ============================================================================================
# Data: one segment of every stream, from text or from a synthetic task
# ============================================================================================
@dataclass
class Segment:
    """One segment of every stream of this process.

    Attributes:
        inputs: (B, T) token ids.
        targets: (B, T) next tokens, ``IGNORE_INDEX`` where not scored.
        reset: rows whose stream starts afresh here (their memory must be cleared first).
    """

    inputs: Tensor
    targets: Tensor
    reset: bool = False


class TextSource:
    """Training segments of a byte split through :class:`memtx.data.StreamBatcher` (each
    process owns ``batch_size`` of the ``world_size * batch_size`` streams)."""

    def __init__(self, split: Any, batch_size: int, seq_len: int, *, rank: int = 0,
                 world_size: int = 1) -> None:
        from memtx.data import StreamBatcher

        try:
            self.batcher = StreamBatcher(split, batch_size, seq_len, rank=rank,
                                         world_size=world_size)
        except ValueError as err:
            name = getattr(split, "name", "data")
            raise InputError(f"the {name} split is too small: {err}") from None

    def next_segment(self) -> Segment:
        batch = self.batcher.next_batch()
        return Segment(batch.inputs, batch.targets, reset=bool(batch.reset_memory))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "text", **self.batcher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {k: v for k, v in state.items() if k != "kind"}
        try:
            self.batcher.load_state_dict(state)
        except ValueError as err:
            raise ConfigError(f"cannot resume the data cursor: {err}") from None

    def describe(self) -> str:
        return f"epoch {self.batcher.epoch}, segment {self.batcher.position}/{len(self.batcher)}"


class TaskSource:
    """Training segments of a synthetic task (:class:`memtx.data.SegmentTask`).

    Rows of a task stream depend only on ``(seed, row)``, so process ``rank`` takes rows
    ``[rank * B, (rank + 1) * B)`` of the global stream: the same rows a single process with
    the global batch would see. The cursor is the number of segments consumed; a task stream's
    generators are rebuilt on resume by replaying that many segments (cheap: numpy only).
    Targets are the task's answers only (filler is random, so scoring it adds only noise).
    """

    def __init__(self, task: Any, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.task = task
        self.seed = seed
        self.batch_size = batch_size
        self.world_size = world_size
        self.rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.stream = task.batches(batch_size * world_size, seed=seed)
        self.consumed = 0

    def next_batch(self) -> Any:
        batch = next(self.stream)
        self.consumed += 1
        return batch

    def next_segment(self) -> Segment:
        batch = self.next_batch()
        return Segment(batch.inputs[self.rows], batch.answer_targets[self.rows],
                       reset=bool(batch.reset_memory))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "task", "segments": self.consumed, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "world_size"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(
                    f"cannot resume the task stream: it was saved with {key}={state.get(key)} "
                    f"but this run has {key}={getattr(self, key)}"
                )
        self.stream = self.task.batches(self.batch_size * self.world_size, seed=self.seed)
        self.consumed = 0
        for _ in range(int(state["segments"])):
            self.next_batch()

    def describe(self) -> str:
        return f"segment {self.consumed}"


def make_task(name: str, seq_len: int, distances: Sequence[int], size: int = 2) -> Any:
    """The synthetic task ``name`` (``recall``: ``size`` key/value pairs per episode;
    ``copy``: a string of ``size`` symbols) with segments of ``seq_len`` tokens."""
    from memtx.data import AssociativeRecall, DelayedCopy

    try:
        if name == "recall":
            return AssociativeRecall(seq_len, tuple(distances), num_pairs=size)
        if name == "copy":
            return DelayedCopy(seq_len, tuple(distances), copy_len=size)
    except ValueError as err:
        raise ConfigError(f"task:{name} with seq_len={seq_len}, task_size={size}: {err}") from None
    raise ConfigError(f"unknown task {name!r}; known tasks: recall, copy")


# ============================================================================================
# One optimizer step
# ============================================================================================
@dataclass
class StepMetrics:
    """What one :func:`train_step` measured, reduced over processes.

    ``loss`` is the mean cross-entropy (nats) over the scored targets of the global batch
    (NaN when the step had none); ``correct``/``count`` count argmax hits among them.
    """

    loss: float
    loss_sum: float
    count: int
    correct: int
    aux_loss: float
    grad_norm: float
    lr: float
    tokens: int


def cat_states(parts: Sequence[State]) -> State:
    """Concatenate states of disjoint row sets along their batch dimension."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    values = {}
    for name, tensor, dims in first.items():
        if "batch" in dims:
            values[name] = torch.cat([getattr(p, name) for p in parts], dim=dims.index("batch"))
        else:
            values[name] = tensor
    return type(first)(**values)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    segments: Sequence[Segment],
    state: State | None,
    *,
    lr: float | None = None,
    grad_clip: float = 1.0,
    grad_accum: int = 1,
    precision: str = "fp32",
    step: int | None = None,
) -> tuple[StepMetrics, State]:
    """One optimizer update on consecutive ``segments`` of every stream; returns the metrics
    and the detached state to carry into the next step.

    Args:
        model: a :class:`MemoryLM`, or one wrapped in DDP (gradients are averaged over ranks).
        segments: the step's consecutive segments (``bptt_segments`` of them); the state keeps
            its autograd graph between them and is detached at the end.
        state: the memory carried from the previous step (None: empty).
        lr: learning rate for this update (set on every param group); None keeps the current.
        grad_clip: clip the global gradient norm to this (0: no clipping).
        grad_accum: run the rows in this many micro-batches, one backward each.
        precision: ``fp32`` or ``bf16`` (autocast).
        step: only for the error message if the loss is not finite.

    Raises:
        NonFiniteLossError: the loss or the gradient norm is NaN or infinite; the optimizer
            has not stepped, so the weights are those before this step.
    """
    base: MemoryLM = unwrap(model)
    device = base.device
    rows = segments[0].inputs.shape[0]
    if rows % grad_accum:
        raise ConfigError(f"batch of {rows} rows cannot be split into grad_accum={grad_accum}")
    if state is None:
        state = base.init_state(rows, device=device)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    segments = [Segment(s.inputs.to(device), s.targets.to(device), s.reset) for s in segments]

    world_size = dist_utils.world_size()
    local_count = sum(int((s.targets != IGNORE_INDEX).sum()) for s in segments)
    global_count = int(dist_utils.all_reduce_sum(torch.tensor(float(local_count), device=device)).item())
    ce_scale = world_size / max(global_count, 1)  # DDP averages over ranks: undo, then / count

    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    micro_rows = torch.arange(rows, device=device).chunk(grad_accum)
    next_parts = []
    for i, row_ids in enumerate(micro_rows):
        micro_state = state if grad_accum == 1 else state.select(row_ids)
        last = i == len(micro_rows) - 1
        # gradients are all-reduced only on the last micro-batch
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            objective = torch.zeros((), device=device)
            for k, seg in enumerate(segments):
                inputs, targets = seg.inputs[row_ids], seg.targets[row_ids]
                if seg.reset:
                    micro_state = micro_state.reset(torch.ones(len(row_ids), dtype=torch.bool))
                with autocast_context(device, precision):
                    # the state leaving the step is detached: built without a graph
                    out = model(inputs, micro_state, targets,
                                detach_state=k == len(segments) - 1)
                micro_state = out.state
                scored = targets != IGNORE_INDEX
                seg_ce_sum = out.loss.float() * scored.sum()
                # aux_loss is a per-segment mean: weight it by this micro-batch's share of rows
                aux = out.aux_loss.float() * (len(row_ids) / rows) / len(segments)
                objective = objective + seg_ce_sum * ce_scale + aux
                loss_sum += seg_ce_sum.detach()
                aux_sum += aux.detach()
                with torch.no_grad():
                    correct += ((out.logits.argmax(-1) == targets) & scored).sum()
            objective.backward()
        next_parts.append(micro_state.detach())

    reduced = dist_utils.all_reduce_sum(torch.stack([loss_sum, aux_sum, correct]))
    loss_total, aux_total, correct_total = (float(v) for v in reduced.tolist())
    aux_mean = aux_total / world_size
    mean_loss = loss_total / global_count if global_count else float("nan")
    if not math.isfinite(loss_total) or not math.isfinite(aux_mean):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"the training loss became {loss_total if not math.isfinite(loss_total) else aux_mean}"
            f" at step {step if step is not None else '?'}; the optimizer did not step"
        )
    params = [p for p in base.parameters() if p.grad is not None]
    if grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    else:
        grad_norm = float(torch.linalg.vector_norm(
            torch.stack([p.grad.detach().float().norm() for p in params]))) if params else 0.0
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"the gradient norm became {grad_norm} at step {step if step is not None else '?'} "
            f"(loss {mean_loss:.4f}); the optimizer did not step"
        )
    optimizer.step()
    metrics = StepMetrics(
        loss=mean_loss,
        loss_sum=loss_total,
        count=global_count,
        correct=int(correct_total),
        aux_loss=aux_mean,
        grad_norm=grad_norm,
        lr=optimizer.param_groups[0]["lr"],
        tokens=int(rows * sum(s.inputs.shape[1] for s in segments) * world_size),
    )
    return metrics, cat_states(next_parts)


# ============================================================================================
# Evaluation
# ============================================================================================
@dataclass
class EvalResult:
    """Bits per character over a split: ``bpc = loss / ln 2``, ``loss`` the mean nats over
    every scored target (``tokens`` of them)."""

    loss: float
    bpc: float
    tokens: int


@torch.no_grad()
def evaluate(
    model: MemoryLM,
    tokens: Any,
    *,
    batch_size: int = 1,
    wipe_memory: bool = False,
    precision: str = "fp32",
) -> EvalResult:
    """Loss and bits per character over every target of ``tokens`` (a split, array or tensor).

    The split is cut into ``batch_size`` contiguous streams walked segment by segment with the
    memory carried (``batch_size=1``: exact, every token sees all the context before it).
    ``wipe_memory=True`` starts every segment with an empty memory, which measures what the
    memory is worth: the difference between the two bpc.
    """
    from memtx.data import iter_segments

    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = model.device
    seq_len = model.config.seq_len
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    state = None
    try:
        for batch in iter_segments(tokens, seq_len, batch_size=batch_size):
            inputs, targets = batch.inputs.to(device), batch.targets.to(device)
            with autocast_context(device, precision):
                out = model(inputs, None if wipe_memory else state, targets)
            state = out.state
            scored = int((targets != IGNORE_INDEX).sum())
            total += out.loss.double() * scored
            count += scored
    finally:
        model.train(was_training)
    loss = float(total) / max(count, 1)
    return EvalResult(loss=loss, bpc=loss / LN2, tokens=count)


@dataclass
class TaskEval:
    """Answer accuracy of a synthetic task per distance (in segments) and overall."""

    counts: dict[int, tuple[int, int]]
    chance: float

    @property
    def accuracy(self) -> dict[int, float]:
        return {d: c / n for d, (c, n) in self.counts.items() if n}

    @property
    def overall(self) -> float:
        correct = sum(c for c, _ in self.counts.values())
        total = sum(n for _, n in self.counts.values())
        return correct / total if total else float("nan")


@torch.no_grad()
def evaluate_tasks(
    model: MemoryLM,
    task: Any,
    *,
    batch_size: int = 64,
    num_segments: int = 48,
    seed: int = 1_000_003,
    wipe_memory: bool = False,
    precision: str = "fp32",
) -> TaskEval:
    """Answer accuracy of ``model`` on ``num_segments`` segments of ``batch_size`` fresh task
    streams (seeded apart from training), counted per distance. ``wipe_memory=True`` empties
    the memory before every segment, so answers can only come from the segment itself: the
    accuracy a memoryless model gets, near chance for this task."""
    from memtx.data import evaluate_answers, merge_answer_counts

    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = model.device
    stream = task.batches(batch_size, seed=seed)
    counts = []
    state = None
    try:
        for _ in range(num_segments):
            batch = next(stream)
            with autocast_context(device, precision):
                out = model(batch.inputs.to(device), None if wipe_memory else state)
            state = out.state
            counts.append(evaluate_answers(out.logits.float().cpu(), batch))
    finally:
        model.train(was_training)
    return TaskEval(counts=merge_answer_counts(*counts), chance=task.chance_accuracy)


# ============================================================================================
# The driver
# ============================================================================================
@dataclass
class TrainResult:
    """What :func:`train` returns: the final step, where the last checkpoint is, and the final
    evaluation (``text``: bpc carried/wiped; ``task``: accuracy carried/wiped)."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    final_eval: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def build_sources(run: Any, seq_len: int, info: dist_utils.DistInfo) -> tuple[Any, Any]:
    """(training source, evaluation data): a task and its :class:`TaskSource`, or the valid
    split and a :class:`TextSource` over the train split."""
    if run.is_task:
        task = make_task(run.task_name, seq_len, run.task_distances, run.task_size)
        source = TaskSource(task, run.batch_size, seed=run.seed, rank=info.rank,
                            world_size=info.world_size)
        return source, task
    corpus = load_data(run.data)
    source = TextSource(corpus.split("train"), run.batch_size, seq_len, rank=info.rank,
                        world_size=info.world_size)
    valid = corpus.split("valid")
    if len(valid) < 2:
        raise InputError(
            f"the valid split of {run.data} has {len(valid)} bytes: too small to evaluate; "
            "use a larger corpus"
        )
    return source, valid


def load_data(spec: str) -> Any:
    """A byte corpus from a path or ``enwik8``, with errors that say what to do."""
    from memtx.data import load_corpus

    try:
        return load_corpus(spec)
    except FileNotFoundError as err:
        raise InputError(f"--data {spec}: {err}") from None
    except ValueError as err:
        raise InputError(f"--data {spec}: {err}") from None


def run_final_eval(model: MemoryLM, run: Any, eval_data: Any) -> dict[str, Any]:
    """Carried versus wiped memory: bpc on the valid split, or task accuracy per distance."""
    if run.is_task:
        carried = evaluate_tasks(model, eval_data, batch_size=run.eval_batch_size,
                                 num_segments=run.eval_segments, precision=run.precision)
        wiped = evaluate_tasks(model, eval_data, batch_size=run.eval_batch_size,
                               num_segments=run.eval_segments, wipe_memory=True,
                               precision=run.precision)
        return {
            "data_kind": "task",
            "accuracy_carried": {str(d): a for d, a in carried.accuracy.items()},
            "accuracy_wiped": {str(d): a for d, a in wiped.accuracy.items()},
            "answers": {str(d): n for d, (_, n) in carried.counts.items()},
            "chance": carried.chance,
        }
    carried = evaluate(model, eval_data, batch_size=run.eval_batch_size, precision=run.precision)
    wiped = evaluate(model, eval_data, batch_size=run.eval_batch_size, wipe_memory=True,
                     precision=run.precision)
    return {"data_kind": "text", "bpc_carried": carried.bpc, "bpc_wiped": wiped.bpc,
            "tokens": carried.tokens}


def format_final_eval(result: dict[str, Any], seq_len: int) -> str:
    """The summary a user reads at the end of a run."""
    if result["data_kind"] == "text":
        return (
            f"validation bits per character over {result['tokens']:,} bytes:\n"
            f"  memory carried across segments: {result['bpc_carried']:.4f}\n"
            f"  memory wiped every segment:     {result['bpc_wiped']:.4f}"
        )
    lines = [
        "answer accuracy by distance (the key was written d segments before the question; "
        f"a segment is {seq_len} tokens; chance {result['chance']:.0%}):",
        f"  {'distance':>9}  {'tokens back':>12}  {'memory carried':>15}  {'memory wiped':>13}",
    ]
    for d, acc in result["accuracy_carried"].items():
        d_int = int(d)
        back = f"{(d_int - 1) * seq_len + 1}-{(d_int + 1) * seq_len - 1}"
        lines.append(
            f"  {d:>9}  {back:>12}  {acc:>15.1%}  {result['accuracy_wiped'].get(d, float('nan')):>13.1%}"
        )
    return "\n".join(lines)


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> None:
        """Forget lines of steps after ``step`` (a resumed run repeats them)."""
        if not self.enabled or not self.path.is_file():
            return
        from memtx.training.checkpoint import atomic_write_text

        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when the run was killed
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def save_plot(run_dir: Path) -> Path | None:
    """``RUN/metrics.png``: training loss (and validation bpc or accuracy) against step, when
    matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["bpc"] for r in train], label="train bpc (scored tokens)")
    key = "val_bpc" if any("val_bpc" in r for r in evals) else None
    if key:
        ax.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r],
                "o-", label="validation bpc")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    if any("accuracy" in r for r in train):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in train], [r["accuracy"] for r in train], color="tab:green",
                 alpha=0.6, label="answer accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(run_dir) / "metrics.png"
    tmp = path.with_name(".metrics.png.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    Path(tmp).replace(path)
    return path


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Create a fresh run directory, or check that a resumed one has a checkpoint. A directory
    that already holds files is never reused without ``resume``: a new run would overwrite what
    is there. Fails before training if the directory cannot be written."""
    from memtx.training.checkpoint import RunDirectoryError, latest_checkpoint

    if resume:
        if not run_dir.is_dir():
            raise RunDirectoryError(f"cannot resume: {run_dir} does not exist")
        # a run killed before its first checkpoint left only its config: it starts over
        if latest_checkpoint(run_dir) is None and not (run_dir / "config.toml").is_file():
            raise RunDirectoryError(
                f"cannot resume: {run_dir} holds no memtx run (no checkpoint, no config.toml); "
                "start a new run with --out"
            )
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunDirectoryError(
            f"{run_dir} already exists and is not empty; pass --resume to continue the run "
            "in it, or choose another --out (nothing was changed)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunDirectoryError(
            f"cannot write to the run directory {run_dir} ({err.strerror or err}); choose a "
            "directory you can write to with --out"
        ) from None


def train(
    run: Any,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    print_fn: Callable[[str], None] = print,
    log_fn: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``run`` (a :class:`memtx.training.run.RunConfig`) in ``run_dir``.

    A new run needs an empty or missing ``run_dir``; ``resume=True`` continues the latest
    checkpoint of ``run_dir`` exactly (weights, optimizer, schedule, data cursor, memory
    state, RNG states) and refuses a ``run`` that would compute something else. Under
    ``torchrun`` every process calls this; process 0 writes the files.

    The final summary goes to ``print_fn``; progress messages to ``log_fn`` (default: stderr),
    so stdout holds only results.

    ``stop_at`` ends this session after that step with a checkpoint (the schedule still runs to
    ``run.steps``), to be continued with ``resume=True``; the final evaluation is skipped.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept and named.
    """
    import memtx
    from memtx.training import checkpoint as ckpt
    from memtx.training.optim import Schedule, build_optimizer
    from memtx.training.run import incompatible_fields, to_toml

    run_dir = Path(run_dir)
    if log_fn is None:
        log_fn = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    info = dist_utils.setup(run.device)
    started = time.time()
    try:
        if info.is_main:
            prepare_run_dir(run_dir, resume)
        dist_utils.barrier()
        checkpoint = ckpt.latest_checkpoint(run_dir) if resume else None
        if resume:
            from memtx.training.run import RunConfig, load_toml

            if checkpoint is not None:
                saved = RunConfig.from_dict(ckpt.read_trainer_state(checkpoint)["run_config"])
            else:
                saved = RunConfig.from_dict(load_toml(run_dir / "config.toml"))
            diffs = incompatible_fields(saved, run)
            if diffs:
                raise ConfigError(
                    f"cannot resume {run_dir} with a different config: " + "; ".join(diffs)
                    + ". Resume with the saved config (only logging/checkpoint/eval settings may "
                    "change), or start a new run in another directory"
                )
            if checkpoint is not None and ckpt.read_trainer_state(checkpoint)["world_size"] != info.world_size:
                raise ConfigError(
                    f"{run_dir} was trained by {ckpt.read_trainer_state(checkpoint)['world_size']} "
                    f"processes; resume it with the same number (now {info.world_size}): each "
                    "process carries the memory of its own streams"
                )

        model_config = run.resolved_model_config()
        torch.manual_seed(run.seed)
        model = memtx.build(run.model, model_config).to(info.device)
        source, eval_data = build_sources(run, model_config.seq_len, info)
        optimizer = build_optimizer(model, lr=run.lr, weight_decay=run.weight_decay,
                                    betas=(run.beta1, run.beta2))
        schedule = Schedule(run.lr, run.warmup_steps, run.steps, run.min_lr_ratio)
        metrics_log = MetricsLog(run_dir / "metrics.jsonl", info.is_main)

        step = 0
        state: State | None = None
        if checkpoint is not None:
            loaded = ckpt.load_checkpoint(checkpoint, model=model, optimizer=optimizer,
                                          rank=info.rank)
            step = loaded["step"]
            state = loaded["memory"]
            source.load_state_dict(loaded["data"])
            metrics_log.drop_after(step)
            if info.is_main:
                log_fn(f"resumed {run_dir} from {checkpoint.name} (step {step})")
        elif resume:
            metrics_log.drop_after(0)
            if info.is_main:
                log_fn(f"{run_dir} has no checkpoint yet: starting it from step 0")
        elif info.is_main:
            ckpt.atomic_write_text(run_dir / "config.toml", to_toml(run))
        dist_utils.barrier()

        ddp_model = dist_utils.wrap_model(model, info)
        model.train()
        last_checkpoint = checkpoint

        def save(at_step: int) -> Path | None:
            tmp = ckpt.staging_dir(run_dir, at_step)
            if info.is_main:
                ckpt.prepare_staging(run_dir, at_step)
            dist_utils.barrier()
            ckpt.write_rank_part(tmp, info.rank, state)
            if info.is_main:
                ckpt.write_main_part(tmp, model=model, optimizer=optimizer, step=at_step,
                                     schedule=schedule.state_dict(),
                                     data_cursor=source.state_dict(),
                                     run_config=run.to_dict(), world_size=info.world_size)
            dist_utils.barrier()
            if info.is_main:
                ckpt.publish(run_dir, at_step, run.keep_checkpoints)
            dist_utils.barrier()
            return run_dir / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(at_step)

        show_bar = run.progress and info.is_main and sys.stderr.isatty()
        bar = None
        if show_bar:
            from tqdm import tqdm

            import shutil

            # a terminal that reports 0 columns (some ptys) would get an empty bar
            bar = tqdm(total=run.steps, initial=step, unit="step", file=sys.stderr,
                       ncols=shutil.get_terminal_size((100, 20)).columns)
        window = {"loss_sum": 0.0, "count": 0, "correct": 0, "tokens": 0, "time": time.time()}
        if info.is_main:
            params = model.num_parameters()
            log_fn(
                f"training {run.model} ({params / 1e6:.2f}M parameters) on {run.data} for "
                f"{run.steps} steps: batch {run.batch_size * info.world_size} x "
                f"{model_config.seq_len} tokens x {run.bptt_segments} segment(s) per step"
                + (f", {info.world_size} processes" if info.is_distributed else "")
                + f"; run directory {run_dir}"
            )
        end = run.steps if stop_at is None else min(stop_at, run.steps)
        while step < end:
            segments = [source.next_segment() for _ in range(run.bptt_segments)]
            try:
                metrics, state = train_step(
                    ddp_model, optimizer, segments, state, lr=schedule.lr_at(step),
                    grad_clip=run.grad_clip, grad_accum=run.grad_accum,
                    precision=run.precision, step=step + 1,
                )
            except NonFiniteLossError as err:
                kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                        else "no checkpoint had been written yet")
                metrics_log.write({"kind": "error", "step": step + 1, "error": str(err)})
                raise NonFiniteLossError(
                    f"{err}; training stopped and {kept}. Lower --lr, raise --warmup-steps, or "
                    "set --grad-clip, then resume or start again"
                ) from None
            step += 1
            window["loss_sum"] += metrics.loss_sum
            window["count"] += metrics.count
            window["correct"] += metrics.correct
            window["tokens"] += metrics.tokens
            if step % run.log_every == 0 or step == run.steps:
                elapsed = time.time() - window["time"]
                loss = window["loss_sum"] / max(window["count"], 1)
                record = {
                    "kind": "train", "step": step, "loss": loss, "bpc": loss / LN2,
                    "lr": metrics.lr, "grad_norm": metrics.grad_norm,
                    "aux_loss": metrics.aux_loss,
                    "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                    "data": source.state_dict(),
                }
                if run.is_task:
                    record["accuracy"] = window["correct"] / max(window["count"], 1)
                metrics_log.write(record)
                if on_log is not None and info.is_main:
                    on_log(record)
                if bar is not None:
                    shown = {"loss": f"{loss:.3f}"}
                    if run.is_task:
                        shown["acc"] = f"{record['accuracy']:.1%}"
                    else:
                        shown["bpc"] = f"{loss / LN2:.3f}"
                    shown["tok/s"] = f"{record['tokens_per_s']:,.0f}"
                    bar.set_postfix(shown, refresh=False)
                window = {"loss_sum": 0.0, "count": 0, "correct": 0, "tokens": 0,
                          "time": time.time()}
            if bar is not None:
                bar.update(1)
            if run.eval_every and step % run.eval_every == 0 and step < run.steps:
                if info.is_main:
                    metrics_log.write(periodic_eval(model, run, eval_data, step))
                dist_utils.barrier()
            if run.checkpoint_every and step % run.checkpoint_every == 0 and step < end:
                last_checkpoint = save(step)
        if bar is not None:
            bar.close()
        if last_checkpoint is None or last_checkpoint.name != ckpt.step_dir_name(step):
            last_checkpoint = save(step)
        final_eval: dict[str, Any] = {}
        if info.is_main and step == run.steps:
            final_eval = run_final_eval(model, run, eval_data)
            metrics_log.write({"kind": "final_eval", "step": step, **final_eval})
            save_plot(run_dir)
            print_fn(format_final_eval(final_eval, model_config.seq_len))
        dist_utils.barrier()
        return TrainResult(run_dir=run_dir, step=step, checkpoint=last_checkpoint,
                           final_eval=final_eval, seconds=time.time() - started)
    finally:
        dist_utils.teardown()


def periodic_eval(model: MemoryLM, run: Any, eval_data: Any, step: int) -> dict[str, Any]:
    if run.is_task:
        result = evaluate_tasks(model, eval_data, batch_size=run.eval_batch_size,
                                num_segments=run.eval_segments, precision=run.precision)
        return {"kind": "eval", "step": step, "val_accuracy": result.overall,
                "val_accuracy_by_distance": {str(d): a for d, a in result.accuracy.items()}}
    result = evaluate(model, eval_data, batch_size=run.eval_batch_size, precision=run.precision)
    return {"kind": "eval", "step": step, "val_loss": result.loss, "val_bpc": result.bpc}
