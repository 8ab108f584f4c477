"""Config validation and the registry."""

from __future__ import annotations

import dataclasses

import pytest

import memtx
from memtx.errors import ConfigError


def test_build_applies_overrides_and_defaults():
    model = memtx.build("transformer_xl", dim=32, depth=3, heads=2, seq_len=8, mem_len=5)
    cfg = model.config
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.seq_len, cfg.mem_len, cfg.vocab_size) == (32, 3, 2, 8, 5, 256)
    assert len(model.blocks) == 3


def test_config_round_trips_through_asdict():
    cfg = memtx.TransformerXLConfig(dim=32, heads=2, seq_len=8)
    assert memtx.TransformerXLConfig.from_dict(dataclasses.asdict(cfg)) == cfg


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown architecture 'transfomer_xl'.*Did you mean 'transformer_xl'.*Known architectures: .*transformer_xl"):
        memtx.build("transfomer_xl")


def test_unknown_field_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match="no field 'mem_length'.*Did you mean 'mem_len'"):
        memtx.build("transformer_xl", mem_length=4)


@pytest.mark.parametrize(
    "overrides,message",
    [
        pytest.param({"dim": "64"}, r"dim must be int, got '64'", id="wrong-type"),
        pytest.param({"dropout": True}, r"dropout must be float", id="bool-is-not-float"),
        pytest.param({"dim": 30, "heads": 4}, r"dim=30 must be divisible by heads=4", id="heads"),
        pytest.param({"mem_len": -1}, r"mem_len=-1 must be >= 0", id="negative-mem"),
        pytest.param({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)", id="dropout-range"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        memtx.build("transformer_xl", **overrides)


def test_int_is_accepted_for_float_fields():
    assert memtx.TransformerXLConfig(dropout=0).dropout == 0.0
    assert isinstance(memtx.TransformerXLConfig(dropout=0).dropout, float)


@pytest.mark.parametrize("arch", ["compressive", "memory_xl"])
def test_lists_from_json_become_tuples_in_optional_tuple_fields(arch):
    # JSON and TOML give lists; the config (and so its equality, hashing and checkpoints) holds
    # tuples, also for fields annotated ``tuple[int, ...] | None``
    cfg = memtx.build(arch, dim=32, heads=2, depth=2, seq_len=8, mem_len=8,
                      memory_layers=[2]).config
    assert cfg.memory_layers == (2,)
    assert type(cfg).from_dict(cfg.to_dict() | {"memory_layers": [1, 2]}).memory_layers == (1, 2)
    with pytest.raises(ConfigError, match=r"memory_layers must be tuple\[int, \.\.\.\] \| None"):
        memtx.build(arch, dim=32, heads=2, depth=2, seq_len=8, mem_len=8, memory_layers=["2"])
