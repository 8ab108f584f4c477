"""What a training run is: :class:`RunConfig`, model presets, and merging TOML files and
command-line options into one config.

Precedence, lowest first: :class:`RunConfig` defaults < the preset's model fields < a TOML file
(``--config``) < command-line options. A TOML file has run fields at the top level and model
fields in a ``[model_config]`` table::

    model = "transformer_xl"
    data = "/path/to/text.txt"
    steps = 2000
    lr = 1e-3

    [model_config]
    dim = 256
    mem_len = 256

On the command line every run field is ``--field-name VALUE`` and every field of the chosen
architecture's config is ``--field-name VALUE`` too (``--dim 256 --mem-len 256``): run fields and
model fields never share a name. Unknown fields and wrong types fail with a
:class:`memtx.ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from memtx.config import _check_type, _type_name
from memtx.errors import ConfigError
from memtx.registry import available, config_class

# Named model sizes. A preset only sets the fields the chosen architecture has (an architecture
# without mem_len ignores it), and any model field given explicitly wins over the preset.
PRESETS: dict[str, dict[str, Any]] = {
    # for tests: trains in a second
    "tiny": {"dim": 32, "depth": 2, "heads": 2, "seq_len": 16, "mem_len": 16},
    # the default for the built-in recall task (`memtx train` with no arguments): two layers
    # (one can mark each value with its key, the other find it), short segments (the answers
    # per token of compute double when seq_len halves), and mem_len = 3 segments, so every
    # layer reaches the write segment directly from every query at distance <= 2
    "recall": {"dim": 128, "depth": 2, "heads": 4, "seq_len": 16, "mem_len": 48},
    # the default for text
    "small": {"dim": 256, "depth": 4, "heads": 8, "seq_len": 128, "mem_len": 128},
}

TASKS = {
    "recall": "associative recall: '? K' must be answered with the value written after key K "
    "d segments earlier (memtx.data.AssociativeRecall)",
    "copy": "delayed copy: after '#', reproduce a random string written d segments earlier "
    "(memtx.data.DelayedCopy)",
}
TASK_PREFIX = "task:"


@dataclass(kw_only=True)
class RunConfig:
    """Every setting of a training run (model fields live in ``model_config``).

    The defaults are ``memtx train`` with no arguments: Transformer-XL (``recall`` preset) on
    associative recall with one key/value pair written 1 or 2 segments before it is asked for.
    Measured on 2 CPU cores: answer accuracy passes 90% near step 150 and the 500 steps take
    under a minute of CPU time; the final report shows ~100% with the memory carried and
    chance (10%) with it wiped. More pairs per episode need the model to bind each value to its
    key (an induction-style circuit), which takes far longer: with 4 pairs the same model was at
    54% after 1500 steps, so that is left to ``--task-size``.

    Attributes:
        model: architecture name (``memtx list`` shows them).
        preset: a name from :data:`PRESETS`; None picks ``recall`` for a task and ``small``
            for text.
        model_config: model config fields that override the preset and the architecture's
            defaults (the ``[model_config]`` table of a TOML file).
        data: a text file or folder, ``enwik8``, or ``task:recall`` / ``task:copy``.
        task_distances: for tasks, how many segments back the answer was written.
        task_size: for tasks, how much is written per episode: key/value pairs to recall
            (``task:recall``) or symbols to copy (``task:copy``).
        batch_size: streams (rows) per process; the global batch is ``batch_size * world_size``.
        grad_accum: split each process's rows into this many micro-batches, run one after the
            other (same result as the whole batch at once, in less memory).
        bptt_segments: segments per optimizer step with the memory's autograd graph kept
            between them (backprop through k segments); the state is detached after each step.
        steps: optimizer updates in the run.
        lr: peak learning rate, reached after ``warmup_steps`` and decayed by a cosine to
            ``lr * min_lr_ratio`` at ``steps``.
        warmup_steps: linear warmup length.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        weight_decay: AdamW decay of matrices (never of norms, biases, embeddings).
        beta1, beta2: AdamW moment decay rates.
        grad_clip: clip the global gradient norm to this; 0 disables clipping.
        precision: ``fp32``, or ``bf16`` for bfloat16 autocast (weights and memory stay fp32).
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
        seed: seeds weights, dropout and the task streams.
        log_every: write a ``metrics.jsonl`` line every this many steps.
        eval_every: evaluate every this many steps (0: only at the end).
        eval_batch_size: rows of the evaluation streams (text: the split is cut into this many
            contiguous streams; 1 is exact and slowest).
        eval_segments: for tasks, segments per evaluation stream.
        checkpoint_every: write a checkpoint every this many steps (0: only at the end).
        keep_checkpoints: how many recent checkpoints to keep on disk.
        progress: show a progress bar (only when stderr is a terminal).
    """

    model: str = "transformer_xl"
    preset: str | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    data: str = "task:recall"
    task_distances: tuple[int, ...] = (1, 2)
    task_size: int = 1
    batch_size: int = 64
    grad_accum: int = 1
    bptt_segments: int = 1
    steps: int = 500
    lr: float = 5e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_batch_size: int = 64
    eval_segments: int = 48
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        def require(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"RunConfig.{name}={getattr(self, name)!r} {message}")

        if self.model not in available():
            close = difflib.get_close_matches(self.model, available(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"RunConfig.model={self.model!r} is not an architecture.{hint} "
                f"Known: {', '.join(available())}"
            )
        require(self.preset is None or self.preset in PRESETS, "preset",
                f"is not a preset; known presets: {', '.join(PRESETS)}")
        if self.is_task:
            require(self.task_name in TASKS, "data",
                    f"names an unknown task; known tasks: "
                    f"{', '.join(TASK_PREFIX + t for t in TASKS)}")
        require(len(self.task_distances) > 0 and min(self.task_distances) >= 1, "task_distances",
                "must be a non-empty list of segment distances >= 1")
        for name in ("task_size", "batch_size", "grad_accum", "bptt_segments", "steps", "log_every",
                     "eval_batch_size", "eval_segments", "keep_checkpoints"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            require(getattr(self, name) >= 0, name, "must be >= 0 (0 turns it off)")
        require(self.batch_size % self.grad_accum == 0, "batch_size",
                f"must be divisible by grad_accum={self.grad_accum} (rows are split into "
                "micro-batches)")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(0.0 <= self.beta1 < 1.0, "beta1", "must be in [0, 1)")
        require(0.0 <= self.beta2 < 1.0, "beta2", "must be in [0, 1)")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.precision in ("fp32", "bf16"), "precision", "must be 'fp32' or 'bf16'")
        # builds the model config, so a bad model field fails here, before any training
        self.resolved_model_config()

    # -- derived ----------------------------------------------------------------------------
    @property
    def is_task(self) -> bool:
        return self.data.startswith(TASK_PREFIX)

    @property
    def task_name(self) -> str:
        return self.data[len(TASK_PREFIX):]

    @property
    def preset_name(self) -> str:
        if self.preset is not None:
            return self.preset
        return "recall" if self.is_task else "small"

    def resolved_model_config(self):
        """The architecture's config: its defaults < preset < ``model_config``."""
        from memtx.registry import make_config

        cls = config_class(self.model)
        known = set(cls.field_names())
        values = {k: v for k, v in PRESETS[self.preset_name].items() if k in known}
        values.update(self.model_config)
        try:
            return make_config(self.model, values)
        except ConfigError as err:
            raise ConfigError(f"model config: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["task_distances"] = list(self.task_distances)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(f"RunConfig has no field {key!r}.{suggestion}")
        return cls(**values)

    def replace(self, **changes: Any) -> "RunConfig":
        return type(self).from_dict({**self.to_dict(), **changes})


# Fields that may differ when a run is resumed: they change how a run is watched or saved, not
# the numbers it computes.
RESUMABLE_CHANGES = frozenset(
    {"log_every", "eval_every", "eval_batch_size", "eval_segments", "checkpoint_every",
     "keep_checkpoints", "progress", "device"}
)


def check_field_types(config: Any) -> None:
    """Raise a :class:`ConfigError` naming the first field whose value has the wrong type."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        tp = hints[f.name]
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
            object.__setattr__(config, f.name, value)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            object.__setattr__(config, f.name, value)
        if not _check_type(value, tp):
            raise ConfigError(
                f"{type(config).__name__}.{f.name} must be {_type_name(tp)}, "
                f"got {value!r} ({type(value).__name__})"
            )


def incompatible_fields(saved: RunConfig, new: RunConfig) -> list[str]:
    """Names of fields (``model.dim`` for model fields) whose change would make a resumed run
    compute something other than the saved run's continuation."""
    diffs = []
    saved_d, new_d = saved.to_dict(), new.to_dict()
    for name in saved_d:
        if name in RESUMABLE_CHANGES or name in ("model_config", "preset"):
            continue
        if saved_d[name] != new_d[name]:
            diffs.append(f"{name} ({saved_d[name]!r} -> {new_d[name]!r})")
    if saved.model == new.model:
        old_m = saved.resolved_model_config().to_dict()
        new_m = new.resolved_model_config().to_dict()
        diffs += [f"model.{k} ({old_m[k]!r} -> {new_m[k]!r})" for k in old_m if old_m[k] != new_m[k]]
    return diffs


# -- TOML ---------------------------------------------------------------------------------------
def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as RunConfig values (model fields in its ``[model_config]`` table)."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    return values


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(config: RunConfig) -> str:
    """The run config as TOML that :func:`load_toml` reads back; ``[model_config]`` holds the
    complete resolved model config, so the file alone rebuilds the same model. None values are
    left out (they are every field's default)."""
    lines = []
    for key, value in config.to_dict().items():
        if key == "model_config" or value is None:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    lines.append("")
    lines.append("[model_config]")
    for key, value in config.resolved_model_config().to_dict().items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


# -- command line -------------------------------------------------------------------------------
def parse_value(text: str, tp: Any, name: str) -> Any:
    """Parse a command-line string into a value of annotation ``tp`` (naming ``name`` on error)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_value(text, arg, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"--{name}: cannot parse {text!r}")
    if origin is typing.Literal:
        for arg in args:
            if str(arg) == text:
                return arg
        raise ConfigError(f"--{name} must be one of {list(args)}, got {text!r}")
    if origin in (tuple, list):
        inner = args[0] if args else str
        parts = [p for p in text.replace(" ", "").split(",") if p]
        return tuple(parse_value(p, inner, name) for p in parts)
    try:
        if tp is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
    except ValueError:
        raise ConfigError(f"--{name} must be {_type_name(tp)}, got {text!r}") from None
    raise ConfigError(f"--{name}: cannot parse {text!r} as {_type_name(tp)}")


def run_field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in fields(RunConfig) if f.name != "model_config"}


def model_field_types(model: str) -> dict[str, Any]:
    cls = config_class(model)
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def merge_config(
    *,
    toml_values: dict[str, Any] | None = None,
    cli_values: dict[str, str] | None = None,
) -> RunConfig:
    """Build a :class:`RunConfig` from TOML values and raw command-line strings
    (``{"lr": "1e-3", "dim": "128"}``, keys with underscores). Command-line keys are run fields
    or fields of the chosen architecture's config; anything else is an error naming it."""
    values = dict(toml_values or {})
    cli_values = dict(cli_values or {})
    run_types = run_field_types()
    if "model" in cli_values:
        values["model"] = cli_values.pop("model")
    model_name = values.get("model", RunConfig.model)
    if model_name not in available():
        RunConfig(model=model_name)  # raises the unknown-architecture error
    model_types = model_field_types(model_name)
    model_values = dict(values.pop("model_config", {}) or {})
    for key, text in cli_values.items():
        if key in run_types:
            values[key] = parse_value(text, run_types[key], key.replace("_", "-"))
        elif key in model_types:
            model_values[key] = parse_value(text, model_types[key], key.replace("_", "-"))
        else:
            known = list(run_types) + list(model_types)
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" Did you mean --{hint[0].replace('_', '-')}?" if hint else ""
            raise ConfigError(f"unknown option --{key.replace('_', '-')}.{suggestion}")
    values["model_config"] = model_values
    return RunConfig.from_dict(values)
