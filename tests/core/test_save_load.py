"""save_pretrained / memtx.load: safetensors + JSON, atomic, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import memtx


def test_round_trip_gives_identical_logits(tmp_path):
    model = memtx.build("transformer_xl", dim=32, depth=2, heads=4, seq_len=8, mem_len=8).eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["architecture"] == "transformer_xl" and meta["config"]["mem_len"] == 8
    loaded = memtx.load(tmp_path / "m").eval()
    assert loaded.head.weight is loaded.embed.weight  # tying survives
    x = torch.randint(0, 256, (2, 8))
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_missing_weights(tmp_path):
    memtx.build("transformer_xl", dim=32, heads=4).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(memtx.CheckpointError, match="model.safetensors is missing"):
        memtx.load(tmp_path)


def test_corrupt_weights(tmp_path):
    memtx.build("transformer_xl", dim=32, heads=4).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(memtx.CheckpointError, match="corrupt or truncated"):
        memtx.load(tmp_path)


def test_weights_that_do_not_match_the_config(tmp_path):
    memtx.build("transformer_xl", dim=32, heads=4).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["depth"] = 5
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(memtx.CheckpointError, match="does not match the model"):
        memtx.load(tmp_path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(memtx.CheckpointError, match="no config.json"):
        memtx.load(tmp_path)


def test_from_reference_names_supported_classes():
    with pytest.raises(memtx.InputError, match="cannot convert a torch.nn.modules.linear.Linear"):
        memtx.from_reference(torch.nn.Linear(2, 2))
