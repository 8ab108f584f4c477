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


from memtx.bench import references, speed  # noqa: F401  (registers the reference)



CONFIGS = [  # name, heads (None: one channel per head), seq_len, with generation, other options
    ("heads8_seq1024", 8, 1024, True, {}),
    ("heads256_seq1024", None, 1024, False, {}),
    ("heads256_seq4096_memory", None, 4096, False, {}),
    ("heads8_seq4096_memory", 8, 4096, False, {}),
    ("heads256_seq4096_memory_checkpoint_blocks", None, 4096, False, {"checkpoint_blocks": True}),
    ("heads8_seq4096_memory_checkpointing", 8, 4096, False, {"gradient_checkpointing": True}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--generate-tokens", type=int, default=1024)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", nargs="*", default=None, choices=[c[0] for c in CONFIGS],
                        help="run only these configurations")
    args = parser.parse_args()
    results = {}
    base = dict(dim=256, depth=4)
    for name, heads, seq_len, gen, options in CONFIGS:
        if args.only and name not in args.only:
            continue
        gen = args.generate_tokens if gen else 0
        cfg = speed.SpeedConfig(
            arch="gateloop", model={**base, "heads": heads, "seq_len": seq_len, **options},
            batch_size=4,
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
