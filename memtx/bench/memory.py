"""Peak resident memory of a piece of work, measured in a fresh process.

Why a fresh process: a process's peak is that of everything it ever held, and ``ru_maxrss``
even carries over from a parent across fork and exec, so a benchmark that has already run a
big contender would report that contender's peak for every later one. A spawned child starts
small; inside it, :func:`peak_above_now` resets the kernel's high-water mark (``VmHWM``, via
``/proc/self/clear_refs``) and reports the peak of what runs in its block above the memory held
when the block started (model, optimizer, data). glibc keeps freed small blocks resident, so
the child serves blocks from 128 KiB up with mmap: freed tensors then leave the resident set,
and the peak follows live memory rather than the allocator's history.

Linux only for the reset; elsewhere the peak falls back to ``ru_maxrss`` of the fresh process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def _status_kib(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kib() -> float:
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def current_rss_kib() -> float:
    """Resident memory now (KiB)."""
    value = _status_kib("VmRSS")
    return value if value is not None else _maxrss_kib()


def reset_peak_rss() -> None:
    """Reset the peak-RSS counter to the current RSS (Linux), so the peak covers what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_kib() -> float:
    """Peak resident memory (KiB) since the process started or the last :func:`reset_peak_rss`."""
    value = _status_kib("VmHWM")
    return value if value is not None else _maxrss_kib()


@contextmanager
def peak_above_now() -> Iterator[dict[str, float]]:
    """``with peak_above_now() as peak: work()`` leaves in ``peak["mib"]`` the peak resident
    memory during the block above the resident memory when it began (MiB)."""
    result: dict[str, float] = {}
    before = current_rss_kib()
    reset_peak_rss()
    yield result
    result["mib"] = max(peak_rss_kib() - before, 0.0) / 1024.0


def _report(fn: Callable[..., Any], args: tuple[Any, ...], queue: "mp.Queue[Any]") -> None:
    queue.put(fn(*args))


def in_fresh_process(fn: Callable[..., Any], *args: Any, timeout: float = 3600.0) -> Any:
    """``fn(*args)`` in a spawned process (with small blocks returned to the OS on free);
    returns its result. ``fn`` must be importable (a module-level function)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_report, args=(fn, args, queue))
    # the child inherits the environment at start; this process's own is left as it was
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    try:
        proc.start()
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
    try:
        return queue.get(timeout=timeout)
    finally:
        proc.join()
