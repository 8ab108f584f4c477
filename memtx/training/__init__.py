"""Training, evaluation and checkpoints for memtx models, as flat functions.

.. code-block:: python

    from memtx.training import RunConfig, train
    result = train(RunConfig(data="task:recall", steps=500), "runs/recall")

or piece by piece (each usable on its own in your own loop)::

    optimizer = build_optimizer(model, lr=1e-3)
    metrics, state = train_step(model, optimizer, [Segment(inputs, targets)], state, lr=...)
    result = evaluate(model, valid_tokens)                  # .bpc, memory carried
    save_checkpoint(run_dir, model=model, optimizer=optimizer, step=..., ...)

Shape legend: B rows (streams) per process, T segment length.
"""

from __future__ import annotations

from memtx.training.checkpoint import (
    RunDirectoryError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from memtx.training.distributed import DistInfo, all_reduce_sum, setup, teardown
from memtx.training.loop import (
    EvalResult,
    Segment,
    StepMetrics,
    TaskEval,
    TaskSource,
    TextSource,
    TrainResult,
    evaluate,
    evaluate_tasks,
    make_task,
    read_metrics,
    train,
    train_step,
)
from memtx.training.optim import Schedule, build_optimizer, lr_at, param_groups
from memtx.training.run import PRESETS, TASKS, RunConfig, load_toml, merge_config, to_toml

__all__ = [
    "DistInfo",
    "EvalResult",
    "PRESETS",
    "RunConfig",
    "RunDirectoryError",
    "Schedule",
    "Segment",
    "StepMetrics",
    "TASKS",
    "TaskEval",
    "TaskSource",
    "TextSource",
    "TrainResult",
    "all_reduce_sum",
    "build_optimizer",
    "evaluate",
    "evaluate_tasks",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_toml",
    "lr_at",
    "make_task",
    "merge_config",
    "param_groups",
    "read_metrics",
    "resolve_checkpoint",
    "save_checkpoint",
    "setup",
    "teardown",
    "to_toml",
    "train",
    "train_step",
]
