"""Memformer benchmarks: training speed beside the reference package, and the peak memory of
memory replay backprop (MRBP) against full backprop through time (BPTT).

    python benchmarks/memformer.py speed --json speed.json   # memtx vs memformer==0.3.1
    python benchmarks/memformer.py memory --json memory.json # MRBP vs BPTT, 16 segments

``speed``: the reference's encoder-decoder ``Memformer(src, tgt, mems)`` training step (forward,
decoder loss, backward, AdamW, memory detached) against memtx's ``seq2seq`` with the *same
weights* (``memtx.from_reference``), timed alternately (A B A B) in one process; the median of
the per-round ratios is reported. memtx's ``lm`` mode at the same width and depth is timed in the
same rounds for information (it has no decoder, so it does less work per token).

``memory``: gradients over S segments of the ``lm`` model, once with :func:`memtx.training.mrbp.
mrbp` and once with one graph over all segments, each in a fresh process; peak resident memory
is measured above the resident memory before the run (model, data and gradients allocated).

Defaults: dim 256, encoder/decoder depth 4, 8 heads, 32 slots, segment 256, batch 4, fp32,
2 threads. Shape legend: B batch, T segment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

# run as a script, this file's folder comes first on sys.path and this file would shadow the
# reference package, which is also called ``memformer``
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402

import memtx  # noqa: E402
from memtx.bench.memory import in_fresh_process, peak_above_now  # noqa: E402
from memtx.bench.speed import alternate  # noqa: E402
from memtx.training.mrbp import mrbp  # noqa: E402


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=1e-4, foreach=True)


def _reference_model(args: argparse.Namespace) -> torch.nn.Module:
    from memformer import Memformer

    return Memformer(
        dim=args.dim, num_memory_slots=args.slots, enc_num_tokens=256, enc_max_seq_len=args.seq_len,
        enc_depth=args.depth, enc_heads=args.heads, dec_num_tokens=256,
        dec_max_seq_len=args.seq_len, dec_depth=args.depth, dec_heads=args.heads,
    )


def speed(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = _reference_model(args).train()
    ours = memtx.from_reference(ref).train()
    lm = memtx.build(
        "memformer", dim=args.dim, depth=args.depth, heads=args.heads, seq_len=args.seq_len,
        num_memory_slots=args.slots,
    ).train()
    batch, seq_len = args.batch_size, args.seq_len
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (batch, seq_len), generator=g)
    tgt = torch.randint(0, 256, (batch, seq_len + 1), generator=g)
    text = torch.randint(0, 256, (batch, seq_len + 1), generator=g)
    optimizers = {"reference": _adamw(ref.parameters()), "memtx": _adamw(ours.parameters()),
                  "memtx_lm": _adamw(lm.parameters())}
    carried: dict[str, Any] = {"reference": None, "memtx": None, "memtx_lm": None}

    def reference_step() -> None:
        _, mems, loss = ref(src, tgt, mems=carried["reference"])
        loss.backward()
        optimizers["reference"].step()
        optimizers["reference"].zero_grad(set_to_none=True)
        carried["reference"] = mems.detach()

    def memtx_step() -> None:
        out = ours.seq2seq(src, tgt[:, :-1], carried["memtx"], targets=tgt[:, 1:])
        out.loss.backward()
        optimizers["memtx"].step()
        optimizers["memtx"].zero_grad(set_to_none=True)
        carried["memtx"] = out.state.detach()

    def lm_step() -> None:
        out = lm(text[:, :-1], carried["memtx_lm"], targets=text[:, 1:], detach_state=True)
        out.loss.backward()
        optimizers["memtx_lm"].step()
        optimizers["memtx_lm"].zero_grad(set_to_none=True)
        carried["memtx_lm"] = out.state.detach()

    contenders = {"reference": reference_step, "memtx": memtx_step, "memtx_lm": lm_step}
    wall, cpu = alternate_wall_and_cpu(contenders, args.steps, args.warmup)
    tokens = batch * seq_len

    def ratio(times: dict[str, list[float]], ours: str) -> float:
        return statistics.median(r / m for r, m in zip(times["reference"], times[ours]))

    return {
        "config": vars(args),
        "torch": torch.__version__,
        "reference_train_tokens_per_s": tokens / statistics.median(wall["reference"]),
        "memtx_seq2seq_train_tokens_per_s": tokens / statistics.median(wall["memtx"]),
        "memtx_lm_train_tokens_per_s": tokens / statistics.median(wall["memtx_lm"]),
        "seq2seq_speedup_vs_reference": ratio(wall, "memtx"),
        "lm_speedup_vs_reference": ratio(wall, "memtx_lm"),
        # CPU seconds of this process per step: less sensitive to other processes taking turns
        # on a shared machine than wall time (still median of per-round ratios)
        "seq2seq_cpu_time_speedup_vs_reference": ratio(cpu, "memtx"),
        "lm_cpu_time_speedup_vs_reference": ratio(cpu, "memtx_lm"),
    }


def alternate_wall_and_cpu(
    contenders: dict[str, Callable[[], None]], steps: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Like :func:`memtx.bench.speed.alternate` (A B A B after ``warmup`` rounds), recording
    each step's wall time and this process's CPU time."""
    alternate(contenders, 0, warmup)
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(steps):
        for name, fn in contenders.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def _peak_memory(args: argparse.Namespace, which: str) -> float:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = memtx.build(
        "memformer", dim=args.dim, depth=args.depth, heads=args.heads, seq_len=args.seq_len,
        num_memory_slots=args.slots,
    ).train()
    tokens = torch.randint(0, 256, (args.batch_size, args.segments * args.seq_len + 1))
    segments = [
        (tokens[:, s : s + args.seq_len], tokens[:, s + 1 : s + args.seq_len + 1])
        for s in range(0, args.segments * args.seq_len, args.seq_len)
    ]
    for p in model.parameters():  # gradients exist before the measurement in both runs
        p.grad = torch.zeros_like(p)
    with peak_above_now() as peak:
        if which == "mrbp":
            mrbp(model, segments)
        else:
            state, losses = None, []
            for inputs, targets in segments:
                out = model(inputs, state, targets)
                state = out.state
                losses.append(out.loss)
            torch.stack(losses).mean().backward()
    return peak["mib"]


def memory(args: argparse.Namespace) -> dict[str, Any]:
    mrbp_mib = in_fresh_process(_peak_memory, args, "mrbp")
    bptt_mib = in_fresh_process(_peak_memory, args, "bptt")
    return {
        "config": vars(args),
        "segments": args.segments,
        "mrbp_peak_mib": mrbp_mib,
        "bptt_peak_mib": bptt_mib,
        "mrbp_over_bptt": mrbp_mib / bptt_mib,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["speed", "memory"])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (speed)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (speed)")
    parser.add_argument("--segments", type=int, default=16, help="segments (memory)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], dict[str, Any]] = speed if args.what == "speed" else memory
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
