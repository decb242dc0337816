"""One request's view of the batched programs: what :func:`~adacache_compile.step.run_step` sees of a call that the
engine batches with other requests' calls.

The step runs unchanged, in the request's own thread, on a :class:`RowEntry` (the step's
:class:`~adacache_compile.step.StepPrograms` contract): its ``run_full`` and ``run_skip`` hand the call to the
engine, which runs it inside one program call with the other rows of that step and returns this call's rows. So
every request keeps its own session, policy, N, forecast order and cached deltas; only the program calls are shared.

Two things the programs compute for the whole batch are made per row instead, without changing the programs:

- the metrics (:class:`~adacache_compile.programs.MetricValues`): the full program's in-graph vector reduces over the
  whole batch, so the engine computes each call's from its own rows of the tap and deltas with the same function
  (``adacache_metrics``) on the host side of the program call;
- the forecast of the cached delta: each request's computed steps are spaced differently, so each needs its own
  extrapolation weights. :class:`RowPrograms` keeps the history and weights the step asks for
  (:class:`CachedForecast`) and the row combines them on the host (:func:`~adacache_compile.forecast.forecast`);
  the skip program gets the combined delta in its newest slot with weights (1, 0, ...), so requests of any forecast
  order share one set of programs of any order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..forecast import forecast
from ..programs import Programs

if TYPE_CHECKING:
    from .engine import BatchedTransformer

__all__ = ["CachedForecast", "RowPrograms", "RowEntry", "CallLayout"]


@dataclass(frozen=True)
class CachedForecast:
    """What a skip step of one request adds to its blocks' inputs: the cached deltas of its last computed steps
    (newest first, one tuple per step) and their extrapolation weights (None: the newest deltas as they are)."""

    history: tuple[tuple[torch.Tensor, ...], ...]
    weights: tuple[float, ...] | None

    def combine(self) -> tuple[torch.Tensor, ...]:
        """One delta per stream: ``sum_j w_j * D_j`` (the skip program's own combination, done on the host)."""
        newest = self.history[0]
        if self.weights is None or (len(self.history) == 1 and self.weights[0] == 1.0):
            return newest
        weights = self.weights[: len(self.history)]
        return tuple(forecast([deltas[s] for deltas in self.history], weights) for s in range(len(newest)))


class RowPrograms(Programs):
    """The engine's programs as one request's step reads them: with the request's own ``forecast_order`` (how many
    computed steps it keeps and extrapolates from), and skip inputs that stay on the host side as a
    :class:`CachedForecast` for the engine to combine."""

    @classmethod
    def of(cls, programs: Programs, forecast_order: int) -> RowPrograms:
        fields = {f.name: getattr(programs, f.name) for f in dataclasses.fields(programs)}
        return cls(**{**fields, "forecast_order": forecast_order})

    def skip_cached_inputs(self, history, weights=None) -> list[Any]:
        return [CachedForecast(tuple(tuple(d) for d in history), None if weights is None else tuple(weights))]


@dataclass(frozen=True)
class CallLayout:
    """How one call's flat inputs stack with other calls': ``rows`` (dim 0 of its latent), which inputs are per-row
    (their dim 0 is ``rows``: concatenated along dim 0) and which are shared by the rows (any other: they must be
    equal in every call of a batch), and the call's pytree leaves, from which the batched call is rebuilt."""

    rows: int
    per_row: tuple[bool, ...]
    leaves: tuple[Any, ...]
    signature: Any  # capture.CallSignature

    def kind(self, inputs) -> tuple:
        """What calls must share to run as one: call structure and constants, and per input whether it is per-row
        and its shape (past dim 0 where per-row), dtype and device."""
        return (
            self.signature,
            tuple(
                (row, tuple(t.shape[1:]) if row else tuple(t.shape), t.dtype, t.device)
                for row, t in zip(self.per_row, inputs)
            ),
        )


@dataclass
class RowEntry:
    """One call of one request, as the step's :class:`~adacache_compile.step.StepPrograms`: the capture that serves
    it (``entry``) seen through the request's :class:`RowPrograms`; its programs run in the engine's batches.

    ``serial`` (what a session's cache is keyed by) names the model state, not the capture: a torch runtime captures
    anew for a batch size its captures do not take (a batch-static capture of one row, then a batched call), and
    every capture of one model computes the same deltas, so a request's cache stays valid across them."""

    engine: BatchedTransformer
    entry: Any  # CompiledEntry or ExportedEntry
    programs: RowPrograms
    layout: CallLayout
    request: Any  # engine.Request
    serial: int

    @property
    def region_fraction(self) -> float:
        return self.entry.region_fraction

    @property
    def input_names(self) -> list[str]:
        return self.entry.input_names

    def run_full(self, *args: torch.Tensor):
        """``(*outputs, *deltas, tap, metrics)`` of this call's rows; ``metrics`` is this call's own."""
        return self.engine._submit(self, "full", args[:-1], (args[-1],))

    def run_skip(self, *args):
        """This call's outputs of the skip program, with its own forecast of the cached delta (combined in the
        engine's thread, with the program calls: on a CPU every thread that runs large tensor ops keeps its own
        OpenMP team, and teams of several threads contend for the cores)."""
        return self.engine._submit(self, "skip", args[:-1], (args[-1],))
