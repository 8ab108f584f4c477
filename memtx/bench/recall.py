"""``memtx bench recall``: which memory recalls a key/value pair written d segments back.

Every architecture is trained on the built-in associative-recall task
(:class:`memtx.data.AssociativeRecall`: one key/value pair written, then asked for ``d``
segments later, ``d`` drawn from the bench's distances) with

* the same width, depth and heads, and parameter counts within 10% of each other (each
  architecture's ``ff_mult`` is chosen to meet one budget, see
  :func:`memtx.bench.common.equal_param_configs`);
* memories of the same size: at most ``MEMORY_SLOTS`` vectors attended per layer (XL and
  Expire-Span cache that many; Compressive and Memory-XL split them between the short memory
  and the compressed/long one; Memformer has that many slots; GateLoop's memory is its
  recurrent state);
* the same training recipe, seed and number of tokens (``steps x batch x bptt x seq_len``),
  with the memory's autograd graph kept over ``bptt`` segments so that memories written by a
  learned module (Memformer, Memory-XL, GateLoop's gates) get a gradient from later answers.

Each trained model is then evaluated on fresh streams for answer accuracy per distance, with
the memory carried from segment to segment and with it wiped before every segment (chance is
10%: the answer is never in the query's own segment). Output in ``--out``: ``recall.json``
(configs, recipe, machine, per-architecture results), ``recall.md`` (the table) and
``recall.png`` (accuracy against distance), plus each architecture's run directory
(``runs/ARCH``: metrics, config, final checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memtx.bench import common

MEMORY_SLOTS = 64


@dataclass
class RecallBenchConfig:
    """Sizes and recipe of ``memtx bench recall`` (the defaults are the full bench)."""

    models: list[str] | None = None
    dim: int = 128
    depth: int = 2
    heads: int = 4
    seq_len: int = 16
    memory_slots: int = MEMORY_SLOTS
    params: int | None = None
    distances: tuple[int, ...] = (1, 2, 4, 8, 16)
    batch_size: int = 32
    bptt_segments: int = 4
    steps: int = 1500
    lr: float = 3e-3
    warmup_steps: int = 100
    eval_batch_size: int = 64
    eval_segments: int = 160
    seed: int = 0
    threads: int = 2
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.bptt_segments * self.seq_len


QUICK = dict(dim=32, depth=1, heads=2, seq_len=8, memory_slots=16, distances=(1, 2, 4),
             batch_size=8, bptt_segments=2, steps=6, warmup_steps=2, eval_batch_size=8,
             eval_segments=12)

OUTPUTS = ("recall.json", "recall.md", "recall.png")


def run(cfg: RecallBenchConfig, out: str | Path, *, overwrite: bool = False,
        log=lambda message: print(message, file=sys.stderr, flush=True)) -> dict[str, Any]:
    from memtx.training import RunConfig, train

    archs = common.resolve_models(cfg.models)
    shared = dict(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, seq_len=cfg.seq_len)
    per_arch = common.apply_overrides(common.memory_fields(cfg.memory_slots, cfg.seq_len),
                                      cfg.extra)
    # configs first: a bad field fails here, before the output directory is touched
    configs, target = common.equal_param_configs(archs, shared, per_arch, cfg.params)
    out = common.prepare_out_dir(out, OUTPUTS + ("runs",), overwrite)
    if overwrite and (out / "runs").exists():
        import shutil

        shutil.rmtree(out / "runs")
    torch.set_num_threads(cfg.threads)
    log(f"recall bench: {len(configs)} architectures, ~{target:,} parameters each, "
        f"{cfg.tokens:,} training tokens each")
    result: dict[str, Any] = {
        "bench": "recall",
        "config": {**asdict(cfg), "distances": list(cfg.distances), "models": archs},
        "param_budget": target,
        "training_tokens": cfg.tokens,
        "machine": common.machine_info(cfg.threads),
        "architectures": {},
    }
    started = time.time()
    for spec in configs:
        run_cfg = RunConfig(
            model=spec.arch, preset="tiny", model_config=spec.fields, data="task:recall",
            task_distances=cfg.distances, task_size=1, batch_size=cfg.batch_size,
            bptt_segments=cfg.bptt_segments, steps=cfg.steps, lr=cfg.lr,
            warmup_steps=cfg.warmup_steps, seed=cfg.seed, eval_batch_size=cfg.eval_batch_size,
            eval_segments=cfg.eval_segments, checkpoint_every=0, keep_checkpoints=1,
            progress=False, log_every=max(1, min(50, cfg.steps // 10)), device="cpu",
        )
        log(f"  {spec.arch}: {spec.params:,} parameters, {spec.fields}")
        t0 = time.time()
        trained = train(run_cfg, out / "runs" / spec.arch, print_fn=lambda _: None,
                        log_fn=lambda _: None)
        seconds = time.time() - t0
        final = trained.final_eval
        entry = {
            "params": spec.params,
            "model_config": run_cfg.resolved_model_config().to_dict(),
            # keyed by str(distance), as they read back from the JSON file
            "accuracy_carried": dict(final["accuracy_carried"]),
            "accuracy_wiped": dict(final["accuracy_wiped"]),
            "answers": dict(final["answers"]),
            "chance": final["chance"],
            "seconds": seconds,
            "run_dir": str(Path("runs") / spec.arch),
        }
        result["architectures"][spec.arch] = entry
        acc = " ".join(f"d{d}={entry['accuracy_carried'].get(str(d), float('nan')):.0%}"
                       for d in cfg.distances)
        log(f"    {seconds:.0f}s; carried: {acc}")
    result["seconds"] = time.time() - started
    common.write_json(out / "recall.json", result)
    common.atomic_write_text(out / "recall.md", markdown(result) + "\n")
    plot(result, out / "recall.png")
    return result


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    distances = cfg["distances"]
    header = (["architecture", "params"] + [f"d={d} carried" for d in distances]
              + [f"d={d} wiped" for d in distances] + ["train time"])
    rows = []
    for arch, r in result["architectures"].items():
        carried = [common.fmt_pct(r["accuracy_carried"].get(str(d))) for d in distances]
        wiped = [common.fmt_pct(r["accuracy_wiped"].get(str(d))) for d in distances]
        rows.append([f"`{arch}`", f"{r['params'] / 1e6:.2f}M", *carried, *wiped,
                     f"{r['seconds'] / 60:.1f} min"])
    chance = next(iter(result["architectures"].values()))["chance"] if rows else 0.1
    text = [
        f"Answer accuracy by distance d (the pair was written d segments of {cfg['seq_len']} "
        f"tokens before the question), memory carried vs wiped every segment; chance "
        f"{chance:.0%}. Each model: {result['training_tokens']:,} training tokens, "
        f"~{result['param_budget']:,} parameters (within 10%), dim {cfg['dim']}, depth "
        f"{cfg['depth']}, heads {cfg['heads']}, at most {cfg['memory_slots']} memory vectors "
        "per layer.",
        "",
        common.markdown_table(header, rows),
        "",
        "Configs (ff_mult equalises parameters): "
        + "; ".join(f"`{a}` ff_mult={r['model_config'].get('ff_mult')}"
                    + "".join(f", {k}={r['model_config'][k]}" for k in
                              ("mem_len", "cmem_len", "lmem_len", "num_memory_slots", "max_span")
                              if k in r['model_config'])
                    for a, r in result["architectures"].items()),
        "",
        f"Recipe (every architecture): {cfg['steps']} AdamW steps of {cfg['batch_size']} "
        f"streams x {cfg['bptt_segments']} segments (autograd graph kept across them), lr "
        f"{cfg['lr']:g} after {cfg['warmup_steps']} warmup steps, cosine decay, seed "
        f"{cfg['seed']}; evaluated on {cfg['eval_batch_size']} fresh streams x "
        f"{cfg['eval_segments']} segments (answers per distance in `recall.json`).",
        "",
        common.duration_line(result),
    ]
    return "\n".join(text)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    distances = result["config"]["distances"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    chance = None
    markers = "osD^vP*X"
    for i, (arch, r) in enumerate(result["architectures"].items()):
        color = f"C{i}"
        # shrinking markers keep identical curves (one model computing what another does)
        # visible on top of each other
        ax.plot(distances, [r["accuracy_carried"].get(str(d)) for d in distances], "-",
                marker=markers[i % len(markers)], markersize=max(10 - 1.2 * i, 3), color=color,
                label=arch, alpha=0.85)
        ax.plot(distances, [r["accuracy_wiped"].get(str(d)) for d in distances], ":", color=color,
                alpha=0.6)
        chance = r["chance"]
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(distances)
    ax.set_xticklabels([str(d) for d in distances])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("distance (segments between the pair and its question)")
    ax.set_ylabel("answer accuracy")
    ax.set_title("associative recall: memory carried (solid) vs wiped (dotted)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)
    return path


# -- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = RecallBenchConfig()
    parser.add_argument("--out", default="bench/recall", help="output directory (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and a few steps: checks the whole path in seconds")
    parser.add_argument("--models", default="all", help="comma-separated architectures (default all)")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--distances", default=None,
                        help="comma-separated distances in segments (default "
                             f"{','.join(map(str, d.distances))})")
    parser.add_argument("--params", type=int, default=None,
                        help="parameter budget (default: the smallest every architecture can meet)")
    parser.add_argument("--set", nargs="*", default=[], metavar="ARCH.FIELD=VALUE",
                        help="change one architecture's config, e.g. expire_span.max_span=256")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads)


def config_from_args(args: argparse.Namespace) -> RecallBenchConfig:
    from memtx.errors import ConfigError

    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    values.update(models=args.models, seed=args.seed, threads=args.threads, params=args.params,
                  extra=common.parse_arch_overrides(args.set))
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {args.steps}")
        values["steps"] = args.steps
    if args.distances is not None:
        try:
            distances = tuple(int(x) for x in args.distances.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--distances must be comma-separated integers, got {args.distances!r}") from None
        if not distances or min(distances) < 1:
            raise ConfigError(f"--distances must be segment counts >= 1, got {args.distances!r}")
        values["distances"] = distances
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    return RecallBenchConfig(**values)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = run(cfg, args.out, overwrite=args.overwrite)
    print(markdown(result))
    print(f"\nwrote {Path(args.out) / 'recall.json'}, recall.md, recall.png")
    return 0
