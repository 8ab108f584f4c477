"""Weight initialisation shared by the Transformer-XL family."""

from __future__ import annotations

from torch import nn


def init_gpt2_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) for linear and embedding weights, zero biases.
    Use with ``model.apply(init_gpt2_weights)``."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def scale_residual_projections(blocks: nn.ModuleList, depth: int) -> None:
    """GPT-2's N(0, 0.02 / sqrt(2 depth)) for the projections that write into the residual
    stream (``attn.to_out`` and ``ff.w2`` of every block), which keeps its variance flat."""
    for block in blocks:
        for proj in (block.attn.to_out, block.ff.w2):
            nn.init.normal_(proj.weight, std=0.02 / (2 * depth) ** 0.5)
