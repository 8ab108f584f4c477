"""Compressive Transformer: reference parity, compression functions, the reconstruction loss,
the seed's bugs (each test below fails on the seed's behaviour), streaming, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import memtx
from memtx.models.compressive import (
    CompressiveMemory,
    ConvCompression,
    DilatedConvCompression,
    MostUsedCompression,
    PoolCompression,
    compressed_validity,
    from_reference_state_dict,
)
from memtx.testing import rel_rms

SMALL = dict(dim=32, depth=2, heads=4, vocab_size=64)


def build(**kw):
    return memtx.build("compressive", **{**SMALL, **kw})


def run_segments(model, tokens, seq_len, state=None):
    outs = []
    for start in range(0, tokens.shape[1], seq_len):
        out = model(tokens[:, start : start + seq_len], state)
        state = out.state
        outs.append(out)
    return outs


def normalised_inputs(model):
    """Forward hooks recording every layer's normalised attention input (what memories store)."""
    seen: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        block.attn_norm.register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, out))
    return seen


# ============================================================================================
# Reference parity (compressive-transformer-pytorch 0.4.0)
# ============================================================================================
ref_pkg = pytest.importorskip("compressive_transformer_pytorch")

PARITY = [
    pytest.param(dict(gru_gated_residual=True, mogrify_gru=True, ff_glu=True), id="gru-mogrify-glu"),
    pytest.param(dict(gru_gated_residual=False, memory_layers=[2]), id="residual-top-memory"),
    pytest.param(dict(gru_gated_residual=True, memory_layers=[1]), id="gru-bottom-memory"),
]


def reference(**kw):
    # enhanced_recurrence off: the reference's torch.roll version is one of its bugs
    args = dict(num_tokens=64, dim=32, seq_len=8, depth=2, heads=4, mem_len=16, cmem_len=8,
                cmem_ratio=4, enhanced_recurrence=False)
    ref = ref_pkg.CompressiveTransformer(**{**args, **kw})
    with torch.no_grad():
        ref.pos_emb.normal_()  # zero-initialised: make the position table matter
    return ref


@pytest.mark.parametrize("options", PARITY)
def test_parity_with_the_reference_over_segments(options):
    ref = reference(**options).eval()
    model = memtx.from_reference(ref).eval()
    tokens = torch.randint(0, 64, (2, 6 * 8))
    memories, state = None, None
    for s in range(6):  # the memory fills at 2, compression starts at 3, cmem is full at 6
        seg = tokens[:, 8 * s : 8 * s + 8]
        ref_logits, memories, _ = ref(seg, memories=memories)
        out = model(seg, state)
        state = out.state
        assert (out.logits - ref_logits).abs().max() < 1e-5, f"segment {s}"
        assert state.mem.shape == memories.mem.shape
        assert state.cmem.shape == memories.compressed_mem.shape
        assert (state.mem - memories.mem).abs().max() < 1e-5
        if state.cmem.shape[2]:
            assert (state.cmem - memories.compressed_mem).abs().max() < 1e-5
    assert state.cmem.shape[2] == 8 and bool(state.cmem_valid.all())


def test_reconstruction_loss_equals_the_reference_where_its_target_is_right():
    """With mem_len == seq_len every memory is evicted, so the seed's target (the whole memory)
    is right; in training mode its loss is ours (compared before its detach_ freezes to_kv)."""
    ref = reference(mem_len=8, cmem_len=4).train()
    model = memtx.from_reference(copy.deepcopy(ref)).train()
    tokens = torch.randint(0, 64, (2, 16))
    _, memories, ref_aux0 = ref(tokens[:, :8])
    _, _, ref_aux = ref(tokens[:, 8:], memories=memories)
    outs = run_segments(model, tokens, 8)
    assert ref_aux0.item() == 0.0 and outs[0].aux_loss.item() == 0.0
    assert outs[1].aux_loss.item() > 0
    assert abs(outs[1].aux_loss.item() - ref_aux.item()) < 1e-6 * max(1.0, ref_aux.item())


def test_reference_state_dict_importer():
    ref = reference(gru_gated_residual=True, memory_layers=[2]).eval()
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    buffer.seek(0)
    state_dict = torch.load(buffer, weights_only=True)
    model = from_reference_state_dict(
        state_dict, seq_len=8, mem_len=16, cmem_len=8, memory_layers=(2,)
    ).eval()
    assert model.config.positions == "learned" and model.config.gru_gated_residual
    tokens = torch.randint(0, 64, (2, 24))
    memories = None
    for s, out in enumerate(run_segments(model, tokens, 8)):
        ref_logits, memories, _ = ref(tokens[:, 8 * s : 8 * s + 8], memories=memories)
        assert (out.logits - ref_logits).abs().max() < 1e-5
    with pytest.raises(memtx.InputError, match="position table has 32 rows but seq_len"):
        from_reference_state_dict(state_dict, seq_len=8, mem_len=8, cmem_len=8, memory_layers=(2,))


# ============================================================================================
# Compression functions on hand-checked inputs: (B=1, N, E=2) -> (1, N/ratio, 2)
# ============================================================================================
MEM = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [5.0, -6.0], [-7.0, 8.0]]])  # (1, 4, 2)
ALL = torch.ones(1, 4, dtype=torch.bool)
OLDEST_EMPTY = torch.tensor([[False, True, True, True]])


def test_conv_compression():
    comp = ConvCompression(2, ratio=2)
    with torch.no_grad():  # out_c = x[first, c] + 10 x[second, c] + bias_c
        comp.conv.weight.copy_(torch.eye(2)[:, :, None] * torch.tensor([1.0, 10.0]))
        comp.conv.bias.copy_(torch.tensor([0.5, 0.0]))
    expected = torch.tensor([[[1 + 30 + 0.5, -2 + 40], [5 - 70 + 0.5, -6 + 80]]])
    assert torch.allclose(comp(MEM, ALL), expected)
    # an empty slot reads as zero
    assert torch.allclose(comp(MEM, OLDEST_EMPTY)[0, 0], torch.tensor([30 + 0.5, 40.0]))


def test_conv_compression_starts_as_mean_pooling():
    mem, valid = torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool)
    mean = mem.view(2, 2, 4, 16).mean(2)
    assert torch.allclose(ConvCompression(16, ratio=4)(mem, valid), mean, atol=1e-6)
    assert torch.allclose(DilatedConvCompression(16, ratio=4)(mem, valid), mean, atol=1e-6)


def test_dilated_conv_compression():
    comp = DilatedConvCompression(2, ratio=4)
    assert len(comp.convs) == 2  # dilations 1 and 2
    with torch.no_grad():
        for conv in comp.convs:
            conv.weight.copy_(torch.eye(2)[:, :, None] * torch.tensor([1.0, 10.0]))
            conv.bias.zero_()
    # level 1: (a + 10 b), (c + 10 d); level 2: (a + 10 b) + 10 (c + 10 d)
    a, b, c, d = MEM[0]
    assert torch.allclose(comp(MEM, ALL), (a + 10 * b + 10 * c + 100 * d)[None, None])


@pytest.mark.parametrize(
    "mode,valid,expected",
    [
        pytest.param("mean", ALL, [[2.0, 1.0], [-1.0, 1.0]], id="mean"),
        pytest.param("mean", OLDEST_EMPTY, [[3.0, 4.0], [-1.0, 1.0]], id="mean-ignores-empty"),
        pytest.param("max", ALL, [[3.0, 4.0], [5.0, 8.0]], id="max"),
        pytest.param("max", torch.tensor([[False, False, True, True]]), [[0.0, 0.0], [5.0, 8.0]],
                     id="max-empty-group-is-zero"),
    ],
)
def test_pool_compression(mode, valid, expected):
    out = PoolCompression(2, mode)(MEM, valid)
    assert torch.equal(out, torch.tensor([expected]))


def test_most_used_compression_keeps_the_most_attended_in_order():
    usage = torch.tensor([[0.1, 0.7, 0.05, 0.9]])
    out = MostUsedCompression(2)(MEM, ALL, usage)
    assert torch.equal(out, MEM[:, [1, 3]])
    # an empty slot is never preferred to a valid memory, whatever its usage
    out = MostUsedCompression(2)(MEM, OLDEST_EMPTY, torch.tensor([[5.0, 0.1, 0.2, 0.3]]))
    assert torch.equal(out, MEM[:, [2, 3]])


@pytest.mark.parametrize(
    "kind,expected",
    [pytest.param("mean", [[False, True], [True, True]], id="pooled"),
     pytest.param("most_used", [[False, True], [True, True]], id="most-used")],
)
def test_compressed_validity(kind, expected):
    valid = torch.tensor([[False, False, False, True], [False, True, True, True]])
    assert torch.equal(compressed_validity(valid, 2, kind), torch.tensor(expected))


@pytest.mark.parametrize("compression", ["conv", "mean", "max", "dilated_conv", "most_used"])
def test_every_compression_runs_in_the_model(compression):
    model = build(seq_len=4, mem_len=4, cmem_len=4, compress_ratio=2, compression=compression)
    outs = run_segments(model, torch.randint(0, 64, (2, 16)), 4)
    state = outs[-1].state
    assert state.cmem.shape == (2, 2, 4, 32) and bool(state.cmem_valid.all())
    if compression == "mean":  # the newest compressed pair = mean of the evicted pair
        evicted = outs[-2].state.mem[:, :, 2:]
        assert torch.allclose(state.cmem[:, :, -1], evicted.mean(2), atol=1e-6)


# ============================================================================================
# The seed's bugs
# ============================================================================================
def test_padding_completes_the_oldest_group_instead_of_dropping_memories():
    """5 evicted memories, ratio 4: ratio - 5 % 4 = 3 empty slots give 2 compressed memories
    (the seed pads 5 % 4 = 1 slot, and its stride-4 conv drops the last 2 memories)."""
    model = build(seq_len=5, mem_len=5, cmem_len=4, compress_ratio=4, compression="mean")
    tokens = torch.randint(0, 64, (2, 10))
    first, second = run_segments(model, tokens, 5)
    evicted = first.state.mem  # (L, B, 5, E): the whole first segment is evicted
    state = second.state
    assert state.cmem.shape[2] == 2 and bool(state.cmem_valid.all())
    assert torch.allclose(state.cmem[:, :, 0], evicted[:, :, 0])  # 3 empty slots + memory 0
    assert torch.allclose(state.cmem[:, :, 1], evicted[:, :, 1:].mean(2), atol=1e-6)


def test_to_kv_keeps_training_after_many_segments():
    """The seed's ``self.to_kv.weight.detach_()`` freezes to_kv from the first compression on."""
    model = build(seq_len=4, mem_len=4, cmem_len=4, compress_ratio=2).train()
    tokens = torch.randint(0, 64, (2, 4 * 6 + 1))
    state = None
    for s in range(6):
        x, y = tokens[:, 4 * s : 4 * s + 4], tokens[:, 4 * s + 1 : 4 * s + 5]
        out = model(x, state, targets=y)
        model.zero_grad()
        out.loss.backward(retain_graph=True)  # the language-model loss alone
        for block in model.blocks:
            assert block.attn.to_kv.weight.requires_grad
            assert block.attn.to_kv.weight.grad.abs().sum() > 0, f"segment {s}"
        if out.aux_loss.requires_grad:  # from the first compression on
            out.aux_loss.backward()
        state = out.state
    assert out.aux_loss.item() > 0
    # the reference, for contrast: after one compressing training step to_kv no longer trains
    ref = reference(mem_len=8, cmem_len=4).train()
    memories = None
    for s in range(2):
        _, memories, _ = ref(tokens[:, 8 * s : 8 * s + 8], memories=memories)
    assert not ref.attn_layers[0].fn.fn.to_kv.weight.requires_grad


def test_compression_network_learns_only_from_the_reconstruction_loss():
    model = build(seq_len=4, mem_len=4, cmem_len=4, compress_ratio=2).train()
    tokens = torch.randint(0, 64, (2, 13))
    state = model(tokens[:, :4]).state  # memory full, compression next
    out = model(tokens[:, 4:8], state, targets=tokens[:, 5:9])
    assert out.state.cmem.shape[2] == 2 and not out.state.cmem.requires_grad
    compressor = {n for n, _ in model.named_parameters() if ".compress." in n}
    assert compressor
    lm_grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True,
                                   retain_graph=True)
    aux_grads = torch.autograd.grad(out.aux_loss, list(model.parameters()), allow_unused=True)
    for (name, _), lm, aux in zip(model.named_parameters(), lm_grads, aux_grads):
        if name in compressor:
            assert lm is None or lm.abs().sum() == 0, name
            assert aux is not None and aux.abs().sum() > 0, name
        else:
            assert aux is None or aux.abs().sum() == 0, name
    # the next segment reads the compressed memory: still no language-model gradient
    nxt = model(tokens[:, :4], out.state, targets=tokens[:, 1:5])
    grads = torch.autograd.grad(nxt.loss, [p for n, p in model.named_parameters() if n in compressor],
                                allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)


def test_reconstruction_target_is_exactly_the_evicted_memories():
    """mem_len > seq_len: one segment evicts 4 of 8 memories. The target attends over those 4
    (the seed attends over all 8 while the compressed memory covers only the evicted 4)."""
    model = build(depth=1, seq_len=4, mem_len=8, cmem_len=4, compress_ratio=2).train()
    tokens = torch.randint(0, 64, (2, 12))
    state = run_segments(model, tokens[:, :8], 4)[-1].state
    seen = normalised_inputs(model)
    out = model(tokens[:, 8:], state)
    attn = model.blocks[0].attn
    q = attn._split_heads(attn.to_q(seen[0])) + attn.content_bias[:, None, :]  # content queries
    mem = state.mem[0]  # (B, 8, E)
    compressed = model.blocks[0].compress(mem[:, :4], torch.ones(2, 4, dtype=torch.bool))

    def content_attention(memories):
        k, v = attn.project_kv(memories)
        return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1) @ v

    ours = F.mse_loss(content_attention(compressed), content_attention(mem[:, :4]))
    seeds = F.mse_loss(content_attention(compressed), content_attention(mem))
    assert abs(out.aux_loss.item() - ours.item()) < 1e-6 * max(1.0, ours.item())
    assert abs(out.aux_loss.item() - seeds.item()) > 1e-3 * seeds.item()


@pytest.mark.parametrize("memory_layers", [pytest.param(None, id="all"), pytest.param((1, 3), id="1-3")])
def test_enhanced_recurrence_reads_the_layer_above_and_the_top_layer_its_own(memory_layers):
    """The seed's torch.roll hands the top memory layer the bottom layer's memory."""
    model = build(depth=3, seq_len=4, mem_len=4, cmem_len=2, enhanced_recurrence=True,
                  memory_layers=memory_layers).eval()
    seen = normalised_inputs(model)
    state = model(torch.randint(0, 64, (2, 4))).state
    layers = model.memory_layers
    for j, layer in enumerate(layers):
        source = min(layer + 1, 2)
        assert torch.equal(state.mem[j], seen[source]), f"memory layer {layer}"
    assert not torch.allclose(state.mem[-1], seen[layers[0]], atol=1e-3)
    plain = build(depth=3, seq_len=4, mem_len=4, cmem_len=2, memory_layers=memory_layers).eval()
    seen = normalised_inputs(plain)
    state = plain(torch.randint(0, 64, (2, 4))).state
    for j, layer in enumerate(plain.memory_layers):
        assert torch.equal(state.mem[j], seen[layer])


# ============================================================================================
# Memory semantics
# ============================================================================================
@pytest.mark.parametrize("positions", ["sinusoid", "learned"])
def test_two_segments_equal_one_pass_before_compression(positions):
    # learned: the reference slices its table by memory fill, so the first segment reads other
    # rows than one pass does; with one layer the memory (embeddings) is the same anyway
    depth = 1 if positions == "learned" else 2
    seg = build(depth=depth, seq_len=8, mem_len=8, cmem_len=2, positions=positions).eval()
    one = build(depth=depth, seq_len=16, mem_len=16, cmem_len=4, positions=positions).eval()
    if positions == "learned":  # the table has seq + mem + cmem rows: align distance rows
        with torch.no_grad():
            seg.pos_table.normal_()
            one.pos_table.zero_()
            one.pos_table[:, :18] = seg.pos_table  # row base - 1 - d, base = C + M + seq_len = 16
        state = {k: v for k, v in seg.state_dict().items() if k != "pos_table"}
        one.load_state_dict({**state, "pos_table": one.pos_table.data})
    else:
        one.load_state_dict(seg.state_dict())
    x = torch.randint(0, 64, (3, 16))
    first = seg(x[:, :8])
    second = seg(x[:, 8:], state=first.state)
    if positions == "sinusoid":
        assert rel_rms(torch.cat((first.logits, second.logits), 1), one(x).logits) < 1e-5
    else:
        assert rel_rms(second.logits, one(x).logits[:, 8:]) < 1e-5
    assert rel_rms(seg(x[:, 8:]).logits, one(x).logits[:, 8:]) > 1e-2  # the memory matters


def test_layers_without_memory_attend_only_to_the_segment():
    model = build(depth=2, seq_len=4, mem_len=4, cmem_len=2, memory_layers=(2,)).eval()
    seen = {}
    model.blocks[0].register_forward_hook(lambda _m, _i, out: seen.__setitem__("x", out.x))
    x = torch.randint(0, 64, (2, 8))
    state = model(x[:, :4]).state
    assert state.mem.shape == (1, 2, 4, 32)
    model(x[:, 4:], state)
    with_memory = seen["x"]
    model(x[:, 4:])
    assert torch.equal(with_memory, seen["x"])


def test_memory_and_compressed_memory_fifo():
    model = build(seq_len=4, mem_len=8, cmem_len=5, compress_ratio=2, compression="max").eval()
    outs = run_segments(model, torch.randint(0, 64, (2, 24)), 4)
    sizes = [(o.state.mem.shape[2], o.state.cmem.shape[2]) for o in outs]
    assert sizes == [(4, 0), (8, 0), (8, 2), (8, 4), (8, 5), (8, 5)]
    # the compressed memory keeps the newest cmem_len entries: the 2 new ones (the oldest 4
    # memories, max-pooled in pairs) after the newest 3 it had
    prev, last = outs[-2].state, outs[-1].state
    assert torch.equal(last.cmem[:, :, :3], prev.cmem[:, :, -3:])
    assert torch.equal(last.cmem[:, :, 3:], prev.mem[:, :, :4].view(2, 2, 2, 2, 32).amax(3))
    assert not last.mem.requires_grad and not last.cmem.requires_grad


def test_reset_rows_behave_like_a_fresh_stream():
    model = build(seq_len=4, mem_len=4, cmem_len=2, compress_ratio=2).eval()
    x = torch.randint(0, 64, (3, 16))
    state = run_segments(model, x[:, :8], 4)[-1].state.reset([1])
    assert not state.valid[1].any() and not state.cmem_valid[1].any()
    outs = run_segments(model, x[:, 8:], 4, state)
    fresh = run_segments(model, x[1:2, 8:], 4)
    for out, ref in zip(outs, fresh):
        assert rel_rms(out.logits[1:2], ref.logits) < 1e-5
    kept = run_segments(model, x[:, 8:], 4, run_segments(model, x[:, :8], 4)[-1].state)
    assert rel_rms(outs[-1].logits[[0, 2]], kept[-1].logits[[0, 2]]) < 1e-6


def test_select_moves_memory_with_its_row():
    model = build(seq_len=4, mem_len=4, cmem_len=2, compress_ratio=2).eval()
    x = torch.randint(0, 64, (3, 16))
    state = run_segments(model, x[:, :12], 4)[-1].state
    assert state.cmem.shape[2] == 2
    swapped = model(x[[2, 0], 12:], state=state.select([2, 0])).logits
    straight = model(x[:, 12:], state=state).logits
    assert rel_rms(swapped, straight[[2, 0]]) < 1e-6


# ============================================================================================
# Losses and options
# ============================================================================================
def test_losses():
    model = build(seq_len=4, mem_len=4, cmem_len=2, compress_ratio=2).train()
    x = torch.randint(0, 64, (2, 8))
    first = model(x[:, :4], targets=x[:, :4])
    assert torch.allclose(first.loss, F.cross_entropy(first.logits.reshape(-1, 64), x[:, :4].reshape(-1)))
    assert first.aux_loss.shape == () and first.aux_loss.item() == 0.0  # nothing compressed yet
    aux = model(x[:, 4:], first.state).aux_loss
    assert aux.item() > 0
    model.eval()
    assert model(x[:, 4:], first.state).aux_loss.item() == 0.0  # training-only loss
    model.train()
    double = build(seq_len=4, mem_len=4, cmem_len=2, compress_ratio=2, reconstruction_loss_weight=2.0)
    double.load_state_dict(model.state_dict())
    assert torch.allclose(double(x[:, 4:], first.state).aux_loss, 2 * aux)


@pytest.mark.parametrize("compression", ["mean", "max", "most_used"])
def test_parameter_free_compressions_have_no_reconstruction_loss(compression):
    model = build(seq_len=4, mem_len=4, cmem_len=2, compress_ratio=2, compression=compression).train()
    outs = run_segments(model, torch.randint(0, 64, (2, 12)), 4)
    assert outs[-1].state.cmem.shape[2] == 2
    assert all(o.aux_loss.item() == 0.0 for o in outs)
    assert not any(".compress." in n for n, _ in model.named_parameters())


@pytest.mark.parametrize(
    "field", ["attn_dropout", "attn_layer_dropout", "ff_dropout", "reconstruction_attn_dropout"]
)
def test_dropouts_only_in_training(field):
    model = build(seq_len=4, mem_len=4, cmem_len=2, compress_ratio=2, **{field: 0.5})
    x = torch.randint(0, 64, (2, 8))
    state = model.eval()(x[:, :4]).state
    model.train()
    a, b = model(x[:, 4:], state), model(x[:, 4:], state)
    value = (lambda o: o.aux_loss) if field == "reconstruction_attn_dropout" else (lambda o: o.logits)
    assert not torch.equal(value(a), value(b))
    model.eval()
    assert torch.equal(model(x[:, 4:], state).logits, model(x[:, 4:], state).logits)


def test_structural_options():
    plain = build()
    assert plain.blocks[0].attn_gate is None and isinstance(plain.norm, torch.nn.LayerNorm)
    assert not hasattr(plain, "pos_table") and hasattr(plain.blocks[0].attn, "to_r")
    seedlike = build(gru_gated_residual=True, mogrify_gru=True, positions="learned",
                     final_norm=False, ff_glu=True, ff_mult=2)
    block = seedlike.blocks[0]
    assert isinstance(block.attn_gate.cell, torch.nn.GRUCell) and block.ff_gate.mogrifier is not None
    assert isinstance(seedlike.norm, torch.nn.Identity)
    assert seedlike.pos_table.shape == (4, 256 + 256 + 64, 8) and not hasattr(block.attn, "to_r")
    assert block.ff.w1.weight.shape == (2 * 2 * 32, 32)
    x = torch.randint(0, 64, (2, 8))
    for model in (plain, seedlike):
        out = model(x, targets=x)
        out = model(x, out.state, targets=x)
        out.loss.backward()
        missing = [n for n, p in model.named_parameters()
                   if ".compress." not in n and (p.grad is None or p.grad.abs().sum() == 0)]
        assert missing == []


def test_save_and_load_round_trip(tmp_path):
    model = build(seq_len=4, mem_len=4, cmem_len=2, memory_layers=(2,), compression="dilated_conv",
                  compress_ratio=2).eval()
    model.save_pretrained(tmp_path)
    loaded = memtx.load(tmp_path).eval()
    assert loaded.config == model.config
    x = torch.randint(0, 64, (2, 12))
    for a, b in zip(run_segments(model, x, 4), run_segments(loaded, x, 4)):
        assert torch.equal(a.logits, b.logits)


# ============================================================================================
# Streaming generation
# ============================================================================================
def _prefix_logits(model, tokens, prefix_len):
    """Logits of the last token of tokens[:, :prefix_len] recomputed from scratch with the
    training segmentation (full segments with the state carried, then the partial one)."""
    seq_len = model.config.seq_len
    state, start = None, 0
    while prefix_len - start > seq_len:
        state = model(tokens[:, start : start + seq_len], state).state
        start += seq_len
    return model(tokens[:, start:prefix_len], state).logits[:, -1]


STREAMING = [
    pytest.param(dict(seq_len=4, mem_len=4, cmem_len=2, compress_ratio=2), id="default"),
    pytest.param(dict(seq_len=3, mem_len=5, cmem_len=2, compress_ratio=2), id="T3-M5-padding"),
    pytest.param(dict(seq_len=4, mem_len=4, cmem_len=2, compress_ratio=2, positions="learned",
                      gru_gated_residual=True, final_norm=False), id="reference-skeleton"),
    pytest.param(dict(seq_len=4, mem_len=4, cmem_len=2, compress_ratio=2, compression="most_used"),
                 id="most-used"),
    pytest.param(dict(depth=3, seq_len=4, mem_len=4, cmem_len=2, compress_ratio=2,
                      enhanced_recurrence=True, memory_layers=(1, 2)), id="enhanced-layers-1-2"),
]


@pytest.mark.parametrize("options", STREAMING)
def test_streaming_logits_equal_recomputing_each_prefix(options):
    model = build(**options).eval()
    tokens = torch.randint(0, 64, (2, 4 * model.config.seq_len + 1))
    stream = model.stream(batch_size=2)
    prompt = 5
    streamed = [stream.feed(tokens[:, :prompt])[:, -1]]
    for t in range(prompt, tokens.shape[1]):
        streamed.append(stream.feed(tokens[:, t : t + 1])[:, -1])
    assert stream.state.cmem.shape[2] == 2  # compression happened while streaming
    for i, logits in enumerate(streamed):
        assert rel_rms(logits, _prefix_logits(model, tokens, prompt + i)) < 1e-5, f"prefix {prompt + i}"


def test_stream_commits_the_same_memory_as_training_and_generate_uses_it():
    model = build(seq_len=4, mem_len=4, cmem_len=2, compress_ratio=2).eval()
    tokens = torch.randint(0, 64, (2, 17))
    stream = model.stream(batch_size=2)
    for t in range(tokens.shape[1]):
        stream.feed(tokens[:, t : t + 1])
    state = run_segments(model, tokens[:, :16], 4)[-1].state
    assert torch.allclose(stream.state.mem, state.mem, atol=1e-6)
    assert torch.allclose(stream.state.cmem, state.cmem, atol=1e-6)
    new = memtx.generate(model, tokens[:, :7], 9, temperature=0)
    seq = tokens[:, :7]
    for _ in range(9):
        seq = torch.cat((seq, _prefix_logits(model, seq, seq.shape[1]).argmax(-1, keepdim=True)), 1)
    assert torch.equal(new, seq[:, 7:])


# ============================================================================================
# Bad input
# ============================================================================================
@pytest.mark.parametrize(
    "overrides,message",
    [
        pytest.param(dict(seq_len=64, mem_len=128, cmem_len=16), r"cmem_len=16 must be >= mem_len // compress_ratio = 32",
                     id="cmem-too-small"),
        pytest.param(dict(seq_len=64, mem_len=32), r"mem_len=32 must be >= seq_len=64", id="mem-below-seq"),
        pytest.param(dict(memory_layers=(0, 2)), r"memory_layers=\(0, 2\) must hold layer numbers in \[1, depth=2\]",
                     id="memory-layer-0"),
        pytest.param(dict(memory_layers=(3,)), r"memory_layers=\(3,\) must hold layer numbers", id="memory-layer-3"),
        pytest.param(dict(memory_layers=(1, 1)), "must not repeat a layer", id="memory-layer-twice"),
        pytest.param(dict(compression="kmeans"), r"compression='kmeans' is not a compression function; use one of conv, mean",
                     id="unknown-compression"),
        pytest.param(dict(compression="dilated_conv", compress_ratio=3, cmem_len=128),
                     "compress_ratio=3 must be a power of two", id="dilated-ratio"),
        pytest.param(dict(compress_ratio=1), "compress_ratio=1 must be at least 2", id="ratio-1"),
        pytest.param(dict(mogrify_gru=True), "mogrify_gru=True needs gru_gated_residual=True", id="mogrify"),
        pytest.param(dict(positions="rotary"), "positions='rotary' must be one of sinusoid, learned", id="positions"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(memtx.ConfigError, match=message):
        build(**overrides)


@pytest.fixture
def bad_state_model():
    return build(seq_len=4, mem_len=4, cmem_len=2, compress_ratio=2)


def _state(layers=2, mem=4, cmem=2, dim=32, batch=1):
    return CompressiveMemory(
        mem=torch.zeros(layers, batch, mem, dim), valid=torch.ones(batch, mem, dtype=torch.bool),
        cmem=torch.zeros(layers, batch, cmem, dim), cmem_valid=torch.ones(batch, cmem, dtype=torch.bool),
    )


@pytest.mark.parametrize(
    "state,message",
    [
        pytest.param(_state(mem=5), "'mem' dimension is 5, more than this model's limit 4", id="mem-too-long"),
        pytest.param(_state(cmem=3), "'cmem' dimension is 3, more than this model's limit 2", id="cmem-too-long"),
        pytest.param(_state(dim=48), "'dim' dimension is 48 but this model expects 32", id="width"),
        pytest.param(_state(layers=3), "'layer' dimension is 3 but this model expects 2", id="layers"),
        pytest.param(CompressiveMemory(mem=torch.zeros(2, 1, 4), valid=torch.ones(1, 4, dtype=torch.bool),
                                       cmem=torch.zeros(2, 1, 2, 32), cmem_valid=torch.ones(1, 2, dtype=torch.bool)),
                     r"CompressiveMemory.mem must have 4 dimensions", id="mem-3d"),
        pytest.param(CompressiveMemory(mem=torch.zeros(2, 1, 4, 32), valid=torch.ones(1, 4, dtype=torch.bool),
                                       cmem=torch.zeros(2, 1, 2, 32), cmem_valid=torch.ones(1, 1, dtype=torch.bool)),
                     r"'cmem' dimension is 2 in cmem but 1 in cmem_valid", id="cmem-mask"),
    ],
)
def test_bad_state(bad_state_model, state, message):
    with pytest.raises(memtx.StateError, match=message):
        bad_state_model(torch.zeros(1, 4, dtype=torch.long), state=state)
    assert bad_state_model(torch.zeros(1, 4, dtype=torch.long), state=_state()).logits.shape == (1, 4, 64)


def test_memories_hold_no_storage_beyond_their_own_entries():
    # the next memory is built at its own size: a view of [memory; segment] would keep the
    # evicted entries (and, for the compressed memory, the dropped ones) alive in every state
    model = build(seq_len=4, mem_len=8, cmem_len=4, compress_ratio=2).train()
    tokens = torch.randint(0, 64, (2, 4 * 5 + 1))
    state = None
    for s in range(5):
        out = model(tokens[:, 4 * s : 4 * s + 4], state, targets=tokens[:, 4 * s + 1 : 4 * s + 5])
        state = out.state
    assert state.mem.shape[2] == 8 and state.cmem.shape[2] == 4
    for t in (state.mem, state.cmem):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
