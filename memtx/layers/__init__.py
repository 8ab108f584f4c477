"""Modules built from :mod:`memtx.ops`: feed-forward, norms, memory attention."""

from memtx.layers.attention import RelativeMemoryAttention
from memtx.layers.blocks import RelativeMemoryBlock
from memtx.layers.feedforward import FeedForward
from memtx.layers.norms import RMSNorm

__all__ = ["FeedForward", "RMSNorm", "RelativeMemoryAttention", "RelativeMemoryBlock"]
