"""Data for memtx: byte corpora (files, folders, enwik8), Transformer-XL stream batching, and
synthetic long-range tasks (associative recall, delayed copy) that need memory across segments.

This subpackage depends only on torch, numpy and the standard library.
"""

from __future__ import annotations

from memtx.data.corpus import (
    BYTE_VOCAB_SIZE,
    SPLIT_NAMES,
    ByteCorpus,
    ByteSplit,
    CorpusNotFoundError,
    EmptyCorpusError,
    FileSpan,
    InvalidSplitError,
    load_corpus,
)
from memtx.data.enwik8 import (
    ENWIK8_SHA1,
    ENWIK8_SIZE,
    ENWIK8_SPLIT_SIZES,
    ENWIK8_URL,
    CorruptDatasetError,
    DatasetUnavailableError,
    default_cache_dir,
    enwik8_path,
    load_enwik8,
)
from memtx.data.streams import IGNORE_INDEX, StreamBatch, StreamBatcher, iter_segments
from memtx.data.tasks import (
    AssociativeRecall,
    DelayedCopy,
    SegmentTask,
    TaskBatch,
    TaskStream,
    accuracy_by_distance,
    evaluate_answers,
    merge_answer_counts,
)

__all__ = [
    "BYTE_VOCAB_SIZE",
    "ENWIK8_SHA1",
    "ENWIK8_SIZE",
    "ENWIK8_SPLIT_SIZES",
    "ENWIK8_URL",
    "IGNORE_INDEX",
    "SPLIT_NAMES",
    "AssociativeRecall",
    "ByteCorpus",
    "ByteSplit",
    "CorpusNotFoundError",
    "CorruptDatasetError",
    "DatasetUnavailableError",
    "DelayedCopy",
    "EmptyCorpusError",
    "FileSpan",
    "InvalidSplitError",
    "SegmentTask",
    "StreamBatch",
    "StreamBatcher",
    "TaskBatch",
    "TaskStream",
    "accuracy_by_distance",
    "default_cache_dir",
    "enwik8_path",
    "evaluate_answers",
    "iter_segments",
    "load_corpus",
    "load_enwik8",
    "merge_answer_counts",
]
