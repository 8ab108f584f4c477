"""AdamW parameter groups and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

import memtx
from memtx.training.optim import Schedule, build_optimizer, lr_at, param_groups


def test_no_decay_on_norms_biases_embeddings():
    model = memtx.build("transformer_xl", dim=32, depth=2, heads=2, seq_len=8, mem_len=8)
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    # every parameter exactly once (the tied head/embedding matrix counts once)
    assert decay | no_decay == set(names.values())
    assert not decay & no_decay
    assert "embed.weight" in no_decay
    assert all("norm" not in n and not n.endswith(".bias") for n in decay)
    assert {"blocks.0.attn.content_bias", "blocks.0.attn.position_bias",
            "blocks.0.attn_norm.weight", "blocks.0.attn_norm.bias", "norm.weight",
            "blocks.0.attn.to_out.bias"} <= no_decay
    assert {"blocks.0.attn.to_q.weight", "blocks.0.attn.to_kv.weight",
            "blocks.1.ff.w2.weight"} <= decay
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0


def test_weight_decay_only_shrinks_decay_group():
    model = memtx.build("transformer_xl", dim=32, depth=1, heads=2, seq_len=8, mem_len=8)
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only decay can move a weight
    opt.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["blocks.0.attn.to_q.weight"], before["blocks.0.attn.to_q.weight"] * (1 - 0.1 * 0.5))
    assert torch.equal(after["embed.weight"], before["embed.weight"])
    assert torch.equal(after["blocks.0.attn_norm.weight"], before["blocks.0.attn_norm.weight"])


@pytest.mark.parametrize(
    "step, expected",
    [
        pytest.param(0, 0.1, id="first-warmup-step"),
        pytest.param(4, 0.5, id="mid-warmup"),
        pytest.param(9, 1.0, id="end-warmup"),
        pytest.param(10, 1.0, id="peak"),
        pytest.param(60, 0.1 + 0.9 * 0.5, id="cosine-midpoint"),
        pytest.param(110, 0.1, id="end"),
        pytest.param(500, 0.1, id="after-end"),
    ],
)
def test_schedule_values(step, expected):
    assert lr_at(step, 1.0, 10, 110, 0.1) == pytest.approx(expected)


def test_schedule_is_monotone_after_warmup():
    schedule = Schedule(lr=3e-3, warmup_steps=5, total_steps=50, min_lr_ratio=0.0)
    values = [schedule.lr_at(s) for s in range(5, 51)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == 0.0
    assert math.isclose(max(values), 3e-3)


def test_schedule_rejects_bad_settings():
    with pytest.raises(memtx.ConfigError, match="min_lr_ratio"):
        Schedule(lr=1.0, warmup_steps=0, total_steps=10, min_lr_ratio=2.0)
    with pytest.raises(memtx.ConfigError, match="lr"):
        build_optimizer(torch.nn.Linear(2, 2), lr=0.0)
