"""train_step, evaluate and evaluate_tasks: the numbers they report are the numbers the model
computes, gradient accumulation and the auxiliary loss change what they should, and nothing
else."""

from __future__ import annotations

import math

import pytest
import torch

import memtx
from memtx.data import AssociativeRecall, evaluate_answers, merge_answer_counts
from memtx.models.transformer_xl import TransformerXL, TransformerXLConfig
from memtx.training import Segment, build_optimizer, evaluate, evaluate_tasks, train_step
from memtx.training.loop import TaskSource, TextSource, cat_states

from memtx.testing import make_text


def tiny_model(**overrides) -> memtx.MemoryLM:
    torch.manual_seed(0)
    return memtx.build("transformer_xl", **{"dim": 32, "depth": 2, "heads": 2, "seq_len": 8,
                                            "mem_len": 8, **overrides})


def random_segments(num: int, rows: int = 4, length: int = 8, seed: int = 0) -> list[Segment]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, 256, (rows, length + 1), generator=g)
        out.append(Segment(tokens[:, :-1].clone(), tokens[:, 1:].clone()))
    return out


def test_step_reports_the_models_loss_and_updates_weights():
    model = tiny_model()
    (segment,) = random_segments(1)
    expected = model(segment.inputs, None, segment.targets).loss.item()
    before = model.embed.weight.detach().clone()
    opt = build_optimizer(model, lr=1e-2)
    metrics, state = train_step(model, opt, [segment], None)
    assert metrics.loss == pytest.approx(expected, rel=1e-6)
    assert metrics.count == segment.targets.numel()
    assert metrics.tokens == segment.inputs.numel()
    assert not torch.equal(before, model.embed.weight)
    assert all(not t.requires_grad for _, t, _ in state.items())
    assert state.sizes()["mem"] == 8


def test_grad_accum_gives_the_same_update_as_the_whole_batch():
    segments = random_segments(3, rows=4)
    # ignored targets in one row only: micro-batches hold different numbers of targets, so a
    # per-micro-batch mean would weight them wrongly
    for seg in segments:
        seg.targets[0, :5] = memtx.IGNORE_INDEX
    results = []
    for accum in (1, 2, 4):
        model = tiny_model()
        # SGD: the update is the gradient itself (Adam would magnify float noise in ~0 gradients)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        state, losses = None, []
        for seg in segments:
            metrics, state = train_step(model, opt, [seg], state, grad_accum=accum)
            losses.append(metrics.loss)
        results.append((losses, [p.detach().clone() for p in model.parameters()], state))
    for losses, params, state in results[1:]:
        assert losses == pytest.approx(results[0][0], rel=1e-5)
        for a, b in zip(params, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.mem, results[0][2].mem, rtol=1e-5, atol=1e-6)


def test_bptt_segments_average_over_all_scored_targets():
    model = tiny_model()
    segments = random_segments(2)
    segments[1].targets[:, :6] = memtx.IGNORE_INDEX
    with torch.no_grad():
        first = model(segments[0].inputs, None, segments[0].targets)
        second = model(segments[1].inputs, first.state, segments[1].targets)
    n0, n1 = 32, 8
    expected = (first.loss.item() * n0 + second.loss.item() * n1) / (n0 + n1)
    metrics, _ = train_step(model, build_optimizer(model, lr=1e-3), segments, None)
    assert metrics.loss == pytest.approx(expected, rel=1e-5)
    assert metrics.count == n0 + n1


def test_reset_clears_memory_before_the_segment():
    model = tiny_model()
    first, second = random_segments(2)
    opt = build_optimizer(model, lr=1e-3)
    _, state = train_step(model, opt, [first], None)
    with torch.no_grad():
        fresh = model(second.inputs, None, second.targets).loss.item()
    second.reset = True
    metrics, _ = train_step(model, opt, [second], state)
    assert metrics.loss == pytest.approx(fresh, rel=1e-6)


class AuxXL(TransformerXL):
    """Transformer-XL with an auxiliary loss on a parameter the LM loss never touches."""

    arch = "aux_xl_test"

    def __init__(self, config: TransformerXLConfig) -> None:
        super().__init__(config)
        self.aux_param = torch.nn.Parameter(torch.full((3,), 2.0))

    def forward_segment(self, input_ids, state):
        logits, next_state, _ = super().forward_segment(input_ids, state)
        return logits, next_state, 0.5 * self.aux_param.pow(2).sum()


def test_aux_loss_is_added_to_the_objective():
    torch.manual_seed(0)
    model = AuxXL(TransformerXLConfig(dim=32, depth=1, heads=2, seq_len=8, mem_len=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics, _ = train_step(model, opt, random_segments(2), None, grad_clip=0.0, grad_accum=2)
    # d/dp of the mean aux loss 0.5 * sum p^2 is p = 2: one SGD step takes 2 -> 1.8
    torch.testing.assert_close(model.aux_param.detach(), torch.full((3,), 1.8))
    assert metrics.aux_loss == pytest.approx(6.0)


def test_non_finite_loss_raises_and_keeps_the_weights():
    model = tiny_model()
    opt = build_optimizer(model, lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    model.head.register_forward_hook(lambda mod, inp, out: out * float("nan"))
    with pytest.raises(memtx.NonFiniteLossError, match="step 7"):
        train_step(model, opt, random_segments(1), None, step=7)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cat_states_inverts_select():
    model = tiny_model()
    out = model(torch.randint(0, 256, (5, 8)))
    parts = [out.state.select([0, 1]), out.state.select([2, 3, 4])]
    assert cat_states(parts).equal(out.state)


def test_evaluate_is_bpc_over_every_target_with_memory_carried():
    model = tiny_model()
    tokens = torch.tensor(list(make_text(101)))
    result = evaluate(model, tokens)
    with torch.no_grad():
        full = memtx.forward_segments(model, tokens[None, :-1], targets=tokens[None, 1:])
    assert result.tokens == 100
    assert result.loss == pytest.approx(full.loss.item(), rel=1e-5)
    assert result.bpc == pytest.approx(full.loss.item() / math.log(2), rel=1e-5)
    assert model.training  # restored


def test_evaluate_with_memory_wiped_scores_segments_independently():
    model = tiny_model()
    tokens = torch.tensor(list(make_text(33)))
    wiped = evaluate(model, tokens, wipe_memory=True)
    losses = []
    with torch.no_grad():
        for start in range(0, 32, 8):
            out = model(tokens[None, start:start + 8], None, tokens[None, start + 1:start + 9])
            losses.append(out.loss.item())
    assert wiped.loss == pytest.approx(sum(losses) / 4, rel=1e-5)
    assert wiped.loss != pytest.approx(evaluate(model, tokens).loss, rel=1e-4)


def test_evaluate_tasks_counts_every_answer_per_distance():
    model = tiny_model(seq_len=16, mem_len=32)
    task = AssociativeRecall(16, (1, 2), num_pairs=2)
    for wipe in (False, True):
        result = evaluate_tasks(model, task, batch_size=4, num_segments=10, seed=5,
                                wipe_memory=wipe)
        stream, state, counts = task.batches(4, seed=5), None, []
        with torch.no_grad():
            model.eval()
            for _ in range(10):
                batch = next(stream)
                out = model(batch.inputs, None if wipe else state)
                state = out.state
                counts.append(evaluate_answers(out.logits, batch))
            model.train()
        assert result.counts == merge_answer_counts(*counts)
        assert set(result.counts) == {1, 2}
        assert result.chance == pytest.approx(0.1)


def test_task_source_ranks_split_the_global_batch_rows():
    task = AssociativeRecall(16, (1, 2), num_pairs=2)
    whole = TaskSource(task, 4, seed=3)
    halves = [TaskSource(task, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        seg = whole.next_segment()
        parts = [h.next_segment() for h in halves]
        assert torch.equal(seg.inputs, torch.cat([p.inputs for p in parts]))
        assert torch.equal(seg.targets, torch.cat([p.targets for p in parts]))


def test_text_source_ranks_split_the_global_streams():
    tokens = torch.tensor(list(make_text(2000)))
    whole = TextSource(tokens, 4, 16)
    halves = [TextSource(tokens, 2, 16, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        seg = whole.next_segment()
        parts = [h.next_segment() for h in halves]
        assert torch.equal(seg.inputs, torch.cat([p.inputs for p in parts]))


def test_sources_resume_at_their_cursor():
    task = AssociativeRecall(16, (1, 2), num_pairs=2)
    tokens = torch.tensor(list(make_text(2000)))
    for make in (lambda: TaskSource(task, 2, seed=3), lambda: TextSource(tokens, 2, 16)):
        a = make()
        for _ in range(5):
            a.next_segment()
        b = make()
        b.load_state_dict(a.state_dict())
        for _ in range(7):  # crosses an epoch boundary for the text source
            x, y = a.next_segment(), b.next_segment()
            assert torch.equal(x.inputs, y.inputs) and x.reset == y.reset


def test_text_split_smaller_than_one_segment_per_stream_is_an_input_error():
    with pytest.raises(memtx.InputError, match="too small"):
        TextSource(torch.arange(50) % 256, 4, 16)


def test_bf16_autocast_runs_the_forward_in_bfloat16():
    model = tiny_model()
    (segment,) = random_segments(1)
    seen = []
    model.head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    with torch.no_grad():
        reference = model(segment.inputs, None, segment.targets).loss.item()
    metrics, state = train_step(model, build_optimizer(model, lr=1e-3), [segment], None,
                                precision="bf16")
    assert seen == [torch.float32, torch.bfloat16]
    assert metrics.loss == pytest.approx(reference, rel=2e-2)
    assert state.mem.dtype == torch.float32  # memory and weights stay fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("name", memtx.available())
def test_every_architecture_trains_through_two_segments_and_detaches(name):
    from memtx.training.run import PRESETS

    cls = memtx.config_class(name)
    torch.manual_seed(0)
    model = memtx.build(name, {k: v for k, v in PRESETS["tiny"].items()
                               if k in cls.field_names()} | {"seq_len": 8})
    opt = build_optimizer(model, lr=1e-3)
    state = None
    for seed in range(2):
        metrics, state = train_step(model, opt, random_segments(2, rows=2, seed=seed), state,
                                    grad_accum=2)
        assert math.isfinite(metrics.loss) and metrics.count == 32
    # the next step's backward must not reach into this step's graph
    assert all(t.grad_fn is None for _, t, _ in state.items())


@pytest.mark.parametrize("name", memtx.available())
def test_every_architecture_trains_in_bf16_close_to_fp32(name):
    """Under bf16 autocast every model's ops (custom attention and scan nodes included) run,
    give a loss close to fp32's and finite gradients, and keep fp32 weights and memory."""
    from memtx.training.run import PRESETS

    cls = memtx.config_class(name)
    torch.manual_seed(0)
    model = memtx.build(name, {k: v for k, v in PRESETS["tiny"].items()
                               if k in cls.field_names()} | {"seq_len": 8})
    segments = random_segments(2, rows=2, seed=0)
    state, reference = None, []
    with torch.no_grad():
        for segment in segments:
            out = model(segment.inputs, state, segment.targets)
            reference.append(out.loss.item())
            state = out.state
    opt = build_optimizer(model, lr=1e-12)  # steps that leave the weights all but unchanged
    state = None
    for segment, want in zip(segments, reference):
        metrics, state = train_step(model, opt, [segment], state, precision="bf16")
        assert metrics.loss == pytest.approx(want, rel=3e-2)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(t.dtype in (torch.float32, torch.complex64, torch.bool, torch.long)
               for _, t, _ in state.items())
