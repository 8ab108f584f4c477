"""``memtx bench recall | lm | speed``: the --quick paths end to end, and the numbers they write
are the numbers the models have."""

from __future__ import annotations

import json

import pytest
import torch

import memtx
from memtx.bench import common, lm, recall
from memtx.cli import main
from memtx.errors import ConfigError
from memtx.training import Segment, TextSource, build_optimizer, evaluate, evaluate_tasks, make_task
from memtx.training.checkpoint import resolve_checkpoint
from memtx.training.loop import load_data
from memtx.training import train_step as run_train_step


# -- equal parameter budgets --------------------------------------------------------------------
def test_equal_param_configs_within_ten_percent_of_the_smallest_common_budget():
    shared = dict(dim=32, depth=2, heads=2, seq_len=8)
    per_arch = {"transformer_xl": {"mem_len": 16}, "memformer": {"num_memory_slots": 16}}
    configs, target = common.equal_param_configs(memtx.available(), shared, per_arch)
    at_one = {a: common.count_params(a, {**common.arch_fields(a, shared, per_arch), "ff_mult": 1})
              for a in memtx.available()}
    assert target == max(at_one.values())
    for spec in configs:
        real = memtx.build(spec.arch, **spec.fields).num_parameters()
        assert real == spec.params
        assert abs(real - target) <= 0.10 * target, spec
        # no other ff_mult would have been closer
        for knob in (spec.fields["ff_mult"] - 1, spec.fields["ff_mult"] + 1):
            if knob >= 1:
                other = common.count_params(spec.arch, {**spec.fields, "ff_mult": knob})
                assert abs(other - target) >= abs(real - target)
        assert {k: spec.fields[k] for k in shared if k in spec.fields} == {
            k: v for k, v in shared.items() if k in spec.fields}


def test_equal_param_configs_names_the_architectures_that_cannot_fit():
    with pytest.raises(ConfigError, match=r"memformer .*Pass a different --params"):
        common.equal_param_configs(["transformer_xl", "memformer"],
                                   dict(dim=32, depth=2, heads=2, seq_len=8), {}, target=1_000)


# -- recall -------------------------------------------------------------------------------------
def test_bench_recall_quick_writes_results_that_match_the_saved_models(tmp_path, capsys):
    out = tmp_path / "recall"
    assert main(["bench", "recall", "--quick", "--out", str(out),
                 "--set", "expire_span.max_span=32", "expire_span.ramp_len=4"]) == 0
    result = json.loads((out / "recall.json").read_text())
    # per-architecture overrides reach the model and are written into the output
    es = result["architectures"]["expire_span"]["model_config"]
    assert (es["max_span"], es["ramp_len"]) == (32, 4)
    assert result["config"]["extra"] == {"expire_span": {"max_span": 32, "ramp_len": 4}}
    assert (out / "recall.png").stat().st_size > 1000
    table = (out / "recall.md").read_text()
    cfg = result["config"]
    assert set(result["architectures"]) == set(memtx.available())
    target = result["param_budget"]
    for arch, entry in result["architectures"].items():
        assert abs(entry["params"] - target) <= 0.10 * target
        assert entry["model_config"]["dim"] == cfg["dim"]
        # the recorded accuracy is the saved model's accuracy, re-measured independently
        model = memtx.load(resolve_checkpoint(out / entry["run_dir"]))
        assert model.config.to_dict() == entry["model_config"]
        task = make_task("recall", model.config.seq_len, cfg["distances"], 1)
        for wipe, key in ((False, "accuracy_carried"), (True, "accuracy_wiped")):
            again = evaluate_tasks(model, task, batch_size=cfg["eval_batch_size"],
                                   num_segments=cfg["eval_segments"], wipe_memory=wipe)
            assert {str(d): a for d, a in again.accuracy.items()} == entry[key], (arch, key)
        row = next(line for line in table.splitlines() if line.startswith(f"| `{arch}`"))
        assert common.fmt_pct(entry["accuracy_carried"]["1"]) in row
    assert "Answer accuracy by distance" in capsys.readouterr().out
    # table and plot are rebuilt from the JSON file alone
    assert recall.markdown(result) + "\n" == table
    assert recall.plot(result, tmp_path / "again.png").stat().st_size > 1000


def test_bench_refuses_to_overwrite_an_earlier_result(tmp_path, capsys):
    out = tmp_path / "recall"
    out.mkdir()
    (out / "recall.json").write_text("precious")
    assert main(["bench", "recall", "--quick", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "recall.json").read_text() == "precious"
    assert not (out / "runs").exists()  # refused before any training


@pytest.mark.parametrize("argv, message", [
    (["bench", "recall", "--quick", "--models", "transformer_xl,nope"], "unknown architecture"),
    (["bench", "recall", "--quick", "--distances", "0,2"], "--distances"),
    (["bench", "lm", "--quick", "--data", "/no/such/file.txt"], "/no/such/file.txt"),
    (["bench", "speed", "--quick", "--generate-tokens", "10"], "--generate-tokens"),
    (["bench", "recall", "--quick", "--set", "max_span=256"], "--set expects ARCH.FIELD=VALUE"),
    (["bench", "recall", "--quick", "--set", "expire.max_span=256"], "unknown architecture"),
    (["bench", "recall", "--quick", "--set", "expire_span.max_spam=256"],
     "no field 'max_spam'. Did you mean 'max_span'"),
    (["bench", "recall", "--quick", "--set", "expire_span.ramp_len=0"], "ramp_len=0"),
])
def test_bench_bad_input_fails_with_a_clear_message(tmp_path, capsys, argv, message):
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- lm -----------------------------------------------------------------------------------------
def test_bench_lm_quick_reports_the_bpc_the_model_reaches(tmp_path, text_file):
    out = tmp_path / "lm"
    assert main(["bench", "lm", "--quick", "--data", str(text_file), "--out", str(out)]) == 0
    result = json.loads((out / "lm.json").read_text())
    assert (out / "lm.png").stat().st_size > 1000
    assert (out / "lm.md").read_text() == lm.markdown(result) + "\n"  # rebuilt from the JSON
    cfg = result["config"]
    assert set(result["architectures"]) == set(memtx.available())
    for arch, entry in result["architectures"].items():
        assert entry["tokens_at_time"] > 0 and entry["train_tokens_per_s"] > 0
        assert entry["generate_tokens_per_s"] > 0
        assert entry["peak_train_memory_mib"] > -1.0  # a tiny model's peak is 0 within noise
        assert entry["seconds_at_tokens"] > 0 and entry["curve"]
        assert 0 < entry["bpc_at_tokens"] < 9

    # the token-budget number, reproduced by training the same model independently
    arch = "transformer_xl"
    entry = result["architectures"][arch]
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    steps = -(-cfg["tokens"] // tokens_per_step)
    torch.manual_seed(cfg["seed"])
    model = memtx.build(arch, **{k: v for k, v in entry["model_config"].items()})
    optimizer = build_optimizer(model, lr=cfg["lr"])
    corpus = load_data(str(text_file))
    source = TextSource(corpus.split("train"), cfg["batch_size"], cfg["seq_len"])
    state = None
    for step in range(steps):
        seg = source.next_segment()
        lr = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup_steps"])
        _, state = run_train_step(model, optimizer, [Segment(seg.inputs, seg.targets, seg.reset)],
                                  state, lr=lr)
    bpc = evaluate(model, corpus.split("valid"), batch_size=cfg["eval_batch_size"]).bpc
    assert bpc == pytest.approx(entry["bpc_at_tokens"], rel=1e-5)


# -- speed --------------------------------------------------------------------------------------
def test_bench_speed_quick_with_references(tmp_path):
    out = tmp_path / "speed"
    assert main(["bench", "speed", "--quick", "--models", "transformer_xl,compressive",
                 "--reference", "--out", str(out)]) == 0
    result = json.loads((out / "speed.json").read_text())
    assert (out / "speed.png").stat().st_size > 1000
    table = (out / "speed.md").read_text()
    xl, comp = (result["architectures"][a] for a in ("transformer_xl", "compressive"))
    assert "train_speedup_vs_reference" not in xl  # no reference package for XL
    assert comp["train_speedup_vs_reference"] > 0 and comp["infer_speedup_vs_reference"] > 0
    assert "reference_peak_train_memory_mib" in comp
    for arch, r in result["architectures"].items():
        assert r["config"]["dim"] == 32 and r["params"] == memtx.build(
            arch, **{k: v for k, v in r["config"].items()}).num_parameters()
        row = next(line for line in table.splitlines() if line.startswith(f"| `{arch}`"))
        assert f"{r['train_tokens_per_s']:,.0f}" in row
