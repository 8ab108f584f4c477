"""The speed harness runs end to end on a tiny model and reports consistent numbers."""

from __future__ import annotations

import json

import memtx
from memtx.bench import speed


def test_speed_harness_quick(tmp_path):
    out = tmp_path / "speed.json"
    speed.main([
        "--model", "transformer_xl", "--set", "dim=32", "depth=1", "heads=2", "seq_len=8",
        "mem_len=8", "--batch-size", "2", "--steps", "2", "--warmup", "1",
        "--generate-tokens", "80", "--no-memory", "--json", str(out),
    ])
    result = json.loads(out.read_text())
    assert result["config"]["dim"] == 32 and result["batch_size"] == 2
    for key in ("train_tokens_per_s", "infer_tokens_per_s", "matmul_gflops", "fraction_of_matmul_rate"):
        assert result[key] > 0
    assert result["generation"]["tokens_per_s_at_64"] > 0


def test_flop_count_matches_the_formula():
    # Transformer-XL: scores, weighted sum and relative-position scores, 3 matmuls per layer
    model = memtx.build("transformer_xl", dim=32, depth=2, heads=4, seq_len=8, mem_len=6)
    n = model.num_parameters(non_embedding=True)
    tokens = 3 * 8
    expected = 6 * n * tokens + 6 * 3 * 2 * 4 * 8 * (6 + 4.5) * tokens
    assert speed.training_flops_per_step(model, 3) == expected
    # Memory-XL with a learned position table: its position scores are a lookup, 2 matmuls
    learned = memtx.build("memory_xl", dim=32, depth=2, heads=4, seq_len=8, mem_len=8,
                          lmem_len=4, positions="learned")
    assert speed.attention_matmuls(learned) == 2
    assert speed.attention_matmuls(memtx.build("memory_xl", dim=32, depth=2, heads=4, seq_len=8,
                                               mem_len=8, lmem_len=4)) == 3
