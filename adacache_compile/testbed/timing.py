"""The one timed loop of the demo, the calibration recording and the benchmarks: run a callable once per item, each
run timed on its own with ``time.perf_counter``."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TimedRuns", "timed_runs"]


@dataclass
class TimedRuns:
    """What :func:`timed_runs` measured: wall seconds, result and record of each timed run, in item order."""

    seconds: list[float] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)  # what ``after()`` returned after each run (empty without it)

    @property
    def total(self) -> float:
        return sum(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_runs(
    run: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    context: Callable[[], AbstractContextManager] | None = None,
    before: Callable[[], object] | None = None,
    after: Callable[[], Any] | None = None,
    warmup: int = 0,
    sync: bool = True,
) -> TimedRuns:
    """Call ``run(item)`` for every item and time each call.

    Per item: ``before()`` (untimed), then the clock starts, ``context()`` is entered (a fresh context manager per
    run, e.g. ``lambda: cached.generation(num_steps=n)``), ``run(item)`` runs, the context exits and the clock stops;
    then ``after()`` (untimed, e.g. reading the stats the context wrote) gives the run's record. ``warmup`` untimed
    runs of the first item, each the same way, go first. With ``sync`` CUDA is synchronised before the clock starts
    and before it stops (when CUDA is in use), so asynchronous kernels are counted in their own run. Python's garbage
    is collected once before the first run, so that what earlier work left (a capture's graphs, another method's
    tensors) is not collected inside a timed run.
    """
    items = list(items)
    timed = TimedRuns()
    gc.collect()

    def once(item, record: bool) -> None:
        if before is not None:
            before()
        if sync:
            _synchronize()
        start = time.perf_counter()
        with context() if context is not None else contextlib.nullcontext():
            result = run(item)
        if sync:
            _synchronize()
        seconds = time.perf_counter() - start
        if record:
            timed.seconds.append(seconds)
            timed.results.append(result)
            if after is not None:
                timed.records.append(after())

    for _ in range(warmup if items else 0):
        once(items[0], record=False)
    for item in items:
        once(item, record=True)
    return timed
