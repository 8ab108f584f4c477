"""What the ``memtx bench`` commands share: equal-parameter configs, the output directory
(JSON, Markdown, PNG written atomically), and machine facts recorded with every result."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import memtx
from memtx import allocator
from memtx.errors import ConfigError, InputError
from memtx.registry import config_class

# The knob that equalises parameter counts: every architecture keeps the bench's width, depth
# and heads, and only the width of its feedforward layers (dim * ff_mult) moves.
PARAM_KNOB = "ff_mult"
MAX_KNOB = 32
PARAM_TOLERANCE = 0.10


@dataclass
class ArchConfig:
    """One architecture's config in a bench and its parameter count."""

    arch: str
    fields: dict[str, Any]
    params: int

    def build(self) -> memtx.MemoryLM:
        return memtx.build(self.arch, **self.fields)


def resolve_models(spec: str | Sequence[str] | None) -> list[str]:
    """``all`` / None: every registered architecture; else a comma-separated list of names,
    each checked."""
    if spec is None or spec == "all":
        return list(memtx.available())
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in memtx.available()]
    if unknown or not names:
        raise ConfigError(
            f"--models: unknown architecture(s) {', '.join(unknown) or '(none given)'}; known: "
            f"{', '.join(memtx.available())} (or 'all')"
        )
    return names


def parse_arch_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["expire_span.max_span=256", ...]`` -> ``{"expire_span": {"max_span": 256}}``; values
    are read as JSON where they parse (numbers, true/false, lists), else kept as strings."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        arch, dot, name = key.partition(".")
        if not sep or not dot or not arch or not name:
            raise ConfigError(f"--set expects ARCH.FIELD=VALUE (e.g. expire_span.max_span=256), "
                              f"got {item!r}")
        resolve_models(arch)  # a clear error for an unknown architecture
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.setdefault(arch, {})[name] = value
    return out


def apply_overrides(per_arch: dict[str, dict[str, Any]],
                    overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``per_arch`` with each architecture's fields updated by ``overrides`` (a new dict)."""
    merged = {arch: dict(fields) for arch, fields in per_arch.items()}
    for arch, values in overrides.items():
        merged.setdefault(arch, {}).update(values)
    return merged


def count_params(arch: str, fields: dict[str, Any]) -> int:
    with torch.device("meta"):
        model = memtx.build(arch, **fields)
    return sum(p.numel() for p in model.parameters())


def arch_fields(arch: str, shared: dict[str, Any], per_arch: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``shared`` fields the architecture has, then its own entries of ``per_arch``."""
    known = set(config_class(arch).field_names())
    out = {k: v for k, v in shared.items() if k in known}
    out.update(per_arch.get(arch, {}))
    return out


def equal_param_configs(
    archs: Sequence[str],
    shared: dict[str, Any],
    per_arch: dict[str, dict[str, Any]],
    target: int | None = None,
    tolerance: float = PARAM_TOLERANCE,
) -> tuple[list[ArchConfig], int]:
    """Configs with parameter counts within ``tolerance`` of ``target``.

    Width, depth and heads stay as given; each architecture's ``ff_mult`` is the one (1 to 32)
    whose count is nearest the target. ``target=None`` picks the smallest budget that every
    architecture can meet: the largest count among the architectures at ``ff_mult=1`` (their
    memory machinery is the part that cannot shrink). Raises :class:`ConfigError` naming the
    architectures that cannot get within tolerance.
    """
    if target is None:
        target = max(count_params(a, {**arch_fields(a, shared, per_arch), PARAM_KNOB: 1})
                     for a in archs)
    chosen, misses = [], []
    for arch in archs:
        base = arch_fields(arch, shared, per_arch)
        if PARAM_KNOB in base:  # fixed by the caller
            counts = {base[PARAM_KNOB]: count_params(arch, base)}
        else:
            counts = {}
            for knob in range(1, MAX_KNOB + 1):
                counts[knob] = count_params(arch, {**base, PARAM_KNOB: knob})
                if counts[knob] > target * (1 + tolerance):
                    break
        knob = min(counts, key=lambda k: abs(counts[k] - target))
        params = counts[knob]
        if abs(params - target) > tolerance * target:
            misses.append(f"{arch} ({params:,} at {PARAM_KNOB}={knob})")
        chosen.append(ArchConfig(arch, {**base, PARAM_KNOB: knob}, params))
    if misses:
        raise ConfigError(
            f"cannot bring every architecture within {tolerance:.0%} of {target:,} parameters: "
            + "; ".join(misses) + ". Pass a different --params budget or change the sizes"
        )
    return chosen, target


def memory_fields(slots: int, seq_len: int) -> dict[str, dict[str, Any]]:
    """Memory sizes per architecture so that each attends to at most ``slots`` vectors per
    layer. Where there are two memories they split the slots, except that Compressive's short
    memory is at least a segment long (it compresses whole evicted segments); its compressed
    memory then gets what is left, and at least a quarter of ``slots``."""
    half = max(slots // 2, 1)
    short = max(half, seq_len)
    return {
        "transformer_xl": {"mem_len": slots},
        "expire_span": {"mem_len": slots, "max_span": 1024},
        "compressive": {"mem_len": short, "cmem_len": max(slots - short, slots // 4, 1),
                        "compress_ratio": 4},
        "memory_xl": {"mem_len": half, "lmem_len": half},
        "memformer": {"num_memory_slots": slots},
        "gateloop": {},
    }


def add_allocator_flag(parser: Any) -> None:
    """``--retain-freed-memory`` for the side-by-side scripts (see :func:`apply_allocator_flag`)."""
    parser.add_argument(
        "--retain-freed-memory", action="store_true",
        help="time both contenders with glibc keeping freed memory (memtx.allocator), as the "
             "memtx command does; the reference's steps fault far fewer pages then (speed "
             "only: peak memory runs in fresh processes with the default allocator)")


def apply_allocator_flag(args: Any) -> bool:
    """Apply ``--retain-freed-memory`` to this process (every contender timed in it); returns
    whether the setting is on, for the JSON output."""
    if getattr(args, "retain_freed_memory", False) and not allocator.retain_freed_memory():
        raise SystemExit("--retain-freed-memory needs Linux with glibc")
    return allocator.is_retaining()


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "retain_freed_memory": allocator.is_retaining(),
        # PASSIVE makes OpenMP's workers sleep between ops: every op then pays their wake-up
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def duration_line(result: dict[str, Any]) -> str:
    """The closing line of every bench table: how long the whole bench took, where."""
    machine = result["machine"]
    return (f"Whole bench: {result['seconds'] / 60:.1f} min on {machine['threads']} threads "
            f"(torch {machine['torch']}).")


def prepare_out_dir(out: str | Path, names: Sequence[str], overwrite: bool) -> Path:
    """``out`` as a directory for ``names``: refuses to replace an earlier result there unless
    ``overwrite`` is set, before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory")
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise InputError(
            f"--out {out} already holds {', '.join(existing)} from an earlier bench; pass "
            "--overwrite to replace them or choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".memtx-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise InputError(f"--out {out} is not a directory you can write to: {err}") from None
    return out


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def fmt_pct(x: float | None) -> str:
    return "" if x is None else f"{x:.0%}" if x >= 0.995 or x < 0.005 else f"{x:.1%}"
