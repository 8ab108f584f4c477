"""``memtx bench lm --data PATH``: bits per character on a text file at equal training time and
at equal training tokens.

Every architecture gets the same width, depth, heads and segment length, memories of the same
size, parameter counts within 10% (``ff_mult`` equalises them), the same seed, data order and
recipe (AdamW, linear warmup then a constant learning rate, so that one run serves both
budgets). The models train *round-robin in one process*, one step each in turn, each timing only
its own steps: the machine's noise hits all of them alike. A model stops once it has passed
both budgets:

* the **time budget** (``--minutes`` of its own training steps): at the first step past it, the
  model is evaluated on the whole validation split with the memory carried;
* the **token budget** (``--tokens``): the same, at the first step past it.

Along the way, at every ``budget / points`` of training time, the model is evaluated on the
first ``--curve-bytes`` of the validation split (the bpc-versus-time curve). Then, per
architecture: training tokens/s (its own steps), streaming-generation tokens/s and peak training
memory (a fresh process, memory filled). Output in ``--out``: ``lm.json``, ``lm.md`` and
``lm.png`` (validation bpc against training time).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memtx.bench import common

LN2 = math.log(2.0)


@dataclass
class LMBenchConfig:
    """Sizes and budgets of ``memtx bench lm`` (the defaults are the full bench)."""

    data: str = ""
    models: list[str] | None = None
    dim: int = 128
    depth: int = 3
    heads: int = 4
    seq_len: int = 64
    memory_slots: int = 128
    params: int | None = None
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 50
    minutes: float = 3.0
    tokens: int = 1_000_000
    points: int = 6
    curve_bytes: int = 16_384
    eval_batch_size: int = 16
    generate_tokens: int = 256
    memory: bool = True
    seed: int = 0
    threads: int = 2
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-architecture fields


QUICK = dict(dim=32, depth=1, heads=2, seq_len=16, memory_slots=32, batch_size=4,
             warmup_steps=2, minutes=0.01, tokens=2_048, points=2, curve_bytes=512,
             eval_batch_size=4, generate_tokens=16)

OUTPUTS = ("lm.json", "lm.md", "lm.png")


class Contender:
    """One architecture's model, optimizer, data cursor, memory and clocks."""

    def __init__(self, spec: common.ArchConfig, cfg: LMBenchConfig, corpus: Any) -> None:
        from memtx.training import TextSource, build_optimizer

        self.spec = spec
        torch.manual_seed(cfg.seed)
        self.model = spec.build()
        self.model.train()
        self.optimizer = build_optimizer(self.model, lr=cfg.lr)
        self.source = TextSource(corpus.split("train"), cfg.batch_size, cfg.seq_len)
        self.state = None
        self.step = 0
        self.tokens = 0
        self.seconds = 0.0
        self.curve: list[dict[str, float]] = []
        self.at_time: dict[str, float] | None = None
        self.at_tokens: dict[str, float] | None = None
        self.next_point = 0

    @property
    def done(self) -> bool:
        return self.at_time is not None and self.at_tokens is not None

    def train_step(self, cfg: LMBenchConfig) -> None:
        from memtx.training import train_step

        segment = self.source.next_segment()
        lr = cfg.lr * min(1.0, (self.step + 1) / max(cfg.warmup_steps, 1))
        start = time.perf_counter()
        metrics, self.state = train_step(self.model, self.optimizer, [segment], self.state, lr=lr,
                                         step=self.step + 1)
        self.seconds += time.perf_counter() - start
        self.step += 1
        self.tokens += metrics.tokens
        self.last_loss = metrics.loss_sum / max(metrics.count, 1)


def evaluate_bpc(model: Any, data: Any, batch_size: int) -> float:
    from memtx.training import evaluate

    return evaluate(model, data, batch_size=batch_size).bpc


def run(cfg: LMBenchConfig, out: str | Path, *, overwrite: bool = False,
        log=lambda message: print(message, file=sys.stderr, flush=True)) -> dict[str, Any]:
    import memtx
    from memtx.bench.speed import SpeedConfig, peak_training_memory_mib
    from memtx.training.loop import load_data

    archs = common.resolve_models(cfg.models)
    corpus = load_data(cfg.data)  # a missing or unreadable file fails here, before any work
    shared = dict(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, seq_len=cfg.seq_len)
    per_arch = common.apply_overrides(common.memory_fields(cfg.memory_slots, cfg.seq_len),
                                      cfg.extra)
    configs, target = common.equal_param_configs(archs, shared, per_arch, cfg.params)
    out = common.prepare_out_dir(out, OUTPUTS, overwrite)
    valid = corpus.split("valid")
    min_valid = cfg.eval_batch_size * (cfg.seq_len + 1)
    if len(valid) < min_valid:
        raise common.InputError(
            f"--data {cfg.data}: the validation split has {len(valid):,} bytes, fewer than "
            f"{min_valid:,} ({cfg.eval_batch_size} streams of a segment and one target); use a "
            "larger file"
        )
    curve_data = valid[: min(cfg.curve_bytes, len(valid))]
    torch.set_num_threads(cfg.threads)
    budget_s = cfg.minutes * 60.0
    log(f"lm bench on {cfg.data}: {len(configs)} architectures, ~{target:,} parameters each; "
        f"budgets {cfg.minutes:g} min of training and {cfg.tokens:,} tokens")
    contenders = [Contender(spec, cfg, corpus) for spec in configs]
    started = time.time()
    point_every = budget_s / max(cfg.points, 1)
    while not all(c.done for c in contenders):
        for c in contenders:
            if c.done:
                continue
            c.train_step(cfg)
            if not math.isfinite(c.last_loss):
                raise common.InputError(f"{c.spec.arch}: the training loss became {c.last_loss}")
            if c.seconds >= (c.next_point + 1) * point_every and c.next_point < cfg.points:
                c.next_point += 1
                c.curve.append({"seconds": c.seconds, "tokens": c.tokens,
                                "bpc": evaluate_bpc(c.model, curve_data, cfg.eval_batch_size)})
            snapshot = None
            if c.at_time is None and c.seconds >= budget_s:
                snapshot = c.at_time = {"seconds": c.seconds, "tokens": c.tokens, "steps": c.step}
            if c.at_tokens is None and c.tokens >= cfg.tokens:
                snapshot = c.at_tokens = {"seconds": c.seconds, "tokens": c.tokens, "steps": c.step}
            if snapshot is not None:
                bpc = evaluate_bpc(c.model, valid, cfg.eval_batch_size)
                for record in (c.at_time, c.at_tokens):
                    if record is not None and "bpc" not in record:
                        record["bpc"] = bpc
                log(f"  {c.spec.arch}: step {c.step}, {c.seconds:.0f}s, {c.tokens:,} tokens: "
                    f"valid bpc {bpc:.3f}")
    result: dict[str, Any] = {
        "bench": "lm",
        "config": {**asdict(cfg), "models": archs},
        "param_budget": target,
        "valid_bytes": len(valid),
        "machine": common.machine_info(cfg.threads),
        "architectures": {},
    }
    for c in contenders:
        gen = measure_generation(c.model, cfg.generate_tokens)
        entry = {
            "params": c.spec.params,
            "model_config": c.model.config.to_dict(),
            "bpc_at_time": c.at_time["bpc"],
            "tokens_at_time": c.at_time["tokens"],
            "bpc_at_tokens": c.at_tokens["bpc"],
            "seconds_at_tokens": c.at_tokens["seconds"],
            "train_tokens_per_s": c.tokens / max(c.seconds, 1e-9),
            "generate_tokens_per_s": gen,
            "curve": c.curve,
        }
        if cfg.memory:
            entry["peak_train_memory_mib"] = peak_training_memory_mib(
                SpeedConfig(arch=c.spec.arch, model=c.spec.fields, batch_size=cfg.batch_size,
                            threads=cfg.threads, seed=cfg.seed), "memtx")
        result["architectures"][c.spec.arch] = entry
    del memtx
    result["seconds"] = time.time() - started
    common.write_json(out / "lm.json", result)
    common.atomic_write_text(out / "lm.md", markdown(result) + "\n")
    plot(result, out / "lm.png")
    return result


@torch.no_grad()
def measure_generation(model: Any, num_tokens: int) -> float:
    """Streaming-generation tokens/s (one stream, greedy, memory carried)."""
    import memtx

    model.eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    memtx.generate(model, prompt, max_new_tokens=4, temperature=0.0)  # warm up
    start = time.perf_counter()
    memtx.generate(model, prompt, max_new_tokens=num_tokens, temperature=0.0)
    return num_tokens / (time.perf_counter() - start)


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    header = ["architecture", "params", f"bpc @ {cfg['minutes']:g} min",
              f"tokens in {cfg['minutes']:g} min", f"bpc @ {cfg['tokens'] / 1e6:g}M tokens",
              "train tok/s", "generate tok/s", "peak train MiB"]
    rows = []
    for arch, r in sorted(result["architectures"].items(), key=lambda kv: kv[1]["bpc_at_time"]):
        mem = r.get("peak_train_memory_mib")
        rows.append([f"`{arch}`", f"{r['params'] / 1e6:.2f}M", f"{r['bpc_at_time']:.3f}",
                     f"{r['tokens_at_time'] / 1e6:.2f}M", f"{r['bpc_at_tokens']:.3f}",
                     f"{r['train_tokens_per_s']:,.0f}",
                     f"{r['generate_tokens_per_s']:,.0f}", "" if mem is None else f"{mem:,.0f}"])
    text = [
        f"Validation bits per character of `{Path(cfg['data']).name}` ({result['valid_bytes']:,} "
        "bytes, memory carried over the whole split) after the same training time and after "
        f"the same number of tokens; ~{result['param_budget']:,} parameters each (within 10%), "
        f"dim {cfg['dim']}, depth {cfg['depth']}, heads {cfg['heads']}, segments of "
        f"{cfg['seq_len']}, at most {cfg['memory_slots']} memory vectors per layer, batch "
        f"{cfg['batch_size']}.",
        "",
        common.markdown_table(header, rows),
        "",
        f"Recipe (every architecture): AdamW, lr {cfg['lr']:g} after {cfg['warmup_steps']} "
        f"linear warmup steps, then constant; seed {cfg['seed']}; the models train one step "
        "each in turn in one process, each timing only its own steps. The plot's curve is "
        f"evaluated on the first {cfg['curve_bytes']:,} bytes of the validation split; the "
        "table on all of it.",
        "",
        common.duration_line(result),
    ]
    return "\n".join(text)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (arch, r) in enumerate(result["architectures"].items()):
        xs = [p["seconds"] / 60 for p in r["curve"]]
        ys = [p["bpc"] for p in r["curve"]]
        ax.plot(xs, ys, "o-", color=f"C{i}", label=arch, markersize=3)
    ax.set_xlabel("training time (minutes of the model's own steps)")
    ax.set_ylabel(f"validation bpc (first {result['config']['curve_bytes']:,} bytes)")
    ax.set_title("bits per character against training time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)
    return path


# -- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LMBenchConfig()
    parser.add_argument("--data", required=True, help="a text file or folder (or enwik8)")
    parser.add_argument("--out", default="bench/lm", help="output directory (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and budgets: checks the whole path in seconds")
    parser.add_argument("--models", default="all", help="comma-separated architectures (default all)")
    parser.add_argument("--minutes", type=float, default=None,
                        help=f"training-time budget per model (default {d.minutes:g})")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"training-token budget per model (default {d.tokens:,})")
    parser.add_argument("--params", type=int, default=None,
                        help="parameter budget (default: the smallest every architecture can meet)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--set", nargs="*", default=[], metavar="ARCH.FIELD=VALUE",
                        help="change one architecture's config, e.g. expire_span.max_span=256")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads)


def config_from_args(args: argparse.Namespace) -> LMBenchConfig:
    from memtx.errors import ConfigError

    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    values.update(data=args.data, models=args.models, seed=args.seed, threads=args.threads,
                  params=args.params, memory=not args.no_memory,
                  extra=common.parse_arch_overrides(args.set))
    if args.minutes is not None:
        if not args.minutes > 0:
            raise ConfigError(f"--minutes must be positive, got {args.minutes}")
        values["minutes"] = args.minutes
    if args.tokens is not None:
        if args.tokens < 1:
            raise ConfigError(f"--tokens must be at least 1, got {args.tokens}")
        values["tokens"] = args.tokens
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    return LMBenchConfig(**values)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = run(cfg, args.out, overwrite=args.overwrite)
    print(markdown(result))
    print(f"\nwrote {Path(args.out) / 'lm.json'}, lm.md, lm.png")
    return 0
