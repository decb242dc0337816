"""One batched step: the program calls that arrived together, grouped by kind, each group run as one full-program
call over the rows that compute and one skip-program call over the rows that skip, results scattered back.

Batch layout: dim 0 of every input, output, delta and tap is batch-major (call ``c`` of a batch of ``R`` rows owns
``size0 // R * rows_c`` consecutive entries: Latte's ``[B*F, S, C]`` taps included). A program call whose group
fails is retried call by call, so an error reaches only the request whose call raises it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..errors import AdaCacheError
from ..passes.split_programs import adacache_metrics
from .rows import RowEntry

__all__ = ["ProgramCall", "BatchCounters", "group_calls", "run_calls"]

logger = logging.getLogger(__name__)

FULL, SKIP = "full", "skip"


@dataclass(eq=False)
class ProgramCall:
    """One request's call of the full (``cached``: its ``tap_prev``) or the skip program (``cached``: its
    :class:`~.rows.CachedForecast`), waiting for its batch."""

    row: RowEntry
    kind: str
    inputs: tuple[torch.Tensor, ...]
    cached: tuple
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return self.row.layout.rows

    def finish(self, result: tuple | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


@dataclass
class BatchCounters:
    """How the engine's program calls were filled (``stats["batches"]``)."""

    program_calls: dict[str, int] = field(default_factory=lambda: {FULL: 0, SKIP: 0})
    rows: dict[str, int] = field(default_factory=lambda: {FULL: 0, SKIP: 0})
    calls: dict[str, int] = field(default_factory=lambda: {FULL: 0, SKIP: 0})
    steps: int = 0  # batched steps: the calls gathered together, whatever program each runs
    gathered: int = 0  # calls over those steps
    union_promoted: int = 0  # skip calls run in full by union decisions
    retried_alone: int = 0  # calls re-run alone after their batch failed
    largest: int = 0  # the most rows one program call took

    def count_step(self, calls: list[ProgramCall]) -> None:
        self.steps += 1
        self.gathered += len(calls)

    def count(self, kind: str, calls: list[ProgramCall]) -> None:
        self.program_calls[kind] += 1
        self.calls[kind] += len(calls)
        rows = sum(c.rows for c in calls)
        self.rows[kind] += rows
        self.largest = max(self.largest, rows)

    def as_dict(self) -> dict[str, Any]:
        mean = {k: (self.calls[k] / self.program_calls[k] if self.program_calls[k] else 0.0) for k in (FULL, SKIP)}
        return {
            "steps": self.steps,
            "mean_calls_per_step": self.gathered / self.steps if self.steps else 0.0,
            "program_calls": dict(self.program_calls),
            "calls": dict(self.calls),
            "rows": dict(self.rows),
            "largest_rows": self.largest,
            "mean_calls_per_program_call": mean,
            "union_promoted": self.union_promoted,
            "retried_alone": self.retried_alone,
        }


def group_calls(calls: list[ProgramCall], max_rows: int) -> list[list[ProgramCall]]:
    """The calls that can run as one program call, in arrival order: same kind (call structure, constants, per-row
    shapes, dtypes, devices), equal shared inputs, at most ``max_rows`` rows (a call larger than that runs alone)."""
    groups: list[list[ProgramCall]] = []
    open_groups: dict[tuple, list[list[ProgramCall]]] = {}
    for call in calls:
        kind = call.row.layout.kind(call.inputs)
        candidates = open_groups.setdefault(kind, [])
        target = next(
            (g for g in candidates if _same_shared(g[0], call) and sum(c.rows for c in g) + call.rows <= max_rows),
            None,
        )
        if target is None:
            target = [call]
            candidates.append(target)
            groups.append(target)
        else:
            target.append(call)
    return groups


def _same_shared(a: ProgramCall, b: ProgramCall) -> bool:
    return all(row or x is y or torch.equal(x, y) for row, x, y in zip(a.row.layout.per_row, a.inputs, b.inputs))


def run_calls(engine, calls: list[ProgramCall], counters: BatchCounters, union: bool) -> None:
    """Run one group of same-kind calls: the full program over those that compute, the skip program over the rest
    (with ``union``, the skip calls too run the full program whenever one call computes: one decision per batch, the
    comparator of ``benchmarks/batch_serving.py``). Every call is finished, with its rows or its error."""
    full = [c for c in calls if c.kind == FULL]
    skip = [c for c in calls if c.kind == SKIP]
    if union and full and skip:
        counters.union_promoted += len(skip)
        full, skip = full + skip, []
    for kind, members in ((FULL, full), (SKIP, skip)):
        if members:
            _run_or_retry_alone(engine, kind, members, counters)


def _run_or_retry_alone(engine, kind: str, calls: list[ProgramCall], counters: BatchCounters) -> None:
    try:
        results = _run_program(engine, kind, calls)
    except Exception as e:  # noqa: BLE001 - handed to the calls' requests
        if len(calls) == 1:
            calls[0].finish(error=e)
            return
        logger.warning("a batched %s call of %d requests failed (%s); running each alone", kind, len(calls), e)
        counters.retried_alone += len(calls)
        for call in calls:
            _run_or_retry_alone(engine, kind, [call], counters)
        return
    counters.count(kind, calls)
    for call, result in zip(calls, results):
        call.finish(result)


def _run_program(engine, kind: str, calls: list[ProgramCall]) -> list[tuple]:
    first = calls[0]
    total = sum(c.rows for c in calls)
    per_row = first.row.layout.per_row
    inputs = [_stack([c.inputs[i] for c in calls]) if row else first.inputs[i] for i, row in enumerate(per_row)]
    entry = engine._entry_for(first.row, inputs) if len(calls) > 1 else first.row.entry
    programs = entry.programs
    if kind == SKIP:
        combined = [c.cached[0].combine() for c in calls]
        deltas = tuple(_stack([d[s] for d in combined]) for s in range(len(combined[0])))
        weights = [1.0] + [0.0] * programs.forecast_order if programs.forecast_order else None
        outputs = entry.run_skip(*inputs, *programs.skip_cached_inputs([deltas], weights))
        return list(zip(*(_split(t, calls, total, f"skip output {i}") for i, t in enumerate(outputs))))
    tap_prev = [c.cached[0] if c.kind == FULL else c.row.programs.zero_tap(c.inputs) for c in calls]
    result = programs.decode_full(entry.run_full(*inputs, _stack(tap_prev)))
    keep = len(calls) > 1  # a call's cached rows are copied out of the batch's tensors, so the batch can be freed
    outputs = [_split(t, calls, total, f"output {i}") for i, t in enumerate(result.outputs)]
    deltas = [_split(t, calls, total, name, keep) for t, name in zip(result.deltas, programs.delta_names)]
    taps = _split(result.tap, calls, total, "tap", keep)
    rows = []
    for i, call in enumerate(calls):
        if call.kind == SKIP:  # promoted by a union decision: the step wanted outputs only
            rows.append(None)
            continue
        rows.append(adacache_metrics(taps[i], tap_prev[i], tuple(d[i] for d in deltas), programs.norm_ord, None, 0, ()))
    # One device-to-host copy for the batch's metrics; each request's step reads its own vector on the host.
    measured = [m for m in rows if m is not None]
    host = iter(torch.stack(measured).cpu().unbind(0)) if measured else iter(())
    results = []
    for i, call in enumerate(calls):
        row_outputs = tuple(o[i] for o in outputs)
        if call.kind == SKIP:
            results.append(row_outputs)
        else:
            results.append((*row_outputs, *(d[i] for d in deltas), taps[i], next(host)))
    return results


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _split(tensor: torch.Tensor, calls: list[ProgramCall], total: int, what: str, copy: bool = False) -> list:
    if len(calls) == 1:
        return [tensor]
    size = tensor.shape[0] if tensor.dim() else 0
    if size == 0 or size % total:
        raise AdaCacheError(
            f"batched program call: the {what} has dim 0 of {size}, not a multiple of the batch's {total} rows, so "
            "it cannot be split per request; the model's outputs are not batch-major: each call runs alone (serve it "
            "with max_rows=1 to skip the failing batched try)"
        )
    per = size // total
    parts = tensor.split([per * c.rows for c in calls])
    return [p.clone() for p in parts] if copy else list(parts)


def rebuild_call(layout, inputs: list[torch.Tensor]) -> tuple[tuple, dict]:
    """The call ``(args, kwargs)`` of ``layout``'s structure and constants with ``inputs`` as its tensors."""
    leaves = list(layout.leaves)
    for position, tensor in zip(layout.signature.tensor_leaves, inputs):
        leaves[position] = tensor
    args, kwargs = pytree.tree_unflatten(leaves, layout.signature.in_spec)
    return tuple(args), dict(kwargs)
