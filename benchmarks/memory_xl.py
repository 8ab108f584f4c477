"""Memory Transformer-XL against the reference package (memory-transformer-xl==0.1.0).

    python benchmarks/memory_xl.py                       # speed + peak memory, mem 256 and 1024
    python benchmarks/memory_xl.py --mem-len 1024 --steps 5 --no-memory
    python benchmarks/memory_xl.py --no-memory --retain-freed-memory  # allocator as memtx's CLI
    python benchmarks/memory_xl.py --quality --minutes 4  # default choice: memtx vs seed skeleton

Speed: training tokens/s (forward + backward + AdamW step on one segment, memory carried and
detached) of memtx's default config, of memtx with ``checkpoint_attention=True`` (less
memory, slower steps), of memtx with the seed's skeleton (``MemoryXLConfig.like_seed``) and of
the reference with the same sizes, timed alternately (A B C D A B C D) in one process after warm-up segments that fill the memory; the reported ratios
are medians of per-round ratios. Peak memory: peak resident memory of training (the steps that
fill the memory, then three more) above the memory held before the first step (model, optimizer,
data), each contender in a fresh process.

The reference only writes memory when a segment is at least ``mem_len`` long, so at
``mem_len > seq_len`` it would run without memory; its guard attribute is set to ``seq_len``
here so that it carries (and writes) the same memory as memtx.

Quality (``--quality``): each config trains on tinyshakespeare for the same wall-clock budget,
alternating steps between the contenders, and reports validation bits per character with the
memory carried.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import memtx
from memtx.bench.common import add_allocator_flag, apply_allocator_flag
from memtx.bench.memory import in_fresh_process, peak_above_now
from memtx.bench.references import memory_xl_reference_steps
from memtx.bench.speed import alternate
from memtx.models.memory_xl import MemoryXLConfig

StepFn = Callable[[], None]
SIZES = dict(dim=256, depth=4, heads=8, seq_len=256, lmem_len=256)


def memtx_steps(model: memtx.MemoryLM, batch_size: int, seed: int) -> tuple[StepFn, StepFn, None]:
    from memtx.bench.speed import memtx_steps as steps

    train, infer = steps(model, batch_size, seed)
    return train, infer, None


def contenders(mem_len: int, batch_size: int, seed: int, which: list[str]) -> dict[str, StepFn]:
    sizes = dict(SIZES, mem_len=mem_len)
    out: dict[str, StepFn] = {}
    for name in which:
        torch.manual_seed(seed)
        if name == "memtx":
            out[name] = memtx_steps(memtx.build("memory_xl", **sizes), batch_size, seed)[0]
        elif name == "memtx_checkpoint":
            model = memtx.build("memory_xl", **sizes, checkpoint_attention=True)
            out[name] = memtx_steps(model, batch_size, seed)[0]
        elif name == "memtx_seed_skeleton":
            model = memtx.build("memory_xl", MemoryXLConfig.like_seed(**sizes))
            out[name] = memtx_steps(model, batch_size, seed)[0]
        elif name == "reference":
            model = memtx.build("memory_xl", MemoryXLConfig.like_seed(**sizes))
            out[name] = memory_xl_reference_steps(model, batch_size, seed)[0]
        else:
            raise SystemExit(f"unknown contender {name!r}")
    return out


def speed(mem_len: int, batch_size: int, steps: int, seed: int, which: list[str]) -> dict[str, Any]:
    fns = contenders(mem_len, batch_size, seed, which)
    warmup = math.ceil(mem_len / SIZES["seq_len"]) + 1  # fill the short memory first
    times = alternate(fns, steps, warmup)
    tokens = batch_size * SIZES["seq_len"]
    result: dict[str, Any] = {
        f"{name}_train_tokens_per_s": tokens / statistics.median(ts) for name, ts in times.items()
    }
    if "reference" in times:
        for name in times:
            if name != "reference":
                result[f"{name}_speedup_vs_reference"] = statistics.median(
                    r / m for m, r in zip(times[name], times["reference"])
                )
    return result


def _peak_memory(name: str, mem_len: int, batch_size: int, seed: int) -> float:
    torch.set_num_threads(2)
    train = contenders(mem_len, batch_size, seed, [name])[name]
    with peak_above_now() as peak:  # above model, optimizer and data
        for _ in range(math.ceil(mem_len / SIZES["seq_len"]) + 3):  # fill the memory, 3 more
            train()
    return peak["mib"]


def peak_memory_mib(name: str, mem_len: int, batch_size: int, seed: int) -> float:
    """Peak resident memory of training (memory filling, then three more steps) above the
    memory held before the first step, in a fresh process. The steps that fill the memory
    hold less memory than those after, so the peak is that of steps with a full memory."""
    return in_fresh_process(_peak_memory, name, mem_len, batch_size, seed)


# -- quality: the default choice ---------------------------------------------------------------
QUALITY_CONFIGS: dict[str, dict[str, Any]] = {
    "memtx_default": {},
    "seed_skeleton": MemoryXLConfig.like_seed().to_dict(),
}


def quality(minutes: float, data: Path, seed: int, sizes: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Train every config in QUALITY_CONFIGS for ``minutes`` each (steps interleaved so load
    spikes hit all alike) and report validation bpc with the memory carried."""
    text = torch.tensor(list(data.read_bytes()), dtype=torch.long)
    split = int(0.9 * len(text))
    train_text, valid_text = text[:split], text[split:]
    seq_len = sizes["seq_len"]
    stream_len = len(train_text) // batch_size
    streams = train_text[: stream_len * batch_size].view(batch_size, stream_len)
    runs = {}
    for name, overrides in QUALITY_CONFIGS.items():
        torch.manual_seed(seed)
        cfg = {**overrides, **sizes}
        model = memtx.build("memory_xl", cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        runs[name] = {"model": model, "opt": opt, "state": None, "cursor": 0, "seconds": 0.0, "steps": 0}
    budget = minutes * 60
    while any(r["seconds"] < budget for r in runs.values()):
        for run in runs.values():
            if run["seconds"] >= budget:
                continue
            start = time.perf_counter()
            model, cursor = run["model"], run["cursor"]
            if cursor + seq_len + 1 > stream_len:
                cursor, run["state"] = 0, None
            seg = streams[:, cursor : cursor + seq_len + 1]
            model.train()
            out = model(seg[:, :-1], run["state"], targets=seg[:, 1:], detach_state=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            run["state"], run["cursor"] = out.state.detach(), cursor + seq_len
            run["steps"] += 1
            run["seconds"] += time.perf_counter() - start
    result = {}
    for name, run in runs.items():
        model = run["model"].eval()
        state, total, count = None, 0.0, 0
        with torch.no_grad():
            valid = valid_text[: (len(valid_text) - 1) // seq_len * seq_len + 1]
            for start in range(0, len(valid) - 1, seq_len):
                seg = valid[start : start + seq_len + 1][None]
                out = model(seg[:, :-1], state, targets=seg[:, 1:])
                state, total, count = out.state, total + float(out.loss) * (seg.shape[1] - 1), count + seg.shape[1] - 1
        result[name] = {"valid_bpc": total / count / math.log(2), "steps": run["steps"],
                        "tokens": run["steps"] * batch_size * seq_len}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mem-len", type=int, nargs="*", default=[256, 1024])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--contenders", nargs="*", default=["memtx", "memtx_checkpoint", "memtx_seed_skeleton", "reference"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed runs")
    parser.add_argument("--quality", action="store_true", help="only the default-choice comparison")
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/tinyshakespeare.txt"))
    parser.add_argument("--quality-sizes", type=json.loads,
                        default=dict(dim=256, depth=4, heads=8, seq_len=128, mem_len=128, lmem_len=128))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    add_allocator_flag(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    result: dict[str, Any] = {"torch": torch.__version__, "threads": 2, "batch_size": args.batch_size,
                              "retain_freed_memory": apply_allocator_flag(args),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if args.quality:
        result["quality"] = quality(args.minutes, args.data, args.seed, args.quality_sizes, 8)
    else:
        for mem_len in args.mem_len:
            entry: dict[str, Any] = {}
            if not args.no_speed:
                entry.update(speed(mem_len, args.batch_size, args.steps, args.seed, args.contenders))
            if not args.no_memory:
                for name in args.contenders:
                    entry[f"{name}_peak_train_memory_mib"] = peak_memory_mib(
                        name, mem_len, args.batch_size, args.seed)
                if "reference" in args.contenders:
                    for name in args.contenders:
                        if name != "reference":
                            entry[f"{name}_memory_vs_reference"] = (
                                entry[f"{name}_peak_train_memory_mib"]
                                / entry["reference_peak_train_memory_mib"])
            result[f"seq256_mem{mem_len}_lmem256"] = entry
            print(json.dumps({mem_len: entry}, indent=2), flush=True)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
