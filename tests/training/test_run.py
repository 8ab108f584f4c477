"""RunConfig: presets, TOML files and command-line values merged in order, errors that name
the field."""

from __future__ import annotations

import pytest

import memtx
from memtx.training.run import (
    PRESETS,
    RunConfig,
    incompatible_fields,
    load_toml,
    merge_config,
    to_toml,
)


def test_preset_defaults_depend_on_data():
    assert RunConfig().resolved_model_config().dim == PRESETS["recall"]["dim"]
    text = RunConfig(data="some.txt")
    assert text.preset_name == "small"
    assert text.resolved_model_config().seq_len == PRESETS["small"]["seq_len"]


def test_precedence_defaults_preset_toml_cli(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\nlr = 0.01\nsteps = 7\n[model_config]\ndim = 48\nheads = 4\n')
    run = merge_config(toml_values=load_toml(path), cli_values={"lr": "0.002", "heads": "3",
                                                                "dim": "36"})
    model = run.resolved_model_config()
    assert run.lr == 0.002  # cli beats toml
    assert run.steps == 7  # toml beats default
    assert (model.dim, model.heads) == (36, 3)  # cli beats toml beats preset
    assert model.depth == PRESETS["tiny"]["depth"]  # preset beats architecture default
    assert model.mem_len == PRESETS["tiny"]["mem_len"]


def test_cli_values_are_parsed_by_type():
    run = merge_config(cli_values={"task_distances": "1,3", "progress": "false",
                                   "head_dim": "none", "dropout": "0.25"})
    assert run.task_distances == (1, 3)
    assert run.progress is False
    model = run.resolved_model_config()
    assert model.head_dim is None and model.dropout == 0.25


@pytest.mark.parametrize(
    "values, field",
    [
        pytest.param({"lr": "fast"}, "lr", id="run-float"),
        pytest.param({"steps": "1.5"}, "steps", id="run-int"),
        pytest.param({"dim": "wide"}, "dim", id="model-int"),
        pytest.param({"tie_embeddings": "maybe"}, "tie-embeddings", id="model-bool"),
    ],
)
def test_wrong_type_on_command_line_names_the_field(values, field):
    with pytest.raises(memtx.ConfigError, match=field):
        merge_config(cli_values=values)


def test_unknown_fields_are_named(tmp_path):
    with pytest.raises(memtx.ConfigError, match="--mem-lenn.*--mem-len"):
        merge_config(cli_values={"mem_lenn": "3"})
    path = tmp_path / "bad.toml"
    path.write_text("learning_rate = 0.1\n")
    with pytest.raises(memtx.ConfigError, match="learning_rate"):
        merge_config(toml_values=load_toml(path))
    path.write_text("[model_config]\nwidth = 3\n")
    with pytest.raises(memtx.ConfigError, match="width"):
        merge_config(toml_values=load_toml(path))


def test_wrong_type_in_toml_names_the_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('steps = "many"\n')
    with pytest.raises(memtx.ConfigError, match="RunConfig.steps"):
        merge_config(toml_values=load_toml(path))
    path.write_text('[model_config]\nmem_len = "long"\n')
    with pytest.raises(memtx.ConfigError, match="mem_len"):
        merge_config(toml_values=load_toml(path))


@pytest.mark.parametrize(
    "changes, field",
    [
        pytest.param({"batch_size": 0}, "batch_size", id="batch"),
        pytest.param({"batch_size": 6, "grad_accum": 4}, "batch_size", id="accum"),
        pytest.param({"data": "task:nope"}, "data", id="task"),
        pytest.param({"precision": "fp8"}, "precision", id="precision"),
        pytest.param({"model": "transformer_xx"}, "transformer_xl", id="arch-suggestion"),
        pytest.param({"preset": "huge"}, "preset", id="preset"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(memtx.ConfigError, match=field):
        RunConfig(**changes)


def test_toml_round_trip(tmp_path):
    run = RunConfig(data="text.txt", preset="tiny", lr=0.004, task_distances=(2, 3),
                    model_config={"dim": 40, "dropout": 0.1})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(run))
    again = merge_config(toml_values=load_toml(path))
    assert again.resolved_model_config() == run.resolved_model_config()
    assert incompatible_fields(run, again) == []
    assert (again.lr, again.task_distances, again.data) == (0.004, (2, 3), "text.txt")


def test_incompatible_fields_lists_what_changes_the_numbers():
    saved = RunConfig(preset="tiny")
    assert incompatible_fields(saved, saved.replace(log_every=3, checkpoint_every=7)) == []
    diffs = incompatible_fields(saved, saved.replace(lr=1.0, model_config={"dim": 64}))
    assert any(d.startswith("lr ") for d in diffs)
    assert any(d.startswith("model.dim ") for d in diffs)
