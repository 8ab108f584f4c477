"""``memtx bench speed``: training, inference and streaming-generation speed and peak training
memory of every architecture at one size, and the ratio against each reference package that is
installed (compressive-transformer-pytorch, memory-transformer-xl, gateloop-transformer).

Per architecture this runs :func:`memtx.bench.speed.run` (contenders timed alternately, A B A B,
medians of per-step ratios; peak memory in a fresh process with the memory filled). Every
architecture gets the same width, depth, heads, segment length and batch, and memories of the
same size (``mem_len`` vectors per layer, split between the two memories where there are two,
as in ``memtx bench recall``). Output in ``--out``: ``speed.json``, ``speed.md`` and
``speed.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memtx.bench import common

OUTPUTS = ("speed.json", "speed.md", "speed.png")


@dataclass
class SpeedSuiteConfig:
    models: list[str] | str | None = None
    sizes: dict[str, Any] = field(
        default_factory=lambda: dict(dim=256, depth=4, heads=8, seq_len=256))
    memory_slots: int = 256
    batch_size: int = 4
    steps: int = 10
    warmup: int = 2
    generate_tokens: int = 1024
    reference: bool = False
    memory: bool = True
    threads: int = 2
    seed: int = 0


QUICK = dict(sizes=dict(dim=32, depth=1, heads=2, seq_len=16), memory_slots=16, batch_size=2,
             steps=2, warmup=1, generate_tokens=80)


def run(cfg: SpeedSuiteConfig, out: str | Path, *, overwrite: bool = False,
        log=lambda message: print(message, file=sys.stderr, flush=True)) -> dict[str, Any]:
    from memtx.bench import speed
    
    archs = common.resolve_models(cfg.models)
    out = common.prepare_out_dir(out, OUTPUTS, overwrite)
    per_arch = common.memory_fields(cfg.memory_slots, cfg.sizes.get("seq_len", 256))
    result: dict[str, Any] = {"bench": "speed", "config": {**asdict(cfg), "models": archs},
                              "machine": common.machine_info(cfg.threads), "architectures": {}}
    started = time.time()
    for arch in archs:
        fields = common.arch_fields(arch, cfg.sizes, per_arch)
        log(f"  {arch}: {fields}")
        has_reference = speed.reference_for(arch) is not None
        if cfg.reference and not has_reference:
            log(f"    ({arch} has no reference package to compare with)")
        try:
            measured = speed.run(speed.SpeedConfig(
                arch=arch, model=fields, batch_size=cfg.batch_size, steps=cfg.steps,
                warmup=cfg.warmup, generate_tokens=cfg.generate_tokens, threads=cfg.threads,
                reference=cfg.reference and has_reference, memory=cfg.memory, seed=cfg.seed))
        except ImportError as err:  # the reference package is not installed
            log(f"    reference for {arch} not importable ({err}); timing memtx alone")
            measured = speed.run(speed.SpeedConfig(
                arch=arch, model=fields, batch_size=cfg.batch_size, steps=cfg.steps,
                warmup=cfg.warmup, generate_tokens=cfg.generate_tokens, threads=cfg.threads,
                reference=False, memory=cfg.memory, seed=cfg.seed))
        measured["params"] = common.count_params(arch, fields)
        result["architectures"][arch] = measured
        log(f"    train {measured['train_tokens_per_s']:,.0f} tok/s"
            + (f", {measured['train_speedup_vs_reference']:.2f}x reference"
               if "train_speedup_vs_reference" in measured else ""))
    result["seconds"] = time.time() - started
    common.write_json(out / "speed.json", result)
    common.atomic_write_text(out / "speed.md", markdown(result) + "\n")
    plot(result, out / "speed.png")
    return result


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    n = cfg["generate_tokens"]
    header = ["architecture", "params", "train tok/s", "% of matmul rate", "infer tok/s",
              "generate tok/s", f"time/token {n}th vs 64th", "peak train MiB",
              "train vs ref", "infer vs ref", "generate vs ref", "ref peak MiB"]
    rows = []
    for arch, r in result["architectures"].items():
        gen = r.get("generation", {})
        rows.append([
            f"`{arch}`", f"{r['params'] / 1e6:.2f}M", f"{r['train_tokens_per_s']:,.0f}",
            f"{r['fraction_of_matmul_rate']:.0%}", f"{r['infer_tokens_per_s']:,.0f}",
            f"{gen['tokens_per_s']:,.0f}" if gen else "",
            f"{gen['late_over_early_time']:.2f}" if gen else "",
            f"{r['peak_train_memory_mib']:,.0f}" if "peak_train_memory_mib" in r else "",
            _x(r.get("train_speedup_vs_reference")), _x(r.get("infer_speedup_vs_reference")),
            _x(gen.get("speedup_vs_reference")),
            f"{r['reference_peak_train_memory_mib']:,.0f}"
            if "reference_peak_train_memory_mib" in r else "",
        ])
    sizes = ", ".join(f"{k} {v}" for k, v in cfg["sizes"].items())
    text = [
        f"{sizes}, {cfg['memory_slots']} memory vectors per layer, batch {cfg['batch_size']}, "
        f"fp32, {cfg['threads']} threads; medians of {cfg['steps']} alternated steps. "
        "\"vs ref\" is the reference package's time over memtx's (>1: memtx is faster); "
        "blank where there is no reference package or it was not asked for (--reference).",
        "",
        common.markdown_table(header, rows),
        "",
        common.duration_line(result),
    ]
    return "\n".join(text)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    archs = list(result["architectures"])
    rs = [result["architectures"][a] for a in archs]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    xs = range(len(archs))
    axes[0].bar(xs, [r["train_tokens_per_s"] for r in rs], color="C0")
    axes[0].set_title("training tokens/s")
    gen = [r.get("generation", {}).get("tokens_per_s", 0.0) for r in rs]
    axes[1].bar(xs, gen, color="C1")
    axes[1].set_title("streaming generation tokens/s")
    for ax in axes:
        ax.set_xticks(list(xs))
        ax.set_xticklabels(archs, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)
    return path


# -- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SpeedSuiteConfig()
    parser.add_argument("--out", default="bench/speed", help="output directory (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few steps: checks the whole path in seconds")
    parser.add_argument("--models", default="all", help="comma-separated architectures (default all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="shared sizes, e.g. dim=256 depth=4 heads=8 seq_len=256 (default "
                             + " ".join(f"{k}={v}" for k, v in d.sizes.items()) + ")")
    parser.add_argument("--memory-slots", type=int, default=None,
                        help=f"memory vectors per layer (default {d.memory_slots})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps (default {d.steps})")
    parser.add_argument("--generate-tokens", type=int, default=None,
                        help=f"tokens generated for the generation profile (default {d.generate_tokens})")
    parser.add_argument("--reference", action="store_true",
                        help="also time the reference packages side by side (when installed)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--threads", type=int, default=d.threads)


def config_from_args(args: argparse.Namespace) -> SpeedSuiteConfig:
    from memtx.errors import ConfigError

    values: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in QUICK.items()} \
        if args.quick else {}
    sizes = dict(values.get("sizes", SpeedSuiteConfig().sizes))
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        try:
            sizes[key] = json.loads(text)
        except json.JSONDecodeError:
            sizes[key] = text
    values.update(models=args.models, sizes=sizes, reference=args.reference,
                  memory=not args.no_memory, threads=args.threads)
    for name in ("memory_slots", "batch_size", "steps", "generate_tokens"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
            values[name] = value
    if values.get("generate_tokens", SpeedSuiteConfig.generate_tokens) < 80:
        raise ConfigError("--generate-tokens must be at least 80 (the profile compares the 64th "
                          "token with the last)")
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    return SpeedSuiteConfig(**values)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = run(cfg, args.out, overwrite=args.overwrite)
    print(markdown(result))
    print(f"\nwrote {Path(args.out) / 'speed.json'}, speed.md, speed.png")
    return 0
