"""GateLoop (Katsch 2023, *GateLoop: Fully Data-Controlled Linear Recurrence*).

Each token mixer is a linear recurrence with data-controlled complex state transitions: per head,

    S_t = a_t S_{t-1} + k_t^T v_t,    out_t = q_t Re(S_t),    a_t = sigmoid(|z_t|) e^{i angle(z_t)}

where z_t is a complex number projected from the token. The state S (H heads of Dk x Dv) is the
memory: memtx carries it across segments, so a stream fed segment by segment equals one pass over
the whole stream, and generation costs the same for every token.

Faithful to the reference model (``gateloop_transformer.Transformer``, 0.2.5): gated-loop
attention with swish output gating, optional sub-LayerNorm, ``frac_gradient_state_transition``,
heads defaulting to one channel per head, pre-RMSNorm or post-LayerNorm blocks, the
``ablate_complex`` / ``ablate_state_transition`` switches, and the causal full-attention
alternative (rotary, data-dependent relative positions, softmax or unnormalised).

Deliberate differences from the reference:

* the recurrent state is carried across calls (the reference forgets everything at each call);
* training uses the chunkwise-parallel form of :mod:`memtx.ops.scan` instead of an associative
  scan that materialises a state per position, so ``gradient_checkpointing`` defaults to off
  (the reference checkpoints by default to save that memory); ``checkpoint_blocks`` goes
  further and recomputes whole blocks, for the longest segments;
* with tiny states (one-channel heads) the transitions go to the recurrence as complex numbers
  made in one autograd node from ``z`` (:class:`_ComplexGate`); the reference's chain of
  magnitude, angle and polar form computes the same values (tested against it);
* gradient checkpointing, when on, uses ``use_reentrant=False``;
* the full-attention variant has no memory across segments, like the reference: it attends
  within the segment only and its state is empty;
* with ``data_dependent_rel_pos`` the reference takes the cumulative product of the transitions
  over the *feature* axis (``cumprod(dim=-2)`` of a (B, H, T, D/2, 1) tensor), so each position's
  decay depends only on its own token; memtx takes it over *time*, as the attention form of
  GateLoop needs (query i and key j then differ by the transitions between them).

Shape legend: B batch, T segment, L layers, H heads, Dk key dim, Dv value dim, E model width,
V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from memtx.config import ModelConfig
from memtx.errors import ConfigError
from memtx.generation import RecomputeStream, Stream
from memtx.layers.feedforward import FeedForward
from memtx.layers.norms import RMSNorm
from memtx.modeling import MemoryLM
from memtx.ops.position import rotary
from memtx.ops.scan import (
    gate_loop_channels,
    gate_loop_chunked,
    gate_loop_step,
    uses_recurrent_form,
)
from memtx.reference import register_converter
from memtx.registry import register
from memtx.state import State, memory_field


@dataclass(kw_only=True)
class GateLoopConfig(ModelConfig):
    """GateLoop hyper-parameters.

    Attributes:
        heads: heads of the token mixer. For gated-loop attention ``None`` means one channel per
            head (``dim_inner`` heads of a 1x1 state, the paper's and reference's default); for
            full attention ``None`` means 8.
        dim_inner: width of the gated-loop attention's queries, keys and values (default
            ``dim``); must be divisible by ``heads``.
        dim_head: head width of the full-attention alternative.
        ff_mult: feed-forward hidden width as a multiple of ``dim``.
        use_gate_looped_attn: gated-loop attention (True) or causal full attention (False).
        swish_gating: multiply the mixer output by ``silu(W x)``.
        sub_ln: LayerNorm on the gated-loop attention output before gating.
        frac_gradient_state_transition: fraction of the gradient that reaches the state
            transition projection (the rest is stopped), for stability.
        ablate_complex: drop the imaginary part of the transitions (real-valued gates).
        ablate_state_transition: fix every transition to 1 (no forgetting).
        post_norm: post-LayerNorm blocks (``norm(x + f(x))``) instead of pre-RMSNorm.
        rotary_emb: rotary positions in the full-attention alternative.
        data_dependent_rel_pos: the full-attention alternative scales queries and keys by the
            cumulative product of data-controlled transitions (the reference's approximation of
            GateLoop in attention form).
        softmax_normalize: softmax in the full-attention alternative; ``None`` means softmax
            unless ``data_dependent_rel_pos`` is on.
        gradient_checkpointing: recompute the gated-loop recurrence in the backward pass (the
            reference's ``checkpoint_gate_looped_attn``, on by default there): less memory at
            long segments for a slower step (measured at seq_len 4096, batch 4, dim 256: 8 heads
            1,926 -> 1,411 MiB, 3,879 -> 3,254 tokens/s).
        checkpoint_blocks: recompute every whole block (mixer and feed-forward) in the backward
            pass, keeping only each block's input: the least training memory, for one more
            forward pass per step. Subsumes ``gradient_checkpointing`` (a recurrence
            recomputed again inside a recomputed block saved nothing more when measured).
        chunk_size: chunk length of the chunkwise-parallel recurrence (``None``: chosen from the
            head size by measurement, see ``memtx.ops.scan.default_chunk_size``).
    """

    heads: int | None = None
    dim_inner: int | None = None
    dim_head: int = 64
    ff_mult: int = 4
    use_gate_looped_attn: bool = True
    swish_gating: bool = True
    sub_ln: bool = False
    frac_gradient_state_transition: float = 0.9
    ablate_complex: bool = False
    ablate_state_transition: bool = False
    post_norm: bool = False
    rotary_emb: bool = False
    data_dependent_rel_pos: bool = False
    softmax_normalize: bool | None = None
    gradient_checkpointing: bool = False
    checkpoint_blocks: bool = False
    chunk_size: int | None = None

    def validate(self) -> None:
        super().validate()
        inner = self.resolved_dim_inner
        if self.use_gate_looped_attn:
            self.require(
                inner % self.resolved_heads == 0, "heads",
                f"must divide dim_inner={inner} (each head gets dim_inner // heads channels)",
            )
        else:
            self.require(self.dim_head % 2 == 0 or not (self.rotary_emb or self.data_dependent_rel_pos),
                         "dim_head", "must be even for rotary or data-dependent positions")
        self.require(self.dim_head >= 1, "dim_head", "must be positive")
        self.require(self.ff_mult >= 1, "ff_mult", "must be at least 1")
        self.require(0.0 <= self.frac_gradient_state_transition <= 1.0,
                     "frac_gradient_state_transition", "must be in [0, 1]")
        self.require(self.chunk_size is None or self.chunk_size >= 1, "chunk_size", "must be positive")
        if self.dim_inner is not None:
            self.require(self.dim_inner >= 1, "dim_inner", "must be positive")

    @property
    def resolved_dim_inner(self) -> int:
        return self.dim_inner or self.dim

    @property
    def resolved_heads(self) -> int:
        if self.heads is not None:
            return self.heads
        return self.resolved_dim_inner if self.use_gate_looped_attn else 8


@dataclass(frozen=True)
class GateLoopState(State):
    """The recurrent state of every gated-loop layer: (L, B, H, Dk, Dv) complex.

    Zero is the empty memory, so ``reset(rows)`` clears a row exactly. The full-attention
    variant carries nothing (L = 0).
    """

    recurrent: Tensor = memory_field("layer", "batch", "heads", "key", "value")


def _state_transition(z: Tensor, cfg: GateLoopConfig) -> tuple[Tensor, Tensor]:
    """(log|a|, angle(a)) of ``a = sigmoid(|z|) e^{i angle(z)}`` from ``z`` (..., 2) real.

    ``log sigmoid`` is computed as ``-softplus(-|z|)``, exact and finite for any ``|z|``.
    """
    frac = cfg.frac_gradient_state_transition
    z = z * frac + z.detach() * (1 - frac)
    if z.dtype not in (torch.float32, torch.float64):  # e.g. bf16 under autocast
        z = z.float()
    z = torch.view_as_complex(z.contiguous())
    if cfg.ablate_complex:
        z = z.real + 0.0j
    if cfg.ablate_state_transition:
        zeros = torch.zeros(z.shape, device=z.device)
        return zeros, zeros
    return -F.softplus(-z.abs()), z.angle()


class _ComplexGate(torch.autograd.Function):
    """``a = sigmoid(|z|) z / |z|`` (complex, ``a = 1/2`` at ``z = 0``) from ``z`` (..., 2) real
    pairs, with the gradient reaching ``z`` scaled by ``frac``; saves ``a`` (which the
    recurrence keeps anyway) and ``|z|``.

    This is :func:`_state_transition` followed by ``polar(exp(log|a|), angle(a))``, without the
    magnitude, angle, softplus and polar intermediates autograd would keep (each as large as
    the gates): with one-channel heads those were most of a block's activations.
    """

    @staticmethod
    def forward(ctx, z: Tensor, frac: float) -> Tensor:
        r = torch.hypot(*z.unbind(-1))
        nonzero = r > 0
        scale = torch.sigmoid(r).div_(torch.where(nonzero, r, 1.0))  # sigmoid(r) / r
        a = z * scale[..., None]
        a[..., 0].masked_fill_(~nonzero, 0.5)  # angle(0) = 0: a = sigmoid(0) = 1/2
        a = torch.view_as_complex(a)
        ctx.save_for_backward(a, r)
        ctx.frac = frac
        return a

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        a, r = ctx.saved_tensors
        # a = s(r) u with u = z / r: da/dz = s'(r) u u^T + (s / r) t t^T, t = (-u_i, u_r) the
        # tangent. In complex form, with p = grad conj(a) and s' = s (1 - s):
        # dL/dz = a ((1 - s) / s Re p + i Im p / (r s)), and 1 / s = 1 + e with e = exp(-r).
        # Nothing cancels, even for tiny |z| in float32; no gradient at z = 0 (angle(0) = 0).
        nonzero = r > 0
        e = torch.exp(-r)
        weights = torch.stack((e, (e + 1.0).div_(torch.where(nonzero, r, 1.0))), dim=-1)
        weights.mul_(nonzero.to(r.dtype).mul_(ctx.frac)[..., None])
        p = torch.view_as_real(grad * a.conj()).mul_(weights)
        return torch.view_as_real(a * torch.view_as_complex(p)), None


def complex_gate(z: Tensor, cfg: GateLoopConfig) -> Tensor:
    """The transitions ``a`` (complex) from ``z`` (..., 2) real: :class:`_ComplexGate` when
    neither ablation switch is on, else :func:`complex_gate_ref`."""
    if cfg.ablate_complex or cfg.ablate_state_transition:
        return complex_gate_ref(z, cfg)
    if z.dtype not in (torch.float32, torch.float64):  # e.g. bf16 under autocast
        z = z.float()
    return _ComplexGate.apply(z.contiguous(), cfg.frac_gradient_state_transition)


def complex_gate_ref(z: Tensor, cfg: GateLoopConfig) -> Tensor:
    """Reference for :func:`complex_gate`: :func:`_state_transition`, then ``polar``."""
    log_mag, phase = _state_transition(z, cfg)
    return torch.polar(log_mag.exp(), phase)


class GateLoopedAttention(nn.Module):
    """Token mixer: the GateLoop recurrence over per-head q, k, v with complex transitions."""

    def __init__(self, cfg: GateLoopConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, inner, heads = cfg.dim, cfg.resolved_dim_inner, cfg.resolved_heads
        self.heads = heads
        self.one_channel = heads == inner
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_a = nn.Linear(dim, heads * 2)
        self.sub_ln = nn.LayerNorm(inner) if cfg.sub_ln else nn.Identity()
        self.to_gates = nn.Linear(dim, inner, bias=False) if cfg.swish_gating else None
        self.to_out = (
            nn.Linear(inner, dim, bias=False) if inner != dim or cfg.swish_gating else nn.Identity()
        )

    def _split_heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, T, D)

    def _recur(self, fn: Callable[..., tuple[Tensor, Tensor]], *args: object) -> tuple[Tensor, Tensor]:
        """Run a recurrence form, recomputed in backward with ``gradient_checkpointing``."""
        if (self.cfg.gradient_checkpointing and not self.cfg.checkpoint_blocks
                and torch.is_grad_enabled()):  # inside a recomputed block it would save nothing
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, E) and state (B, H, Dk, Dv) -> (B, T, E) and the next state."""
        b, n, _ = x.shape
        z = self.to_a(x).view(b, n, self.heads, 2)
        if self.one_channel:  # scalar states: the (B, T, H) layout as it is, no head split
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
            out, state = self._recur(gate_loop_channels, q, k, v, complex_gate(z, self.cfg),
                                     state[..., 0, 0])
            return self._output(x, out), state[..., None, None]
        q, k, v = (self._split_heads(t) for t in self.to_qkv(x).chunk(3, dim=-1))
        gate: Tensor | tuple[Tensor, Tensor]
        if uses_recurrent_form(q.shape[-1], v.shape[-1]):
            # tiny states step the recurrence with complex gates directly
            gate = complex_gate(z, self.cfg).transpose(1, 2)  # (B, H, T)
        else:  # the chunked matmul form works in log space
            log_mag, phase = _state_transition(z, self.cfg)
            gate = (log_mag.transpose(1, 2), phase.transpose(1, 2))  # (B, H, T) each
        if n <= 2 and not torch.is_grad_enabled():
            out, state = gate_loop_step(q, k, v, gate, state)
        else:
            out, state = self._recur(gate_loop_chunked, q, k, v, gate, state, self.cfg.chunk_size)
        return self._output(x, out.transpose(1, 2).reshape(b, n, -1)), state

    def _output(self, x: Tensor, out: Tensor) -> Tensor:
        """The recurrence's (B, T, dim_inner) output, normed, gated and projected."""
        out = self.sub_ln(out)
        if self.to_gates is not None:
            out = F.silu(self.to_gates(x)) * out
        return self.to_out(out)


def cumulative_decay(log_mag: Tensor, phase: Tensor) -> Tensor:
    """``Re(prod_{s <= t} a_s)`` over time (dim 2 of (B, H, T, F)), clamped to >= 1e-10 as the
    reference does so that keys can be divided by it."""
    cumulative = torch.polar(log_mag.cumsum(dim=2).exp(), phase.cumsum(dim=2))
    return cumulative.real.clamp(min=1e-10)


class CausalFullAttention(nn.Module):
    """The reference's softmax (or unnormalised) causal attention alternative, within a segment."""

    def __init__(self, cfg: GateLoopConfig) -> None:
        super().__init__()
        self.cfg = cfg
        heads, dim_head = cfg.resolved_heads, cfg.dim_head
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.scale = dim_head**-0.5
        self.softmax = (
            not cfg.data_dependent_rel_pos if cfg.softmax_normalize is None else cfg.softmax_normalize
        )
        self.to_qkv = nn.Linear(cfg.dim, inner * 3, bias=False)
        self.to_a = nn.Linear(cfg.dim, inner, bias=False) if cfg.data_dependent_rel_pos else None
        self.to_gates = nn.Linear(cfg.dim, inner, bias=False) if cfg.swish_gating else None
        self.to_out = nn.Linear(inner, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        # (qkv h d) channel order, as the reference lays out its projection
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        if self.cfg.rotary_emb:
            positions = torch.arange(n, device=x.device)
            q, k = rotary(q, positions), rotary(k, positions)
        q = q * self.scale
        if self.to_a is not None and not self.cfg.ablate_state_transition:
            z = self.to_a(x).view(b, n, self.heads, self.dim_head // 2, 2).transpose(1, 2)
            log_mag, phase = _state_transition(z, self.cfg)
            decay = cumulative_decay(log_mag, phase)[..., None]  # (B, H, T, D/2, 1)
            q = (q.unflatten(-1, (-1, 2)) * decay).flatten(-2)
            k = (k.unflatten(-1, (-1, 2)) / decay).flatten(-2)
        scores = q @ k.transpose(-1, -2)  # (B, H, T, T)
        future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        if self.softmax:
            weights = scores.masked_fill(future, -torch.finfo(scores.dtype).max).softmax(dim=-1)
        else:
            weights = scores.masked_fill(future, 0.0)
        out = weights @ v  # (B, H, T, D)
        if self.to_gates is not None:
            out = out * F.silu(self.to_gates(x)).view(b, n, self.heads, -1).transpose(1, 2)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GateLoopBlock(nn.Module):
    """Token mixer then feed-forward, each pre-RMSNorm residual or post-LayerNorm."""

    def __init__(self, cfg: GateLoopConfig) -> None:
        super().__init__()
        self.post_norm = cfg.post_norm
        norm = (lambda: nn.LayerNorm(cfg.dim)) if cfg.post_norm else (lambda: RMSNorm(cfg.dim))
        self.mixer_norm, self.ff_norm = norm(), norm()
        self.mixer: nn.Module = (
            GateLoopedAttention(cfg) if cfg.use_gate_looped_attn else CausalFullAttention(cfg)
        )
        self.ff = FeedForward(cfg.dim, cfg.ff_mult)

    def _mix(self, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if isinstance(self.mixer, GateLoopedAttention):
            return self.mixer(x, state)
        return self.mixer(x), None

    def forward(self, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.post_norm:
            mixed, state = self._mix(x, state)
            x = self.mixer_norm(mixed + x)
            return self.ff_norm(self.ff(x) + x), state
        mixed, state = self._mix(self.mixer_norm(x), state)
        x = x + mixed
        return x + self.ff(self.ff_norm(x)), state


@register("gateloop")
class GateLoop(MemoryLM):
    """GateLoop language model under the memtx contract (see module docstring)."""

    config_class = GateLoopConfig
    state_class = GateLoopState

    def __init__(self, config: GateLoopConfig) -> None:
        super().__init__(config)
        cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(GateLoopBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.Identity() if cfg.post_norm else RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def _state_shape(self) -> tuple[int, int, int, int]:
        cfg = self.config
        if not cfg.use_gate_looped_attn:
            return 0, 0, 0, 0
        heads = cfg.resolved_heads
        head_dim = cfg.resolved_dim_inner // heads
        return cfg.depth, heads, head_dim, head_dim

    def init_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> GateLoopState:
        layers, heads, dk, dv = self._state_shape()
        complex_dtype = torch.complex128 if (dtype or self.dtype) == torch.float64 else torch.complex64
        return GateLoopState(
            recurrent=torch.zeros(layers, batch_size, heads, dk, dv, dtype=complex_dtype,
                                  device=self.device if device is None else device)
        )

    def forward_segment(self, input_ids: Tensor, state: GateLoopState) -> tuple[Tensor, GateLoopState, Tensor]:
        x = self.embed(input_ids)
        next_states = []
        for i, block in enumerate(self.blocks):
            layer_state = state.recurrent[i] if self.config.use_gate_looped_attn else None
            if self.config.checkpoint_blocks and torch.is_grad_enabled():
                x, layer_state = checkpoint(block, x, layer_state, use_reentrant=False)
            else:
                x, layer_state = block(x, layer_state)
            if layer_state is not None:
                next_states.append(layer_state.to(state.recurrent.dtype))
        logits = self.head(self.norm(x))
        recurrent = torch.stack(next_states) if next_states else state.recurrent
        aux_loss = torch.zeros((), device=x.device)
        return logits, GateLoopState(recurrent=recurrent), aux_loss

    def stream(self, state: GateLoopState | None = None, batch_size: int = 1) -> Stream:
        if self.config.use_gate_looped_attn:
            return GateLoopStream(self, state, batch_size)
        return RecomputeStream(self, state, batch_size)


class GateLoopStream(Stream):
    """Streaming for the recurrent variant: every token updates the state at once (the
    recurrence does not care where segments end), at a constant cost per token."""

    def _advance(self, input_ids: Tensor) -> Tensor:
        out = self.model(input_ids, self.state)
        self.state = out.state
        return out.logits

    def _commit(self) -> None:
        pass  # the state is already up to date


# -- the reference package -----------------------------------------------------------------------

def config_from_reference(ref: nn.Module) -> GateLoopConfig:
    """The memtx config of a ``gateloop_transformer.Transformer``."""
    first_mixer = ref.layers[0][0].fn
    use_gate_loop = type(first_mixer).__name__ == "GateLoopedAttention"
    post_norm = type(ref.layers[0][0]).__name__ == "PostNorm"
    dim = ref.token_emb.embedding_dim
    common = dict(
        vocab_size=ref.token_emb.num_embeddings,
        dim=dim,
        depth=len(ref.layers),
        seq_len=4096,
        ff_mult=ref.layers[0][1].fn[0].out_features // dim,
        post_norm=post_norm,
        ablate_complex=bool(ref.ablate_complex),
        ablate_state_transition=bool(ref.ablate_state_transition),
        swish_gating=first_mixer.to_gates is not None,
    )
    if use_gate_loop:
        inner = first_mixer.to_qkv.out_features // 3
        return GateLoopConfig(
            **common,
            use_gate_looped_attn=True,
            heads=first_mixer.to_a[0].out_features // 2,
            dim_inner=inner,
            sub_ln=isinstance(first_mixer.maybe_sub_ln, nn.LayerNorm),
            frac_gradient_state_transition=float(first_mixer.frac_gradient_state_transition),
        )
    heads = first_mixer.to_qkv[1].axes_lengths["h"]
    return GateLoopConfig(
        **common,
        use_gate_looped_attn=False,
        heads=heads,
        dim_head=first_mixer.to_qkv[0].out_features // (3 * heads),
        rotary_emb=first_mixer.rotary_emb is not None,
        data_dependent_rel_pos=bool(first_mixer.data_dependent_rel_pos),
        softmax_normalize=bool(first_mixer.softmax_normalize),
        frac_gradient_state_transition=float(first_mixer.frac_gradient_data_dependent_rel_pos),
    )


def state_dict_from_reference(ref_state: dict[str, Tensor], cfg: GateLoopConfig) -> dict[str, Tensor]:
    """Rename a ``gateloop_transformer.Transformer`` state dict to memtx's names."""
    renames = {
        "token_emb.weight": "embed.weight",
        "to_logits.0.gamma": "norm.weight",
        "to_logits.weight": "head.weight",  # post-norm: to_logits is the Linear alone
        "to_logits.1.weight": "head.weight",
    }
    out = {}
    for key, value in ref_state.items():
        if ".rotary_emb." in key:
            continue  # fixed rotary frequencies: memtx computes the same ones on the fly
        if key in renames:
            out[renames[key]] = value
            continue
        parts = key.split(".")
        if parts[0] != "layers":
            raise ConfigError(f"unexpected reference parameter {key!r}")
        layer, which, rest = parts[1], parts[2], parts[3:]
        prefix = f"blocks.{layer}."
        if rest[0] == "norm":
            name = "mixer_norm" if which == "0" else "ff_norm"
            leaf = "weight" if rest[-1] == "gamma" else rest[-1]
            out[prefix + f"{name}.{leaf}"] = value
            continue
        rest = rest[1:]  # drop "fn"
        if which == "1":  # feed-forward: Sequential(Linear, GELU, Linear)
            out[prefix + f"ff.{ {'0': 'w1', '2': 'w2'}[rest[0]] }.{rest[1]}"] = value
            continue
        module = rest[0]
        if module in ("to_qkv", "to_a", "to_gates", "to_out") and len(rest) == 3:
            rest = [module, rest[2]]  # Sequential wrappers: the Linear is element 0 or 1
        elif module == "maybe_sub_ln":
            rest = ["sub_ln", rest[1]]
        out[prefix + "mixer." + ".".join(rest)] = value
    return out


@register_converter("gateloop_transformer.gateloop_transformer.Transformer")
def from_gateloop_transformer(ref: nn.Module) -> GateLoop:
    """A memtx :class:`GateLoop` with the weights of a ``gateloop_transformer.Transformer``."""
    cfg = config_from_reference(ref)
    model = GateLoop(cfg)
    model.load_state_dict(state_dict_from_reference(ref.state_dict(), cfg), strict=True)
    return model.to(next(ref.parameters()).device)
