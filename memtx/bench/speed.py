"""Speed and memory of one architecture, optionally side by side with its reference package.

Measures, for a given architecture and config:

* training tokens/s: forward + backward + AdamW step on one segment, memory carried (detached);
* inference tokens/s: forward without gradients, memory carried;
* streaming generation tokens/s near the 64th and the 1024th generated token (their ratio shows
  whether per-token cost grows with the length generated);
* the fraction of this machine's fp32 matmul rate that training reaches, counting FLOPs as
  ``6 x non-embedding params x tokens + 6 x matmuls x layers x heads x head_dim x keys x tokens``
  where the attention matmuls per layer are the scores and the weighted sum, plus the
  relative-position scores ``q . r`` of models that compute them as a matmul (Transformer-XL
  and its relatives with sinusoid positions: 3), and keys is the mean number a query may see
  (``mem_len + (seq_len + 1) / 2``). Still a lower bound for memory models: the projection of
  the memory into keys and values each step (forward and weight gradient over the memory rows)
  is not counted, nor are compression and memory writing; the position projection is counted
  as if applied to every token, which overcounts by less than the memory projection omits;
* peak memory of steady-state training steps (memory filled), each contender in a fresh
  subprocess.

The machines this runs on are shared and noisy, so contenders are timed alternately (A B A B)
in one process and the median ratio is reported; the matmul rate is timed the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import memtx
from memtx.bench.memory import in_fresh_process, peak_above_now

StepFn = Callable[[], None]

# arch -> fn(memtx_model, batch_size) -> (train_step, infer_step, generate_fn | None); filled in
# by each architecture that has a reference package (see register_reference)
_REFERENCES: dict[str, Callable[..., tuple[StepFn, StepFn, Callable[[int], None] | None]]] = {}


def register_reference(arch: str):
    """Decorator: ``fn(model, batch_size, seed)`` returning the reference package's
    ``(train_step, infer_step, generate(n_tokens) or None)`` for a model of the same config."""

    def wrap(fn):
        _REFERENCES[arch] = fn
        return fn

    return wrap


def reference_for(arch: str) -> Callable[..., tuple[StepFn, StepFn, Callable[[int], None] | None]] | None:
    """The registered reference adapter of ``arch`` (memtx.bench.references), or None."""
    import memtx.bench.references  # noqa: F401  (registers the adapters)

    return _REFERENCES.get(arch)


@dataclass
class SpeedConfig:
    arch: str = "transformer_xl"
    model: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 4
    steps: int = 10
    warmup: int = 2
    generate_tokens: int = 1024
    threads: int = 2
    reference: bool = False
    memory: bool = True
    seed: int = 0


def _timed(fn: StepFn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(contenders: dict[str, StepFn], steps: int, warmup: int) -> dict[str, list[float]]:
    """Time each contender ``steps`` times, interleaved A B A B after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(steps):
        for name, fn in contenders.items():
            times[name].append(_timed(fn))
    return times


def matmul_step(size: int = 1024) -> tuple[StepFn, float]:
    """A fp32 (size x size) @ (size x size) matmul and its FLOP count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return (lambda: torch.mm(a, b)), 2.0 * size**3


def memtx_steps(model: memtx.MemoryLM, batch_size: int, seed: int) -> tuple[StepFn, StepFn]:
    """Training and inference steps of a memtx model on random tokens, memory carried."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    params = list(model.parameters())
    try:
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):  # fused AdamW needs torch >= 2.4 on CPU
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    train_state: list[Any] = [None]
    infer_state: list[Any] = [None]

    def train() -> None:
        model.train()
        # the state is cut after every step: returned detached, built without a graph
        out = model(inputs, train_state[0], targets=targets, detach_state=True)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_state[0] = out.state

    @torch.no_grad()
    def infer() -> None:
        model.eval()
        infer_state[0] = model(inputs, infer_state[0]).state

    return train, infer


def generation_profile(model: memtx.MemoryLM, num_tokens: int, batch_size: int = 1, window: int = 16) -> dict[str, float]:
    """Tokens/s of streaming generation around the 64th and the last generated token."""
    model.eval()
    stream = model.stream(batch_size=batch_size)
    token = torch.zeros(batch_size, 1, dtype=torch.long)
    per_token = []
    with torch.no_grad():
        start_all = time.perf_counter()
        for _ in range(num_tokens):
            t0 = time.perf_counter()
            logits = stream.feed(token)[:, -1]
            token = logits.argmax(-1, keepdim=True)
            per_token.append(time.perf_counter() - t0)
        total = time.perf_counter() - start_all
    early = per_token[max(0, 64 - window // 2) : 64 + window // 2]
    late = per_token[-window:]
    return {
        "tokens_per_s": batch_size * num_tokens / total,
        "tokens_per_s_at_64": batch_size / statistics.median(early),
        f"tokens_per_s_at_{num_tokens}": batch_size / statistics.median(late),
        "late_over_early_time": statistics.median(late) / statistics.median(early),
    }


def attention_matmuls(model: memtx.MemoryLM) -> int:
    """Matmuls of one attention layer that grow with the keys: scores and weighted sum, and the
    relative-position scores where a position projection (``to_r``) exists."""
    return 3 if any(hasattr(module, "to_r") for module in model.modules()) else 2


def training_flops_per_step(model: memtx.MemoryLM, batch_size: int) -> float:
    """``6 N T + 6 m L H D_h k T`` (see module docstring) for one training step."""
    cfg = model.config
    tokens = batch_size * cfg.seq_len
    heads = getattr(cfg, "resolved_heads", None) or cfg.heads or 1
    head_dim = getattr(cfg, "head_dim", None) or cfg.dim // heads
    keys = getattr(cfg, "mem_len", 0) + (cfg.seq_len + 1) / 2  # mean keys per query
    attention = 6 * attention_matmuls(model) * cfg.depth * heads * head_dim * keys * tokens
    return 6 * model.num_parameters(non_embedding=True) * tokens + attention


def _peak_training_memory(cfg: SpeedConfig, which: str) -> float:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = memtx.build(cfg.arch, **cfg.model)
    if which == "memtx":
        train, _ = memtx_steps(model, cfg.batch_size, cfg.seed)
    else:
        train, _, _ = reference_for(cfg.arch)(model, cfg.batch_size, cfg.seed)
    # fill the memory first: a model whose memory is still growing is cheaper than in steady state
    for _ in range(model.segments_to_fill() + 1):
        train()
    with peak_above_now() as peak:
        for _ in range(3):
            train()
    return peak["mib"]


def peak_training_memory_mib(cfg: SpeedConfig, which: str) -> float:
    """Peak resident memory of three steady-state training steps (memory filled) above the
    memory held before them (model, optimizer, memory state), in a fresh process (MiB); see
    :mod:`memtx.bench.memory`."""
    return in_fresh_process(_peak_training_memory, cfg, which, timeout=1800)


def run(cfg: SpeedConfig) -> dict[str, Any]:
    """Measure everything described in the module docstring; returns a JSON-able dict."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = memtx.build(cfg.arch, **cfg.model)
    batch, seq_len = cfg.batch_size, model.config.seq_len
    train, infer = memtx_steps(model, batch, cfg.seed)
    mm, mm_flops = matmul_step()
    contenders = {"memtx_train": train, "matmul": mm}
    reference = cfg.reference and reference_for(cfg.arch) is not None
    ref_generate = None
    if reference:
        ref_train, ref_infer, ref_generate = reference_for(cfg.arch)(model, batch, cfg.seed)
        contenders["reference_train"] = ref_train
    # timed steps start once the memory has reached its steady size
    warmup = max(cfg.warmup, model.segments_to_fill() + 1)
    times = alternate(contenders, cfg.steps, warmup)
    infer_contenders = {"memtx_infer": infer}
    if reference:
        infer_contenders["reference_infer"] = ref_infer
    times.update(alternate(infer_contenders, cfg.steps, warmup))

    med = {name: statistics.median(ts) for name, ts in times.items()}
    tokens = batch * seq_len
    flops = training_flops_per_step(model, batch)
    result: dict[str, Any] = {
        "arch": cfg.arch,
        "config": model.config.to_dict(),
        "batch_size": batch,
        "threads": cfg.threads,
        "torch": torch.__version__,
        "non_embedding_params": model.num_parameters(non_embedding=True),
        "train_tokens_per_s": tokens / med["memtx_train"],
        "infer_tokens_per_s": tokens / med["memtx_infer"],
        "matmul_gflops": mm_flops / med["matmul"] / 1e9,
        "train_gflops": flops / med["memtx_train"] / 1e9,
        # per-step ratio of the training rate to the matmul rate, median over paired steps
        "fraction_of_matmul_rate": statistics.median(
            (flops / t) / (mm_flops / m) for t, m in zip(times["memtx_train"], times["matmul"])
        ),
    }
    if reference:
        result["reference_train_tokens_per_s"] = tokens / med["reference_train"]
        result["reference_infer_tokens_per_s"] = tokens / med["reference_infer"]
        result["train_speedup_vs_reference"] = statistics.median(
            r / m for m, r in zip(times["memtx_train"], times["reference_train"])
        )
        result["infer_speedup_vs_reference"] = statistics.median(
            r / m for m, r in zip(times["memtx_infer"], times["reference_infer"])
        )
    if cfg.generate_tokens:
        result["generation"] = generation_profile(model, cfg.generate_tokens)
        if ref_generate is not None:
            ref_time = _timed(lambda: ref_generate(cfg.generate_tokens))
            mine = _timed(lambda: memtx.generate(model, torch.zeros(1, 1, dtype=torch.long), cfg.generate_tokens))
            result["generation"]["reference_seconds"] = ref_time
            result["generation"]["memtx_seconds"] = mine
            result["generation"]["speedup_vs_reference"] = ref_time / mine
    if cfg.memory:
        result["peak_train_memory_mib"] = peak_training_memory_mib(cfg, "memtx")
        if reference:
            result["reference_peak_train_memory_mib"] = peak_training_memory_mib(cfg, "reference")
    return result


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", default="transformer_xl", help="architecture name")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="model config fields, e.g. dim=256 depth=4 seq_len=256 mem_len=256")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--generate-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", action="store_true",
                        help="also time the reference package side by side (if installed)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", default=None, help="write the result to this file")
    return parser


def config_from_args(args: argparse.Namespace) -> SpeedConfig:
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = _parse_value(value)
    return SpeedConfig(
        arch=args.model, model=overrides, batch_size=args.batch_size, steps=args.steps,
        warmup=args.warmup, generate_tokens=args.generate_tokens, threads=args.threads,
        reference=args.reference, memory=not args.no_memory,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(config_from_args(args))
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
