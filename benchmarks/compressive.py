"""Compressive Transformer: speed and memory side by side with the reference package, and the
training-quality comparison behind memtx's default skeleton.

    # the bars (dim 256, depth 4, heads 8, batch 4, fp32, 2 threads), all at once:
    python benchmarks/compressive.py bars --json bars.json
    # the same with glibc keeping freed memory for both contenders, as the memtx command does
    python benchmarks/compressive.py bars --retain-freed-memory --memory 0
    # or in full detail (inference, generation profile, matmul fraction, memory), per config:
    python benchmarks/compressive.py speed --mem-len 256 --cmem-len 64
    python benchmarks/compressive.py speed --mem-len 1024 --cmem-len 256
    # the same with the reference's skeleton on both sides (GRU gates, learned table):
    python benchmarks/compressive.py speed --mem-len 256 --cmem-len 64 --set gru_gated_residual=true positions='"learned"' final_norm=false
    # defaults chosen by measurement: equal wall-clock (or --steps: token) budget on tinyshakespeare
    python benchmarks/compressive.py quality --minutes 4
    python benchmarks/compressive.py quality --steps 400 --dim 64 --seq-len 64 --mem-len 64 --cmem-len 16

``speed`` uses memtx.bench.speed (contenders timed alternately, median ratios); the reference
is built with the same sizes and either its own defaults (``--reference-options defaults``,
the bars: each library as shipped) or the memtx model's structural options (``mirror``:
gating, Mogrifier, GLU, memory layers, enhanced recurrence; implementation against
implementation). ``quality`` trains each skeleton for the same number of minutes or
steps (contenders alternate step by step, so machine noise hits both alike) and reports
validation bits per character with the memory carried.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import memtx
from memtx.bench import speed
from memtx.bench.common import add_allocator_flag, apply_allocator_flag
from memtx.bench.references import REFERENCE_OPTIONS_ENV, compressive_reference_steps



# ============================================================================================
# speed
# ============================================================================================
def run_speed(args: argparse.Namespace) -> dict:
    os.environ[REFERENCE_OPTIONS_ENV] = args.reference_options
    model = dict(dim=256, depth=4, heads=8, seq_len=args.seq_len, mem_len=args.mem_len,
                 cmem_len=args.cmem_len)
    for item in args.set:
        key, value = item.split("=", 1)
        model[key] = speed._parse_value(value)
    cfg = speed.SpeedConfig(
        arch="compressive", model=model, batch_size=args.batch_size, steps=args.steps,
        warmup=args.warmup, generate_tokens=args.generate_tokens, threads=args.threads,
        reference=True, memory=not args.no_memory,
    )
    result = speed.run(cfg)
    bars = {"train_speedup_vs_reference": result["train_speedup_vs_reference"]}
    if "peak_train_memory_mib" in result:
        bars["memory_ratio"] = (
            result["peak_train_memory_mib"] / result["reference_peak_train_memory_mib"]
        )
    if "generation" in result and "speedup_vs_reference" in result["generation"]:
        bars["generation_speedup_vs_reference"] = result["generation"]["speedup_vs_reference"]
    result["bars"] = bars
    result["reference_options"] = args.reference_options
    return result


# ============================================================================================
# bars: only what the bars need, with progress on stderr (for loaded machines)
# ============================================================================================
def run_bars(args: argparse.Namespace) -> dict:
    """Training speed at mem 256 / cmem 64 and mem 1024 / cmem 256, peak training memory at
    mem 1024, and the time to generate ``--generate-tokens`` tokens (mem 256), each memtx
    against the reference, alternately, median ratios."""
    import statistics

    os.environ[REFERENCE_OPTIONS_ENV] = args.reference_options
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    result: dict = {"reference_options": args.reference_options}
    for mem_len, cmem_len in ((256, 64), (1024, 256)):
        model_cfg = dict(dim=256, depth=4, heads=8, seq_len=256, mem_len=mem_len, cmem_len=cmem_len)
        torch.manual_seed(0)
        model = memtx.build("compressive", **model_cfg)
        train, _ = speed.memtx_steps(model, args.batch_size, 0)
        ref_train, _, ref_generate = compressive_reference_steps(model, args.batch_size, 0)
        log(f"training mem {mem_len}")
        # time steady-state steps: memory and compressed memory full
        warmup = max(args.warmup, model.segments_to_fill() + 1)
        times = speed.alternate({"memtx": train, "reference": ref_train}, args.steps, warmup)
        tokens = args.batch_size * 256
        entry = {
            "memtx_tokens_per_s": tokens / statistics.median(times["memtx"]),
            "reference_tokens_per_s": tokens / statistics.median(times["reference"]),
            "train_speedup": statistics.median(
                r / m for m, r in zip(times["memtx"], times["reference"])),
            "seconds": times,
        }
        log(f"mem {mem_len}: {entry['train_speedup']:.2f}x")
        if mem_len == 1024 and args.memory:
            cfg = speed.SpeedConfig(arch="compressive", model=model_cfg, batch_size=args.batch_size,
                                    threads=args.threads)
            for which in ("memtx", "reference"):
                log(f"peak memory {which}")
                entry[f"{which}_peak_train_mib"] = speed.peak_training_memory_mib(cfg, which)
            entry["memory_ratio"] = entry["memtx_peak_train_mib"] / entry["reference_peak_train_mib"]
        if mem_len == 256 and args.generate_tokens:
            model.eval()
            prompt = torch.zeros(1, 1, dtype=torch.long)
            n = args.generate_tokens
            log("generation memtx")
            mine = speed._timed(lambda: memtx.generate(model, prompt, n))
            log("generation reference")
            theirs = speed._timed(lambda: ref_generate(n))
            log("generation memtx again")
            mine = min(mine, speed._timed(lambda: memtx.generate(model, prompt, n)))
            entry["generation"] = {"tokens": n, "memtx_seconds": mine, "reference_seconds": theirs,
                                   "speedup": theirs / mine}
        result[f"mem{mem_len}"] = entry
    return result


# ============================================================================================
# quality: which skeleton trains better at equal budget
# ============================================================================================
SKELETONS = {
    "memtx_default": {},
    "reference_skeleton": dict(gru_gated_residual=True, positions="learned", final_norm=False),
}


def _streams(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, N) contiguous streams of a byte tensor."""
    length = data.numel() // batch_size
    return data[: length * batch_size].view(batch_size, length)


@torch.no_grad()
def _bpc(model: memtx.MemoryLM, streams: torch.Tensor) -> float:
    model.eval()
    seq_len = model.config.seq_len
    state, total, count = None, 0.0, 0
    for start in range(0, streams.shape[1] - 1 - seq_len + 1, seq_len):
        x = streams[:, start : start + seq_len]
        y = streams[:, start + 1 : start + seq_len + 1]
        out = model(x, state, targets=y)
        state = out.state
        total += out.loss.item() * y.numel()
        count += y.numel()
    model.train()
    return total / count / math.log(2)


def run_quality(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    text = Path(args.data).read_bytes()
    data = torch.tensor(list(text), dtype=torch.long)
    split = int(0.9 * data.numel())
    train_streams = _streams(data[:split], args.batch_size)
    valid_streams = _streams(data[split:][: args.valid_bytes], 4)
    base = dict(dim=args.dim, depth=args.depth, heads=args.heads, seq_len=args.seq_len,
                mem_len=args.mem_len, cmem_len=args.cmem_len)
    runs = {}
    for name, overrides in SKELETONS.items():
        torch.manual_seed(args.seed)
        model = memtx.build("compressive", **base, **overrides)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
        runs[name] = dict(model=model, optimizer=optimizer, state=None, cursor=0, steps=0,
                          seconds=0.0, losses=[])
    budget = args.minutes * 60.0
    seq_len = args.seq_len

    def done(r: dict) -> bool:  # equal token budget with --steps, else equal time
        return r["steps"] >= args.steps if args.steps else r["seconds"] >= budget

    while not all(done(r) for r in runs.values()):
        for name, r in runs.items():  # alternate step by step
            if done(r):
                continue
            start = time.perf_counter()
            if r["cursor"] + seq_len + 1 > train_streams.shape[1]:
                r["cursor"], r["state"] = 0, None
            c = r["cursor"]
            x, y = train_streams[:, c : c + seq_len], train_streams[:, c + 1 : c + seq_len + 1]
            lr = args.lr * min(1.0, (r["steps"] + 1) / 50)
            for group in r["optimizer"].param_groups:
                group["lr"] = lr
            out = r["model"](x, r["state"], targets=y, detach_state=True)
            (out.loss + out.aux_loss).backward()
            torch.nn.utils.clip_grad_norm_(r["model"].parameters(), 1.0)
            r["optimizer"].step()
            r["optimizer"].zero_grad(set_to_none=True)
            r["state"] = out.state.detach()
            r["cursor"] += seq_len
            r["steps"] += 1
            r["losses"].append(out.loss.item())
            r["seconds"] += time.perf_counter() - start
    result = {"config": base, "batch_size": args.batch_size,
              "budget": f"{args.steps} steps" if args.steps else f"{args.minutes} minutes"}
    for name, r in runs.items():
        result[name] = dict(
            steps=r["steps"], tokens=r["steps"] * args.batch_size * seq_len,
            seconds=r["seconds"],
            train_bpc_last50=sum(r["losses"][-50:]) / len(r["losses"][-50:]) / math.log(2),
            valid_bpc=_bpc(r["model"], valid_streams),
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed", help="speed and memory vs the reference package")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--mem-len", type=int, default=256)
    p.add_argument("--cmem-len", type=int, default=64)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--generate-tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--reference-options", choices=("defaults", "mirror"), default="defaults",
                   help="reference as shipped (the bars) or with the memtx model's options")
    q = sub.add_parser("quality", help="train the skeletons for equal time on text")
    q.add_argument("--data", default="/work/shared/data/tinyshakespeare.txt")
    q.add_argument("--minutes", type=float, default=4.0)
    q.add_argument("--steps", type=int, default=0, help="equal steps instead of equal minutes")
    q.add_argument("--dim", type=int, default=128)
    q.add_argument("--depth", type=int, default=4)
    q.add_argument("--heads", type=int, default=4)
    q.add_argument("--seq-len", type=int, default=128)
    q.add_argument("--mem-len", type=int, default=128)
    q.add_argument("--cmem-len", type=int, default=32)
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--lr", type=float, default=2e-3)
    q.add_argument("--valid-bytes", type=int, default=40_000)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--seed", type=int, default=0)
    for sp in (p, q):
        sp.add_argument("--json", default=None, help="also write the result here")
    b = sub.add_parser("bars", help="the issue's bars only, with progress on stderr")
    b.add_argument("--batch-size", type=int, default=4)
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--generate-tokens", type=int, default=1024)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--memory", type=int, default=1)
    b.add_argument("--reference-options", choices=("defaults", "mirror"), default="defaults")
    b.add_argument("--json", default=None, help="also write the result here")
    for sp in (p, b):
        add_allocator_flag(sp)
    args = parser.parse_args(argv)
    retaining = apply_allocator_flag(args)
    run = {"speed": run_speed, "quality": run_quality, "bars": run_bars}[args.command]
    result = run(args)
    if args.command != "quality":
        result["retain_freed_memory"] = retaining
        result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
