"""GateLoop side by side with gateloop-transformer (the reference package).

    python benchmarks/gateloop.py [--steps 3] [--json gateloop.json]

Bars (dim 256, depth 4, batch 4, fp32, 2 threads): training tokens/s >= 3x the reference at
seq_len 1024 with 8 heads and >= 1.5x with one-channel heads; peak training memory at seq_len
4096 <= 1/3 of the reference's; streaming generation of 1024 tokens >= 20x faster than the
reference's decoding (which recomputes the prefix for every token).
"""

from __future__ import annotations

import argparse
import json

import torch

from memtx.bench import speed


@speed.register_reference("gateloop")
def reference_steps(model, batch_size: int, seed: int):
    from gateloop_transformer import Transformer

    cfg = model.config
    ref = Transformer(
        dim=cfg.dim, num_tokens=cfg.vocab_size, depth=cfg.depth,
        gate_loop_heads=cfg.heads, ff_mult=cfg.ff_mult,
    )
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=g)
    try:
        optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-4, foreach=True)

    def train() -> None:
        ref.train()
        ref(tokens, return_loss=True).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer() -> None:
        ref.eval()
        ref(tokens[:, :-1])

    @torch.no_grad()
    def generate(num_tokens: int) -> None:
        # the reference has no cache: every new token recomputes the whole prefix
        ref.eval()
        seq = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(num_tokens):
            nxt = ref(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), dim=1)

    return train, infer, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--generate-tokens", type=int, default=1024)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {}
    base = dict(dim=256, depth=4)
    for name, heads, seq_len, gen in [
        ("heads8_seq1024", 8, 1024, args.generate_tokens),
        ("heads256_seq1024", None, 1024, 0),
        ("heads256_seq4096_memory", None, 4096, 0),
    ]:
        cfg = speed.SpeedConfig(
            arch="gateloop", model={**base, "heads": heads, "seq_len": seq_len}, batch_size=4,
            steps=args.steps if "memory" not in name else 1, warmup=1,
            generate_tokens=gen, reference=True, memory="memory" in name,
        )
        result = speed.run(cfg)
        results[name] = result
        keys = ["train_tokens_per_s", "reference_train_tokens_per_s", "train_speedup_vs_reference",
                "peak_train_memory_mib", "reference_peak_train_memory_mib"]
        print(name, {k: round(result[k], 2) for k in keys if k in result})
        if "generation" in result and "speedup_vs_reference" in result["generation"]:
            print("  generation", {k: round(v, 2) for k, v in result["generation"].items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
