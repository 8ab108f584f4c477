"""The reference packages' training, inference and generation steps, for timing them side by
side with memtx (``memtx bench speed --reference``, ``benchmarks/*.py``).

Each adapter builds the reference model with the sizes of a memtx model and returns
``(train_step, infer_step, generate(num_tokens) or None)``; the reference package is imported
only when its adapter is called. Memformer's reference is an encoder-decoder with no language-
model mode, so it is compared in ``benchmarks/memformer.py`` instead.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn.functional as F

import memtx
from memtx.bench.speed import register_reference

StepFn = Callable[[], None]

# "defaults": the compressive reference as shipped (GRU-gated residuals, enhanced recurrence);
# "mirror": the reference with the memtx model's structural options. An environment variable,
# so that the peak-memory subprocesses (spawned) see the choice too.
REFERENCE_OPTIONS_ENV = "MEMTX_BENCH_REFERENCE_OPTIONS"


def adamw(params: Any) -> torch.optim.Optimizer:
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):  # fused AdamW needs torch >= 2.4 on CPU
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)


@register_reference("gateloop")
def gateloop_reference_steps(model: memtx.MemoryLM, batch_size: int, seed: int):
    """gateloop-transformer's ``Transformer`` with the sizes of ``model``."""
    from gateloop_transformer import Transformer

    cfg = model.config
    ref = Transformer(
        dim=cfg.dim, num_tokens=cfg.vocab_size, depth=cfg.depth,
        gate_loop_heads=cfg.heads, ff_mult=cfg.ff_mult,
    )
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=g)
    optimizer = adamw(ref.parameters())

    def train() -> None:
        ref.train()
        ref(tokens, return_loss=True).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer() -> None:
        ref.eval()
        ref(tokens[:, :-1])

    @torch.no_grad()
    def generate(num_tokens: int) -> None:
        # the reference has no cache: every new token recomputes the whole prefix
        ref.eval()
        seq = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(num_tokens):
            nxt = ref(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), dim=1)

    return train, infer, generate


@register_reference("compressive")
def compressive_reference_steps(model: memtx.MemoryLM, batch_size: int, seed: int):
    """Train/infer steps and ``generate(n)`` of compressive-transformer-pytorch with the sizes
    of ``model`` (and its options when $MEMTX_BENCH_REFERENCE_OPTIONS is "mirror")."""
    from compressive_transformer_pytorch import AutoregressiveWrapper, CompressiveTransformer

    cfg = model.config
    torch.manual_seed(seed)
    options = {}
    if os.environ.get(REFERENCE_OPTIONS_ENV, "defaults") == "mirror":
        options = dict(
            memory_layers=[i + 1 for i in cfg.memory_layer_indices()],
            enhanced_recurrence=cfg.enhanced_recurrence, gru_gated_residual=cfg.gru_gated_residual,
            mogrify_gru=cfg.mogrify_gru, ff_glu=cfg.ff_glu,
        )
    ref = CompressiveTransformer(
        num_tokens=cfg.vocab_size, dim=cfg.dim, seq_len=cfg.seq_len, depth=cfg.depth,
        heads=cfg.heads, mem_len=cfg.mem_len, cmem_len=cfg.cmem_len, cmem_ratio=cfg.compress_ratio,
        reconstruction_loss_weight=cfg.reconstruction_loss_weight, **options,
    )
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    params = [p for p in ref.parameters()]
    optimizer = adamw(params)
    train_mem: list = [None]
    infer_mem: list = [None]

    def train() -> None:
        ref.train()
        logits, train_mem[0], aux = ref(inputs, memories=train_mem[0])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        (loss + aux.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer() -> None:
        ref.eval()
        _, infer_mem[0], _ = ref(inputs, memories=infer_mem[0])

    wrapper = AutoregressiveWrapper(ref)

    def generate(num_tokens: int) -> None:
        wrapper.generate(torch.zeros(1, 1, dtype=torch.long), num_tokens)

    return train, infer, generate


def memory_xl_reference_model(cfg: Any) -> torch.nn.Module:
    """The reference model with the sizes and options of ``cfg``.

    The reference only writes memory when a segment is at least ``mem_len`` long, so at
    ``mem_len > seq_len`` it would run without memory; its guard attribute is set to
    ``seq_len`` here so that it carries (and writes) the same memory as memtx."""
    from memory_transformer_xl import MemoryTransformerXL

    ref = MemoryTransformerXL(
        num_tokens=cfg.vocab_size, dim=cfg.dim, seq_len=cfg.seq_len, depth=cfg.depth,
        heads=cfg.heads, mem_len=cfg.mem_len, lmem_len=cfg.lmem_len,
        memory_layers=[i + 1 for i in cfg.memory_layer_indices()],
        gru_gated_residual=cfg.residual != "add", mogrify_gru=cfg.mogrify, ff_glu=cfg.ff_glu,
        one_kv_head=cfg.one_kv_head, num_mem_kv=cfg.num_mem_kv,
        mem_write_iters=cfg.mem_write_iters,
    )
    ref.mem_len = cfg.seq_len
    return ref


@register_reference("memory_xl")
def memory_xl_reference_steps(model: memtx.MemoryLM, batch_size: int, seed: int) -> tuple[StepFn, StepFn, None]:
    """The reference's training and inference steps for a model of ``model``'s config."""
    cfg = model.config
    ref = memory_xl_reference_model(cfg)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = adamw(ref.parameters())
    memories: list[Any] = [None, None]

    def train() -> None:
        ref.train()
        logits, mem = ref(inputs, memories=memories[0], detach_lmem=True)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        memories[0] = type(mem)(mem.short.detach(), mem.long.detach())

    @torch.no_grad()
    def infer() -> None:
        ref.eval()
        memories[1] = ref(inputs, memories=memories[1])[1]

    return train, infer, None
