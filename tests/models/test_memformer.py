"""Memformer: reference parity, the seed's bugs fixed, LM mode, memory, generation, bad input."""

from __future__ import annotations

import pytest
import torch

import memtx
from memtx.models.memformer import Memformer, MemformerState, relative_position_bucket
from memtx.testing import rel_rms

SMALL = dict(dim=32, depth=2, heads=4, vocab_size=48, num_memory_slots=4, mem_update_heads=2)


def _lm(seq_len=8, **kw):
    return memtx.build("memformer", seq_len=seq_len, **{**SMALL, **kw})


def _prefix_logits(model, tokens, prefix_len):
    """Logits of the last token of tokens[:, :prefix_len], recomputed with the training
    segmentation (full segments with the state carried, then the partial one)."""
    seq_len = model.config.seq_len
    state, start = None, 0
    while prefix_len - start > seq_len:
        state = model(tokens[:, start : start + seq_len], state).state
        start += seq_len
    return model(tokens[:, start:prefix_len], state).logits[:, -1]


# ============================================================================================
# Parity with the reference package (memformer==0.3.1)
# ============================================================================================


def _reference(encoder_only=False, num_mem_updates=1):
    ref_pkg = pytest.importorskip("memformer")
    torch.manual_seed(0)
    kwargs = dict(dim=32, num_memory_slots=4, num_mem_updates=num_mem_updates, mem_update_attn_heads=2,
                  enc_num_tokens=50, enc_max_seq_len=16, enc_depth=2, enc_heads=4)
    if encoder_only:
        return ref_pkg.Memformer(encoder_only=True, **kwargs).eval()
    return ref_pkg.Memformer(dec_num_tokens=40, dec_max_seq_len=16, dec_depth=3, dec_heads=4, **kwargs).eval()


def _masks(batch=3, src_len=12, tgt_len=9):
    src_mask = torch.ones(batch, src_len, dtype=torch.bool)
    src_mask[1, 8:] = False
    tgt_mask = torch.ones(batch, tgt_len, dtype=torch.bool)
    tgt_mask[-1, 5:] = False
    return src_mask, tgt_mask


@pytest.mark.parametrize("masked", [pytest.param(False, id="no-masks"), pytest.param(True, id="padded")])
@pytest.mark.parametrize("updates", [pytest.param(1, id="1-update"), pytest.param(2, id="2-updates")])
def test_encoder_decoder_parity_over_two_segments(masked, updates):
    ref = _reference(num_mem_updates=updates)
    model = memtx.from_reference(ref).eval()
    assert isinstance(model, Memformer) and model.config.mode == "encoder_decoder"
    src, tgt = torch.randint(0, 50, (3, 12)), torch.randint(0, 40, (3, 9))
    src_mask, tgt_mask = _masks() if masked else (None, None)
    mems, state = ref.get_initial_mem(3), None
    with torch.no_grad():
        for _ in range(2):  # the second segment reads the memory written by the first
            enc = ref.encoder(src, context=mems, src_mask=src_mask)
            _, next_mems, _ = ref(src, mems=mems, src_mask=src_mask)
            logits = ref.decoder.net(tgt, context=enc, src_mask=tgt_mask, tgt_mask=src_mask)
            out = model.seq2seq(src, tgt, state, src_mask=src_mask, tgt_mask=tgt_mask)
            # padded positions included: memtx masks exactly like the seed
            assert (out.encoder_out - enc).abs().max() < 1e-5
            assert (out.state.slots - next_mems).abs().max() < 1e-5
            assert (out.logits - logits).abs().max() < 1e-5
            mems, state = next_mems, out.state


def test_seq2seq_loss_equals_the_seeds_decoder_loss():
    ref = _reference()
    model = memtx.from_reference(ref).eval()
    src, tgt = torch.randint(0, 50, (2, 12)), torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        _, _, ref_loss = ref(src, tgt)
        out = model.seq2seq(src, tgt[:, :-1], targets=tgt[:, 1:])
    assert abs(out.loss.item() - ref_loss.item()) < 1e-5


def test_encoder_only_parity():
    ref = _reference(encoder_only=True)
    model = memtx.from_reference(ref).eval()
    assert model.config.mode == "encoder" and not hasattr(model, "decoder_layers")
    src = torch.randint(0, 50, (2, 12))
    src_mask, _ = _masks(batch=2)
    with torch.no_grad():
        enc, mems = ref(src, src_mask=src_mask)
        encoded, state = model.encode(src, src_mask=src_mask)
    assert (encoded - enc).abs().max() < 1e-5
    assert (state.slots - mems).abs().max() < 1e-5


def test_converter_copies_every_weight():
    ref = _reference()
    model = memtx.from_reference(ref)
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())
    assert torch.equal(model.memory_slots, ref.memory_slots)
    assert torch.equal(model.writer.gru.weight_hh, ref.gru.weight_hh)
    assert torch.equal(model.decoder_layers[2].ff.w2.weight,
                       ref.decoder.net.layer_blocks.layers[2][2].fn.fn.net[2].weight)
    assert model.config.relative_buckets == "seed"


# ============================================================================================
# The seed's bugs, fixed
# ============================================================================================


def test_relative_buckets_separate_keys_to_the_right():
    """Seed bug: its encoder buckets max(q - k, 0), so every key to the right shares bucket 0
    with the query itself. memtx's bidirectional encoder gives them their own half."""
    ref_pkg = pytest.importorskip("memformer")
    seed_bucket = ref_pkg.memformer.RelativePositionBias._relative_position_bucket
    rel = torch.arange(-300, 301)  # k - q, the seed's argument
    seed_encoder = seed_bucket(rel, causal=False, num_buckets=32)
    assert (seed_encoder[rel >= 0] == 0).all()  # the bug: right keys look like the query
    ours = relative_position_bucket(-rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert ours[rel == 0].item() == 0
    assert ours[rel == 1].item() == 17 and ours[rel == 3].item() == 19
    assert (ours[rel > 0] >= 16).all() and (ours[rel < 0] < 16).all()
    # where the seed is right we agree exactly: its decoder's buckets, and its encoder's for the
    # past (the one-sided buckets our causal lm encoder uses)
    assert torch.equal(ours, seed_bucket(rel, causal=True, num_buckets=32))
    one_sided = relative_position_bucket(-rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert torch.equal(one_sided, seed_encoder)


@pytest.mark.parametrize("buckets", ["bidirectional", "seed"])
def test_bidirectional_encoder_tells_right_from_here(buckets):
    model = memtx.build("memformer", mode="encoder", relative_buckets=buckets, seq_len=8, **SMALL)
    bias = model.encoder_rel_pos(5, 5)[0]  # (H, T, K)
    same_as_self = torch.equal(bias[:, 2, 3], bias[:, 2, 2])
    assert same_as_self == (buckets == "seed")


def test_lm_mode_does_not_see_the_future():
    """Seed bug: its encoder is bidirectional, so an LM encoding the current segment leaks the
    future. In lm mode, changing token 200 changes no logit before 200."""
    model = _lm(seq_len=256).eval()
    x = torch.randint(0, 48, (2, 256))
    changed = x.clone()
    changed[:, 200] = (x[:, 200] + 1) % 48
    with torch.no_grad():
        a, b = model(x).logits, model(changed).logits
    assert torch.equal(a[:, :200], b[:, :200])
    assert (a[:, 200:] - b[:, 200:]).abs().max() > 1e-4
    # the seed's bidirectional encoder (mode "encoder") does leak: earlier outputs move
    encoder = memtx.build("memformer", mode="encoder", seq_len=256, **SMALL).eval()
    with torch.no_grad():
        assert (encoder.encode(x)[0][:, :200] - encoder.encode(changed)[0][:, :200]).abs().max() > 1e-4


def test_writer_trains_from_a_later_segments_loss():
    """Seed bug: once its memory is detached (needed for per-segment backward) the writer never
    gets a gradient. memtx's state keeps the graph, so segment 2's loss reaches the writer that
    wrote segment 1's memory; state.detach() (the trainer) cuts it, and then backward per
    segment works from segment 2 on."""
    model = _lm()
    x = torch.randint(0, 48, (2, 16))
    first = model(x[:, :8])
    assert first.state.slots.requires_grad
    model(x[:, 8:], first.state, targets=x[:, 8:]).loss.backward()
    writer_grad = sum(p.grad.abs().sum() for p in model.writer.parameters())
    assert writer_grad > 0
    model.zero_grad(set_to_none=True)
    second = model(x[:, 8:], first.state.detach(), targets=x[:, 8:])
    second.loss.backward()
    assert all(p.grad is None for p in model.writer.parameters())
    model(x[:, :8], second.state.detach(), targets=x[:, :8]).loss.backward()  # segment 3 fine


def test_seed_decoder_generate_raises_and_ours_works():
    ref = _reference()
    src = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        enc = ref.encoder(src, context=ref.get_initial_mem(2))
    with pytest.raises(TypeError):
        ref.decoder.generate(torch.zeros(2, 1, dtype=torch.long), 4, context=enc)
    model = memtx.from_reference(ref)
    new, _ = model.generate_seq2seq(src, torch.zeros(2, 1, dtype=torch.long), 4, temperature=0)
    assert new.shape == (2, 4)


# ============================================================================================
# The LM mode under the common contract
# ============================================================================================


def test_memory_carries_information_between_segments():
    model = _lm().eval()
    x = torch.randint(0, 48, (2, 16))
    with torch.no_grad():
        state = model(x[:, :8]).state
        carried = model(x[:, 8:], state).logits
        fresh = model(x[:, 8:]).logits
        other = model(x[:, 8:], model(torch.randint(0, 48, (2, 8))).state).logits
    assert rel_rms(carried, fresh) > 1e-3 and rel_rms(carried, other) > 1e-3
    assert state.initialised.all()


def test_empty_and_reset_rows_read_the_learned_slots():
    model = _lm().eval()
    x = torch.randint(0, 48, (3, 16))
    empty = model.init_state(3)
    assert torch.equal(model.read_slots(empty), model.memory_slots.expand(3, -1, -1))
    with torch.no_grad():
        state = model(x[:, :8]).state.reset([1])
        out = model(x[:, 8:], state).logits
        assert rel_rms(out[1:2], model(x[1:2, 8:]).logits) < 1e-6
        kept = model(x[:, 8:], model(x[:, :8]).state).logits
        assert torch.equal(out[[0, 2]], kept[[0, 2]])


def test_select_moves_memory_with_its_row():
    model = _lm().eval()
    x = torch.randint(0, 48, (3, 16))
    with torch.no_grad():
        state = model(x[:, :8]).state
        swapped = model(x[[2, 0], 8:], state.select([2, 0])).logits
        straight = model(x[:, 8:], state).logits
    assert rel_rms(swapped, straight[[2, 0]]) < 1e-6


def test_every_parameter_trains_in_lm_mode():
    model = _lm(num_mem_updates=2)
    x = torch.randint(0, 48, (2, 16))
    first = model(x[:, :8], targets=x[:, :8])
    second = model(x[:, 8:], first.state, targets=x[:, 8:])
    (first.loss + second.loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert second.aux_loss.item() == 0.0


def test_save_and_load_round_trip(tmp_path):
    model = _lm().eval()
    model.save_pretrained(tmp_path)
    loaded = memtx.load(tmp_path).eval()
    x = torch.randint(0, 48, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    state = model(x).state
    assert MemformerState.from_tensors(state.to_tensors()).equal(state.detach())


# ============================================================================================
# Generation
# ============================================================================================


@pytest.mark.parametrize("seq_len", [pytest.param(4, id="T4"), pytest.param(5, id="T5")])
def test_streaming_logits_equal_recomputing_each_prefix(seq_len):
    model = _lm(seq_len=seq_len).eval()
    tokens = torch.randint(0, 48, (2, 2 * seq_len + 3))
    stream = model.stream(batch_size=2)
    prompt = 3
    with torch.no_grad():
        streamed = [stream.feed(tokens[:, :prompt])[:, -1]]
        for t in range(prompt, tokens.shape[1]):
            streamed.append(stream.feed(tokens[:, t : t + 1])[:, -1])
        for i, logits in enumerate(streamed):
            assert rel_rms(logits, _prefix_logits(model, tokens, prompt + i)) < 1e-5, f"prefix {prompt + i}"


def test_stream_commits_the_same_memory_as_training():
    model = _lm(seq_len=6).eval()
    tokens = torch.randint(0, 48, (2, 13))
    stream = model.stream(batch_size=2)
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            stream.feed(tokens[:, t : t + 1])
        state = model(tokens[:, 6:12], model(tokens[:, :6]).state).state
    assert rel_rms(stream.state.slots, state.slots) < 1e-6


def test_greedy_generate_equals_a_naive_loop():
    model = _lm().eval()
    prompt = torch.randint(0, 48, (2, 6))
    new = memtx.generate(model, prompt, 7, temperature=0)  # crosses a segment boundary
    tokens = prompt
    with torch.no_grad():
        for _ in range(7):
            logits = _prefix_logits(model, tokens, tokens.shape[1])
            tokens = torch.cat((tokens, logits.argmax(-1, keepdim=True)), 1)
    assert torch.equal(new, tokens[:, 6:])


def _seq2seq_model(**kw):
    return memtx.build("memformer", mode="encoder_decoder", decoder_depth=1, seq_len=12,
                       **{**SMALL, **kw}).eval()


def test_seq2seq_generate_equals_teacher_forced_greedy_loop():
    model = _seq2seq_model(decoder_vocab_size=20)
    src = torch.randint(0, 48, (2, 10))
    src_mask = torch.ones(2, 10, dtype=torch.bool)
    src_mask[0, 7:] = False
    start = torch.randint(0, 20, (2, 2))
    new, state = model.generate_seq2seq(src, start, 6, src_mask=src_mask, temperature=0)
    tgt = start
    with torch.no_grad():
        for _ in range(6):
            logits = model.seq2seq(src, tgt, src_mask=src_mask).logits[:, -1]
            tgt = torch.cat((tgt, logits.argmax(-1, keepdim=True)), 1)
        expected_state = model.encode(src, src_mask=src_mask)[1]
    assert torch.equal(new, tgt[:, 2:])
    assert torch.equal(state.slots, expected_state.slots)
    assert model.training is False


def test_seq2seq_generate_stops_at_eos_and_restores_training_mode():
    model = _seq2seq_model().train()
    src = torch.randint(0, 48, (1, 6))
    first, _ = model.generate_seq2seq(src, torch.zeros(1, 1, dtype=torch.long), 1, temperature=0)
    eos = int(first[0, 0])
    new, _ = model.generate_seq2seq(src, torch.zeros(1, 1, dtype=torch.long), 8, temperature=0, eos_token=eos)
    assert new.tolist() == [[eos]]
    assert model.training


# ============================================================================================
# Bad input
# ============================================================================================


@pytest.mark.parametrize(
    "overrides,message",
    [
        pytest.param({"num_memory_slots": 0}, "num_memory_slots=0 must be at least 1", id="no-slots"),
        pytest.param({"relative_buckets": "seed"}, "relative_buckets='seed' only applies", id="seed-buckets-in-lm"),
        pytest.param({"decoder_depth": 2}, "decoder_depth=2 only applies to mode='encoder_decoder'", id="decoder-in-lm"),
        pytest.param({"mode": "decoder"}, "mode must be", id="unknown-mode"),
        pytest.param({"mem_update_heads": 3}, "mem_update_heads=3 must divide dim=32", id="writer-heads"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(memtx.ConfigError, match=message):
        memtx.build("memformer", **{**SMALL, **overrides})


@pytest.mark.parametrize(
    "mask,message",
    [
        pytest.param(torch.ones(2, 5, dtype=torch.bool), r"shape of its token ids \(2, 6\), got \(2, 5\)", id="shape"),
        pytest.param(torch.ones(2, 6), "must be a bool tensor", id="float"),
        pytest.param(torch.ones(2, 6, dtype=torch.long), "must be a bool tensor", id="long"),
    ],
)
@pytest.mark.parametrize("which", ["src_mask", "tgt_mask"])
def test_masks_of_the_wrong_shape_or_dtype(mask, message, which):
    model = _seq2seq_model()
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(memtx.InputError, match=f"{which} .*{message}"):
        model.seq2seq(ids, ids, **{which: mask})


@pytest.mark.parametrize(
    "overrides,message",
    [
        pytest.param({"num_memory_slots": 6}, "'slot' dimension is 6 but this model expects 4", id="slots"),
        pytest.param({"dim": 16, "mem_update_heads": 2}, "'dim' dimension is 16 but this model expects 32", id="width"),
    ],
)
def test_state_of_another_shape(overrides, message):
    model = _lm()
    other = memtx.build("memformer", seq_len=8, **{**SMALL, **overrides})
    state = other.init_state(1)
    with pytest.raises(memtx.StateError, match=message):
        model(torch.zeros(1, 4, dtype=torch.long), state)


def test_contract_forward_needs_lm_mode():
    model = _seq2seq_model()
    with pytest.raises(memtx.InputError, match="mode='encoder_decoder': use model.seq2seq"):
        model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(memtx.InputError, match="needs mode='lm'"):
        memtx.generate(model, torch.zeros(1, 2, dtype=torch.long), 2)
    with pytest.raises(memtx.InputError, match=r"seq2seq\(\) needs mode='encoder_decoder'"):
        _lm().seq2seq(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_bad_target_ids_and_generation_length():
    model = _seq2seq_model(decoder_vocab_size=20)
    src = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(memtx.InputError, match=r"tgt must hold token ids in \[0, 20\)"):
        model.seq2seq(src, torch.full((1, 4), 20))
    with pytest.raises(memtx.InputError, match="exceed seq_len=12"):
        model.generate_seq2seq(src, torch.zeros(1, 3, dtype=torch.long), 10)
