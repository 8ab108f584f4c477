"""Memory Transformer-XL: parity with the reference, memory writes, gradients through the long
memory, streaming, resets and bad input."""

from __future__ import annotations

import pytest
import torch

import memtx
from memtx.models.memory_xl import (
    MemoryXLConfig,
    MemoryXLState,
    linear_attention,
    linear_attention_with_summary,
    merge_key_summaries,
    summarize_keys,
)
from memtx.testing import grads, rel_rms

SMALL = dict(dim=32, depth=2, heads=4, vocab_size=48, lmem_len=6, num_mem_kv=2)
# the fields where the seed's skeleton differs from memtx's defaults
SEED_SKELETON = {
    k: v for k, v in MemoryXLConfig.like_seed().to_dict().items() if v != getattr(MemoryXLConfig(), k)
}
LEARNED = dict(positions="learned")


def _build(seq_len=8, mem_len=8, **kw):
    return memtx.build("memory_xl", **{**SMALL, "seq_len": seq_len, "mem_len": mem_len, **kw})


def _reference(**kw):
    mtxl = pytest.importorskip("memory_transformer_xl")
    args = dict(num_tokens=48, dim=32, seq_len=8, depth=3, heads=4, mem_len=8, lmem_len=6)
    ref = mtxl.MemoryTransformerXL(**{**args, **kw}).eval()
    with torch.no_grad():
        ref.pos_emb.normal_()  # zero at init: randomise it so that positions are compared too
    return ref


# -- parity with memory-transformer-xl ------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="defaults"),
        pytest.param(dict(num_mem_kv=2, mem_write_iters=3), id="mem_kv-3writes"),
        pytest.param(dict(mogrify_gru=True, ff_glu=True), id="mogrify-glu"),
        pytest.param(dict(gru_gated_residual=False, one_kv_head=True), id="plain-residual-1kv"),
        pytest.param(dict(memory_layers=(2, 3), num_mem_kv=3), id="memory_layers-2,3"),
        pytest.param(dict(mem_len=5, lmem_len=40, num_mem_kv=3), id="M<T-N>dim"),
    ],
)
def test_parity_with_the_reference_over_segments(kwargs):
    ref = _reference(**kwargs)
    model = memtx.from_reference(ref).eval()
    assert isinstance(model, memtx.MemoryXL)
    tokens = torch.randint(0, 48, (2, 8 * 3 + 3))  # three full segments and a partial one
    memories, state = None, None
    for start in range(0, tokens.shape[1], 8):
        segment = tokens[:, start : start + 8]
        with torch.no_grad():
            ref_logits, memories = ref(segment, memories=memories)
            out = model(segment, state)
        state = out.state
        assert rel_rms(out.logits, ref_logits) < 1e-5, f"logits at {start}"
        assert rel_rms(state.mem, memories.short) < 1e-5, f"short memory at {start}"
        assert rel_rms(state.lmem, memories.long) < 1e-5, f"long memory at {start}"


def test_converter_uses_the_seed_skeleton():
    model = memtx.from_reference(_reference(memory_layers=(1, 3)))
    cfg = model.config
    assert (cfg.residual, cfg.positions, cfg.final_norm, cfg.norm_memory) == ("nbrc", "learned", False, False)
    assert cfg.memory_layers == (1, 3) and cfg.mem_len == 8 and cfg.lmem_len == 6
    assert cfg.scramble_writer_heads and not cfg.tie_embeddings


# -- the update guard -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mem_len", [pytest.param(3, id="M<T"), pytest.param(8, id="M=T"), pytest.param(20, id="M>T")]
)
def test_memory_is_written_after_every_full_segment_whatever_mem_len(mem_len):
    model = _build(seq_len=8, mem_len=mem_len).eval()
    tokens = torch.randint(0, 48, (2, 24))
    state = model.init_state(2)
    for k in range(3):
        before = state
        state = model(tokens[:, 8 * k : 8 * k + 8], state).state
        assert state.mem.shape[2] == min(8 * (k + 1), mem_len)
        assert state.valid.all() and state.lmem_valid.all()
        assert not torch.allclose(state.lmem, before.lmem)
    # the newest short-memory entries are the first layer's inputs: the last segment's embeddings
    keep = min(mem_len, 8)
    assert torch.allclose(state.mem[0, :, -keep:], model.embed(tokens[:, 24 - keep :]))


def test_the_seed_never_writes_memory_when_mem_len_exceeds_seq_len():
    """The seed's guard (`t < self.mem_len`): what the test above rules out."""
    ref = _reference(mem_len=20)
    memories = None
    for _ in range(3):
        with torch.no_grad():
            _, memories = ref(torch.randint(0, 48, (2, 8)), memories=memories)
    assert memories.short.shape[2] == 0 and memories.long.shape[1] == 0


def test_a_partial_segment_reads_but_does_not_write():
    model = _build(seq_len=8, mem_len=8).eval()
    tokens = torch.randint(0, 48, (2, 13))
    state = model(tokens[:, :8]).state
    out = model(tokens[:, 8:], state)
    assert out.state is state
    assert rel_rms(out.logits, model(tokens[:, 8:]).logits) > 1e-2  # the memory was read


# -- gradients through the long memory ---------------------------------------------------------
def _writer_grad_norm(model):
    grads = [p.grad for p in model.writer.parameters() if p.grad is not None]
    return sum(float(g.abs().sum()) for g in grads)


@pytest.mark.parametrize("config", [pytest.param({}, id="memtx"), pytest.param(SEED_SKELETON, id="seed-skeleton")])
def test_a_later_loss_reaches_the_writer_through_the_long_memory(config):
    model = _build(**config)
    tokens = torch.randint(0, 48, (2, 17))
    first = model(tokens[:, :8])
    assert first.state.lmem.requires_grad and not first.state.mem.requires_grad
    # the segment's own loss never reaches the writer: it reads its layer inputs detached
    model(tokens[:, :8], targets=tokens[:, 1:9]).loss.backward()
    assert _writer_grad_norm(model) == 0.0
    second = model(tokens[:, 8:16], first.state, targets=tokens[:, 9:17])
    second.loss.backward()
    assert _writer_grad_norm(model) > 0.0
    # "backprop through 1 segment": the detached state cuts the writer off
    model.zero_grad(set_to_none=True)
    first = model(tokens[:, :8])
    model(tokens[:, 8:16], first.state.detach(), targets=tokens[:, 9:17]).loss.backward()
    assert _writer_grad_norm(model) == 0.0


def test_backward_every_segment_with_detach_and_a_k_segment_window():
    model = _build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 48, (2, 8 * 6 + 1))
    state = None
    for k in range(4):  # the seed crashes at the third segment ("backward through the graph...")
        seg = slice(8 * k, 8 * k + 8)
        out = model(tokens[:, seg], state, targets=tokens[:, 8 * k + 1 : 8 * k + 9])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        state = out.state.detach()
    # without detaching: one backward over a window of segments, twice in a row
    for window in range(2):
        loss = 0.0
        for k in range(3 * window, 3 * window + 3):
            out = model(tokens[:, 8 * k : 8 * k + 8], state, targets=tokens[:, 8 * k + 1 : 8 * k + 9])
            state, loss = out.state, loss + out.loss
        loss.backward()
        assert _writer_grad_norm(model) > 0.0
        opt.step()
        opt.zero_grad()
        state = state.detach()


# -- streaming generation ---------------------------------------------------------------------
def _prefix_logits(model, tokens, prefix_len):
    """Logits of the last token of tokens[:, :prefix_len] recomputed from scratch with the
    training segmentation."""
    seq_len, state, start = model.config.seq_len, None, 0
    while prefix_len - start > seq_len:
        state = model(tokens[:, start : start + seq_len], state).state
        start += seq_len
    return model(tokens[:, start:prefix_len], state).logits[:, -1]


@pytest.mark.parametrize(
    "seq_len,mem_len,config",
    [
        pytest.param(6, 6, {}, id="T6-M6"),
        pytest.param(5, 13, dict(memory_layers=(2,)), id="T5-M13-layer2"),
        pytest.param(6, 4, SEED_SKELETON, id="T6-M4-seed-skeleton"),
        pytest.param(5, 13, {**LEARNED, "memory_layers": (1,), "num_mem_kv": 3}, id="T5-M13-learned-layer1"),
    ],
)
def test_streaming_logits_equal_recomputing_each_prefix(seq_len, mem_len, config):
    model = _build(seq_len=seq_len, mem_len=mem_len, **config).eval()
    tokens = torch.randint(0, 48, (2, 3 * seq_len + 2))
    stream = model.stream(batch_size=2)
    prompt = 4
    streamed = [stream.feed(tokens[:, :prompt])[:, -1]]
    for t in range(prompt, tokens.shape[1]):
        streamed.append(stream.feed(tokens[:, t : t + 1])[:, -1])
    for i, logits in enumerate(streamed):
        assert rel_rms(logits, _prefix_logits(model, tokens, prompt + i)) < 1e-5, f"prefix {prompt + i}"


def test_stream_commits_the_same_memory_as_training_and_generate_is_greedy():
    model = _build(seq_len=6, mem_len=9).eval()
    tokens = torch.randint(0, 48, (2, 13))
    stream = model.stream(batch_size=2)
    for t in range(tokens.shape[1]):
        stream.feed(tokens[:, t : t + 1])
    state = model(tokens[:, 6:12], model(tokens[:, :6]).state).state
    assert torch.allclose(stream.state.mem, state.mem, atol=1e-6)
    assert torch.allclose(stream.state.lmem, state.lmem, atol=1e-6)
    new = memtx.generate(model, tokens[:, :5], 6, temperature=0)
    seq = tokens[:, :5]
    for _ in range(6):
        seq = torch.cat((seq, _prefix_logits(model, seq, seq.shape[1]).argmax(-1, keepdim=True)), 1)
    assert torch.equal(new, seq[:, 5:])


# -- state semantics ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mem_len,config",
    [
        pytest.param(8, {}, id="M=T"),
        pytest.param(16, {}, id="M>T"),
        pytest.param(16, SEED_SKELETON, id="M>T-seed-skeleton"),
    ],
)
def test_reset_rows_behave_like_a_fresh_stream(mem_len, config):
    model = _build(seq_len=8, mem_len=mem_len, **config).eval()
    tokens = torch.randint(0, 48, (3, 32))
    state = model(tokens[:, :8]).state
    state = model(tokens[:, 8:16], state).state.reset([1])
    assert not state.lmem_valid[1] and state.lmem_valid[[0, 2]].all()
    fresh = None
    for start in (16, 24):  # two more segments: row 1 equals a stream started at 16
        out = model(tokens[:, start : start + 8], state)
        fresh_out = model(tokens[1:2, start : start + 8], fresh)
        assert rel_rms(out.logits[1:2], fresh_out.logits) < 1e-5
        assert rel_rms(out.state.lmem[1:2], fresh_out.state.lmem) < 1e-5
        state, fresh = out.state, fresh_out.state


def test_select_moves_memory_with_its_row_and_state_survives_save():
    model = _build().eval()
    tokens = torch.randint(0, 48, (3, 16))
    state = model(tokens[:, :8]).state
    swapped = model(tokens[[2, 0], 8:], state.select([2, 0])).logits
    straight = model(tokens[:, 8:], state).logits
    assert rel_rms(swapped, straight[[2, 0]]) < 1e-6
    restored = MemoryXLState.from_tensors(state.to_tensors())
    assert restored.equal(state.detach())


def test_memory_off_is_a_plain_transformer():
    model = _build(memory_layers=(), lmem_len=0).eval()
    tokens = torch.randint(0, 48, (2, 16))
    state = model(tokens[:, :8]).state
    assert state.mem.shape == (0, 2, 0, 32) and state.lmem.shape == (2, 0, 32)
    assert torch.equal(model(tokens[:, 8:], state).logits, model(tokens[:, 8:]).logits)
    assert model.writer is None


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(dict(residual="gru", mogrify=True), id="gru-mogrify"),
        pytest.param(dict(residual="nbrc", one_kv_head=True, ff_glu=True), id="nbrc-1kv-glu"),
        pytest.param(dict(norm_memory=False, final_norm=False, tie_embeddings=False), id="no-norms-untied"),
    ],
)
def test_options_train_and_save(config, tmp_path):
    model = _build(**config)
    tokens = torch.randint(0, 48, (2, 17))
    first = model(tokens[:, :8], targets=tokens[:, 1:9])
    out = model(tokens[:, 8:16], first.state, targets=tokens[:, 9:17])
    (first.loss + out.loss).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert unused == []  # every parameter of every option is used
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = memtx.load(tmp_path)
    assert loaded.config == model.config
    assert torch.equal(loaded(tokens[:, :8]).logits, model(tokens[:, :8]).logits)


def test_dropout_only_in_training():
    model = _build(dropout=0.3, attn_dropout=0.3)
    x = torch.randint(0, 48, (2, 8))
    assert not torch.equal(model(x).logits, model(x).logits)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)


@pytest.mark.parametrize("scramble", [pytest.param(False, id="per-slot"), pytest.param(True, id="seed-layout")])
def test_writer_head_merge(scramble):
    """Per-slot merging keeps a slot's output in that slot; the seed's layout mixes slots."""
    model = _build(scramble_writer_heads=scramble).eval()
    writer = model.writer
    out = torch.randn(2, writer.heads, 6, writer.head_dim)  # (B, H, N, D)
    merged = writer._merge(out)
    per_slot = out.transpose(1, 2).reshape(2, 6, -1)
    assert torch.equal(merged, out.transpose(2, 3).reshape(2, 6, -1) if scramble else per_slot)
    assert torch.equal(merged, per_slot) is not scramble


def test_linear_attention_masks_keys_and_matches_the_formula():
    q, k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 7, 5), torch.randn(2, 3, 7, 5)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False
    out = linear_attention(q, k, v, valid)
    expected = torch.einsum("bhnd,bhde->bhne", q.softmax(-1),
                            torch.einsum("bhnd,bhne->bhde", k.softmax(-2), v))
    assert rel_rms(out[0], expected[0]) < 1e-6
    kept = linear_attention(q[1:], k[1:, :, 3:], v[1:, :, 3:])
    assert rel_rms(out[1:], kept) < 1e-6


def test_summarised_linear_attention_equals_the_plain_one_with_gradients():
    """The writer summarises the shared context once and merges it with each round's keys."""
    q, k_own, v_own = (torch.randn(2, 3, 4, 5, requires_grad=True) for _ in range(3))
    k_ctx, v_ctx = (torch.randn(2, 3, 9, 5, requires_grad=True) for _ in range(2))
    with torch.no_grad():
        k_ctx[:, :, 2] += 4.0  # the summary peaks above the own keys: the merge rescales
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, 5:] = False
    inputs = [q, k_own, v_own, k_ctx, v_ctx]
    fast = linear_attention_with_summary(q, k_own, v_own, summarize_keys(k_ctx, v_ctx, valid))
    plain = linear_attention(q, torch.cat((k_own, k_ctx), 2), torch.cat((v_own, v_ctx), 2),
                             torch.cat((torch.ones(2, 4, dtype=torch.bool), valid), 1))
    assert rel_rms(fast, plain) < 1e-6
    for a, b in zip(grads(fast, inputs), grads(plain, inputs)):
        assert rel_rms(a, b) < 1e-5


def test_merged_key_summaries_equal_the_summary_of_all_keys_with_gradients():
    k1, v1 = (torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    k2, v2 = (torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with torch.no_grad():
        k2[0, :, 1] += 6.0  # per feature, row 0 peaks in the second part, row 1 in the first
        k1[1, :, 2] += 6.0
    valid1 = torch.ones(2, 6, dtype=torch.bool)
    valid1[1, :2] = False
    merged = merge_key_summaries(summarize_keys(k1, v1, valid1), summarize_keys(k2, v2))
    whole = summarize_keys(torch.cat((k1, k2), 2), torch.cat((v1, v2), 2),
                           torch.cat((valid1, torch.ones(2, 4, dtype=torch.bool)), 1))
    assert torch.equal(merged[0], whole[0])  # the max of the parts' maxima
    for a, b in zip(merged[1:], whole[1:]):
        assert rel_rms(a, b) < 1e-12
    inputs = [k1, v1, k2, v2]
    fast = grads(torch.cat((merged[1], merged[2]), dim=2), inputs)
    plain = grads(torch.cat((whole[1], whole[2]), dim=2), inputs)
    for a, b in zip(fast, plain):
        assert rel_rms(a, b) < 1e-12


def test_writer_context_summary_equals_summarising_the_context_projected_the_plain_way():
    # the writer summarises one memory layer at a time, projects the stored states alone and
    # adds depth * W.sum(1): the same summary, and the same gradients for the depth
    # embedding, mem_kv and W, as projecting [states of layer l + depth[l]; mem_kv]
    # (B, L (M + T) + S, E) the plain way and summarising it at once
    model = _build().double()  # both layers are memory layers
    writer = model.writer
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        writer.depth_emb.copy_(torch.randn(writer.depth_emb.shape, generator=g, dtype=torch.float64))
    num_layers, batch, mem, length, dim = 2, 3, 5, 8, 32
    state = MemoryXLState(mem=torch.randn(num_layers, batch, mem, dim, generator=g,
                                          dtype=torch.float64),
                          valid=torch.ones(batch, mem, dtype=torch.bool),
                          lmem=torch.zeros(batch, 6, dim, dtype=torch.float64),
                          lmem_valid=torch.zeros(batch, dtype=torch.bool))
    hiddens = 3 * torch.randn(num_layers, batch, length, dim, generator=g, dtype=torch.float64)
    params = [writer.depth_emb, writer.mem_kv, writer.to_kv.weight]

    def plain_summary(valid):
        context = torch.cat((state.mem, hiddens), dim=2) + writer.depth_emb[:, None, None, None]
        context = context.transpose(0, 1).reshape(batch, -1, dim)
        context = torch.cat((context, writer.mem_kv.expand(batch, -1, -1)), dim=1)
        k, v = (t.view(batch, -1, writer.heads, writer.head_dim).transpose(1, 2)
                for t in writer.to_kv(context).chunk(2, dim=-1))
        assert k.shape == (batch, writer.heads, num_layers * (mem + length) + 2, writer.head_dim)
        return summarize_keys(k, v, valid)

    per_layer = torch.ones(batch, mem + length, dtype=torch.bool)
    for reset in (False, True):
        if reset:  # empty short-memory positions (a reset row): left out in every layer
            state.valid[1, :3] = False
            per_layer[1, :3] = False
        valid = torch.cat((per_layer, per_layer, torch.ones(batch, 2, dtype=torch.bool)), dim=1)
        fast, plain = writer.context_summary(state, hiddens), plain_summary(valid)
        for a, b in zip(fast, plain):  # the peaks too, up to the projections' rounding
            assert rel_rms(a, b) < 1e-12
        fast_grads = grads(torch.cat(fast[1:], dim=2), params)
        plain_grads = grads(torch.cat(plain[1:], dim=2), params)
        for a, b in zip(fast_grads, plain_grads):
            assert rel_rms(a, b) < 1e-12


@pytest.mark.parametrize("config", [pytest.param({}, id="sinusoid"), pytest.param(SEED_SKELETON, id="seed-skeleton")])
def test_checkpointed_attention_gives_the_same_gradients(config):
    torch.manual_seed(1)
    plain = _build(checkpoint_attention=False, **config)
    ckpt = _build(checkpoint_attention=True, **config)
    ckpt.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 48, (2, 17))
    for model in (plain, ckpt):
        first = model(tokens[:, :8], targets=tokens[:, 1:9])
        (first.loss + model(tokens[:, 8:16], first.state, targets=tokens[:, 9:17]).loss).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.numel():  # (an empty mem_kv when num_mem_kv=0)
            assert rel_rms(b.grad, a.grad) < 1e-5, name


@pytest.mark.parametrize("checkpoint", [False, True], ids=["kept", "checkpointed"])
@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param(dict(), id="every-key-positioned"),
        pytest.param(dict(num_mem_kv=3, lmem_len=40, mem_len=5), id="keys-off-the-table"),
        pytest.param(dict(memory_layers=(2,)), id="plain-layer"),
    ],
)
def test_learned_table_as_relative_positions_equals_the_gathered_table(sizes, checkpoint, monkeypatch):
    # with every key present the learned table runs through the relative-position op; rows
    # with empty slots gather it per (query, key) pair. An all-True validity forces the gather.
    torch.manual_seed(2)
    model = _build(**{**SEED_SKELETON, **sizes, "checkpoint_attention": checkpoint})
    with torch.no_grad():
        model.pos_table.normal_()
    tokens = torch.randint(0, 48, (2, 8 * 3 + 1))
    with torch.no_grad():
        state = model(tokens[:, :8]).state  # memory filled: the next segments see every key

    def run():
        model.zero_grad()
        first = model(tokens[:, 8:16], state, targets=tokens[:, 9:17])
        second = model(tokens[:, 16:24], first.state, targets=tokens[:, 17:25])
        (first.loss + second.loss).backward()
        return second.logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.numel()}

    calls = []
    relative = memtx.models.memory_xl.learned_positions_as_relative
    monkeypatch.setattr(memtx.models.memory_xl, "learned_positions_as_relative",
                        lambda *a: calls.append(a) or relative(*a))
    fast_logits, fast_grads = run()
    assert calls, "the relative-position path was not taken"
    valid = memtx.MemoryXL.prefix_validity
    monkeypatch.setattr(memtx.MemoryXL, "prefix_validity",
                        lambda self, st: valid(self, st) if valid(self, st) is not None else torch.ones(
                            st.valid.shape[0], model.config.num_mem_kv + st.lmem.shape[1] + st.valid.shape[1],
                            dtype=torch.bool))
    calls.clear()
    gathered_logits, gathered_grads = run()
    assert not calls
    assert rel_rms(fast_logits, gathered_logits) < 1e-5
    assert fast_grads.keys() == gathered_grads.keys() and "pos_table" in fast_grads
    for name, grad in fast_grads.items():
        assert rel_rms(grad, gathered_grads[name]) < 1e-5, name


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        pytest.param(dict(memory_layers=(0, 1)), "memory_layers=\\(0, 1\\) must list distinct layers in 1..depth=2", id="layer-0"),
        pytest.param(dict(memory_layers=(3,)), "memory_layers=\\(3,\\) must list distinct", id="layer-past-depth"),
        pytest.param(dict(memory_layers=(1, 1)), "memory_layers=\\(1, 1\\) must list distinct", id="repeated"),
        pytest.param(dict(lmem_len=0), "lmem_len=0 must be at least 1 while memory is on", id="lmem_len-0"),
        pytest.param(dict(residual="add", mogrify=True), "mogrify=True needs a gated residual", id="mogrify-add"),
        pytest.param(dict(write_heads=3), "write_heads=3 must be a positive divisor of dim=32", id="write_heads"),
    ],
)
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(memtx.ConfigError, match=message):
        _build(**kwargs)


@pytest.mark.parametrize(
    "other,message",
    [
        pytest.param(dict(lmem_len=5), "state.lmem \\(the long memory\\) has shape \\(1, 5, 32\\)", id="lmem_len"),
        pytest.param(dict(mem_len=16), "state.mem \\(the short memory\\) has shape \\(2, 1, 16, 32\\)", id="mem_len"),
        pytest.param(dict(memory_layers=(2,)), "state.mem \\(the short memory\\) has shape \\(1, 1, 8, 32\\)", id="layers"),
    ],
)
def test_state_with_the_wrong_memory_shape(other, message):
    model = _build()
    source = _build(**other)
    state = source(torch.zeros(1, 8, dtype=torch.long)).state
    state = source(torch.zeros(1, 8, dtype=torch.long), state).state
    with pytest.raises(memtx.StateError, match=message):
        model(torch.zeros(1, 8, dtype=torch.long), state)
    with pytest.raises(memtx.StateError, match="carries a MemoryXLState"):
        model(torch.zeros(1, 8, dtype=torch.long), memtx.build("transformer_xl", **{k: SMALL[k] for k in ("dim", "vocab_size")}).init_state(1))
