"""Expire-Span against Transformer-XL with the same maximum span: memory held, attention cost,
training speed, peak memory and streaming-generation cost.

    # memory held and attention cost as training proceeds on the recall task
    python benchmarks/expire_span.py memory --steps 600 --json memory.json
    # training tokens/s, peak memory and per-token generation cost at max span 1024
    python benchmarks/expire_span.py speed --seq-len 256 --span-fraction 0.1 0.02 --json speed.json

``memory`` trains both models side by side (one step each, alternately) on
:class:`memtx.data.tasks.AssociativeRecall`, where only the key/value pairs and the queries
matter, and logs per interval: entries held per layer and row, the padded memory length each
layer attends over, keys per query, the mean span the model gives to key/value tokens and to
filler (layer 0, whose inputs are the token embeddings), and answer accuracy.

``speed`` compares training steps (forward, backward, AdamW, memory carried) of ``transformer_xl``
with ``mem_len = max_span`` and ``expire_span`` with ``max_span = mem_len`` of the same size,
timed alternately (A B A B) in one process, reporting the median of the per-round ratios because
the machines are shared and noisy. The spans of the expire-span model are set through the span
predictor's bias (``--span-fraction``: every entry's span is that fraction of ``max_span``), to
stand for spans that training has settled, without training a model of that size first; the
``memory`` run shows where spans settle. Peak memory: the resident-memory peak of 8 training
steps above the memory held before them, each contender in a fresh process (with glibc's mmap
threshold lowered, so freed blocks leave the resident set). Generation: after a
prompt that fills the memory, per-token time of each stream, alternated token by token.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any, Callable

import torch

import memtx
from memtx.bench.memory import in_fresh_process, peak_above_now
from memtx.bench.speed import memtx_steps
from memtx.data.tasks import AssociativeRecall, KEY_TOKEN_BASE, MAX_KEYS, MAX_VALUES, VALUE_TOKEN_BASE


# -- models ----------------------------------------------------------------------------------
def set_span_fraction(model: memtx.ExpireSpan, fraction: float) -> None:
    """Every entry's span becomes ``fraction * max_span`` (w = 0, b = logit(fraction))."""
    with torch.no_grad():
        for predictor in model.span_predictors:
            predictor.weight.zero_()
            predictor.bias.fill_(math.log(fraction / (1.0 - fraction)))


def build_pair(size: dict[str, Any], max_span: int, **expire_kw: Any) -> tuple[memtx.MemoryLM, memtx.ExpireSpan]:
    torch.manual_seed(0)
    xl = memtx.build("transformer_xl", mem_len=max_span, **size)
    es = memtx.build("expire_span", max_span=max_span, mem_len=max_span, **size, **expire_kw)
    es.load_state_dict(xl.state_dict(), strict=False)  # same weights; only the spans differ
    return xl, es


def train_step_fn(model: memtx.MemoryLM, batch_size: int, seed: int = 0) -> Callable[[], None]:
    """One training step on random tokens (forward, backward, AdamW), memory carried: the
    step every side-by-side benchmark times (:func:`memtx.bench.speed.memtx_steps`)."""
    return memtx_steps(model, batch_size, seed)[0]


def alternate(contenders: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(slow: list[float], fast: list[float]) -> float:
    return statistics.median(s / f for s, f in zip(slow, fast))


# -- memory held and attention cost during training --------------------------------------------
def memory_report(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    size = dict(dim=args.dim, depth=args.depth, heads=args.heads, seq_len=args.seq_len)
    xl, es = build_pair(size, args.max_span, ramp_len=args.ramp_len, span_loss_coef=args.span_loss_coef)
    task = AssociativeRecall(seq_len=args.seq_len, distances=tuple(args.distances))
    models = {"transformer_xl": xl, "expire_span": es}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=args.lr) for name, m in models.items()}
    streams = {name: task.batches(args.batch_size, seed=1) for name in models}
    states: dict[str, Any] = {name: None for name in models}
    correct = {name: [0, 0] for name in models}
    log = []
    queries_mean = (args.seq_len + 1) / 2
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        for name, model in models.items():
            model.train()
            batch = next(streams[name])
            out = model(batch.inputs, states[name], targets=batch.answer_targets, detach_state=True)
            (out.loss + out.aux_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            states[name] = out.state.detach()
            hits = (out.logits.argmax(-1) == batch.answer_targets) & batch.answer_mask
            correct[name][0] += int(hits.sum())
            correct[name][1] += int(batch.answer_mask.sum())
            if name == "expire_span":
                last_inputs = batch.inputs
        if step % args.log_every == 0 or step == args.steps:
            state = states["expire_span"]
            held = state.held().float()  # (L, B)
            padded = [int(state.held()[layer].max()) for layer in range(args.depth)]
            with torch.no_grad():
                spans = es.spans(0, es.blocks[0].attn_norm(es.embed(last_inputs)))
            is_pair = ((last_inputs >= KEY_TOKEN_BASE) & (last_inputs < KEY_TOKEN_BASE + MAX_KEYS)) | (
                (last_inputs >= VALUE_TOKEN_BASE) & (last_inputs < VALUE_TOKEN_BASE + MAX_VALUES)
            )
            row = {
                "step": step,
                "tokens": step * args.batch_size * args.seq_len,
                "seconds": round(time.perf_counter() - start, 1),
                "xl_mem_held": int(states["transformer_xl"].valid.sum(-1).float().mean()),
                "xl_keys_per_query": states["transformer_xl"].mem.shape[2] + queries_mean,
                "es_mem_held_mean": round(float(held.mean()), 1),
                "es_mem_held_per_layer": [round(float(h), 1) for h in held.mean(1)],
                "es_mem_held_max": int(held.max()),
                "es_keys_per_query": round(sum(padded) / len(padded) + queries_mean, 1),
                "es_span_pair_tokens": round(float(spans[is_pair].mean()), 1) if is_pair.any() else None,
                "es_span_filler": round(float(spans[~is_pair].mean()), 1),
                "xl_answer_acc": round(correct["transformer_xl"][0] / max(correct["transformer_xl"][1], 1), 3),
                "es_answer_acc": round(correct["expire_span"][0] / max(correct["expire_span"][1], 1), 3),
            }
            correct = {name: [0, 0] for name in models}
            log.append(row)
            print(json.dumps(row), flush=True)
    return {"args": vars(args), "log": log}


# -- speed, peak memory, generation --------------------------------------------------------------
def _peak_memory(size: dict[str, Any], max_span: int, ramp_len: int, which: str,
                 fraction: float, batch_size: int, threads: int) -> float:
    torch.set_num_threads(threads)
    xl, es = build_pair(size, max_span, ramp_len=ramp_len)
    if which == "expire_span":
        set_span_fraction(es, fraction)
    step = train_step_fn(xl if which == "transformer_xl" else es, batch_size)
    with peak_above_now() as peak:
        for _ in range(8):  # enough segments for a 1024-entry memory to fill up
            step()
    return peak["mib"]


def peak_memory_mib(*args: Any) -> float:
    return in_fresh_process(_peak_memory, *args)


def generation_costs(xl: memtx.MemoryLM, es: memtx.ExpireSpan, prompt_len: int, tokens: int) -> dict[str, float]:
    """Median per-token seconds of each stream after a memory-filling prompt, alternated."""
    streams = {}
    for name, model in (("transformer_xl", xl), ("expire_span", es)):
        model.eval()
        stream = model.stream(batch_size=1)
        g = torch.Generator().manual_seed(0)
        stream.feed(torch.randint(0, 256, (1, prompt_len), generator=g))
        streams[name] = stream
    times: dict[str, list[float]] = {name: [] for name in streams}
    token = torch.zeros(1, 1, dtype=torch.long)
    for _ in range(tokens):
        for name, stream in streams.items():
            start = time.perf_counter()
            stream.feed(token)
            times[name].append(time.perf_counter() - start)
    return {
        "xl_ms_per_token": 1e3 * statistics.median(times["transformer_xl"]),
        "es_ms_per_token": 1e3 * statistics.median(times["expire_span"]),
        "es_over_xl_time": median_ratio(times["expire_span"], times["transformer_xl"]),
        "es_mem_held": float(streams["expire_span"].state.held().float().mean()),
        "xl_mem_held": float(streams["transformer_xl"].state.valid.sum(-1).float().mean()),
    }


def speed_report(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    size = dict(dim=args.dim, depth=args.depth, heads=args.heads, seq_len=args.seq_len)
    tokens = args.batch_size * args.seq_len
    results: dict[str, Any] = {"args": vars(args), "runs": []}
    for fraction in args.span_fraction:
        xl, es = build_pair(size, args.max_span, ramp_len=args.ramp_len)
        set_span_fraction(es, fraction)
        steps = {"transformer_xl": train_step_fn(xl, args.batch_size),
                 "expire_span": train_step_fn(es, args.batch_size)}
        # warm-up long enough for both memories to fill
        times = alternate(steps, args.rounds, warmup=max(xl.segments_to_fill(), es.segments_to_fill()) + 1)
        steps["expire_span"]()  # one more step to read the memory it holds
        run: dict[str, Any] = {
            "span_fraction": fraction,
            "span": fraction * args.max_span,
            "xl_train_tokens_per_s": tokens / statistics.median(times["transformer_xl"]),
            "es_train_tokens_per_s": tokens / statistics.median(times["expire_span"]),
            "train_speedup_median_ratio": median_ratio(times["transformer_xl"], times["expire_span"]),
        }
        if args.memory:
            run["xl_peak_mib"] = peak_memory_mib(size, args.max_span, args.ramp_len, "transformer_xl",
                                                 fraction, args.batch_size, args.threads)
            run["es_peak_mib"] = peak_memory_mib(size, args.max_span, args.ramp_len, "expire_span",
                                                 fraction, args.batch_size, args.threads)
        if args.generate_tokens:
            run["generation_settled"] = generation_costs(xl, es, args.max_span + args.seq_len, args.generate_tokens)
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    if args.generate_tokens:
        # the same memory size: every span at the maximum, so both hold mem_len entries
        xl, es = build_pair(size, args.max_span, ramp_len=args.ramp_len)
        set_span_fraction(es, 1.0 - 1e-7)
        same = generation_costs(xl, es, args.max_span + args.seq_len, args.generate_tokens)
        results["generation_same_memory"] = same
        print(json.dumps({"generation_same_memory": same}), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("memory", "speed"):
        p = sub.add_parser(name)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--ramp-len", type=int, default=32)
        p.add_argument("--json", default=None)
    mem = sub.choices["memory"]
    mem.add_argument("--dim", type=int, default=128)
    mem.add_argument("--depth", type=int, default=2)
    mem.add_argument("--heads", type=int, default=4)
    mem.add_argument("--seq-len", type=int, default=64)
    mem.add_argument("--max-span", type=int, default=512)
    mem.add_argument("--span-loss-coef", type=float, default=1e-3)
    mem.add_argument("--distances", type=int, nargs="+", default=[1, 2, 4])
    mem.add_argument("--batch-size", type=int, default=8)
    mem.add_argument("--lr", type=float, default=2e-3)
    mem.add_argument("--steps", type=int, default=600)
    mem.add_argument("--log-every", type=int, default=50)
    spd = sub.choices["speed"]
    spd.add_argument("--dim", type=int, default=256)
    spd.add_argument("--depth", type=int, default=4)
    spd.add_argument("--heads", type=int, default=8)
    spd.add_argument("--seq-len", type=int, default=256)
    spd.add_argument("--max-span", type=int, default=1024)
    spd.add_argument("--batch-size", type=int, default=4)
    spd.add_argument("--span-fraction", type=float, nargs="+", default=[0.1, 0.02])
    spd.add_argument("--rounds", type=int, default=7)
    spd.add_argument("--generate-tokens", type=int, default=64)
    spd.add_argument("--no-memory", dest="memory", action="store_false")
    args = parser.parse_args(argv)
    result = memory_report(args) if args.command == "memory" else speed_report(args)
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
