"""The programs' contract: what a runtime reads of the two static programs, whoever built them (the passes, or an
export directory's manifest).

``full(*inputs, tap_prev) -> (*outputs, *deltas, tap, metrics)`` and ``skip(*inputs, *cached) -> outputs``, with
:class:`Programs` holding their roles and shapes, :class:`FullResult` one decoded full call, :class:`MetricValues` the
host's reading of the metrics vector (:func:`pack_metrics` writes it inside the full program) and
:class:`SingleProgram` the two calls served by one conditional program.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .forecast import weights_dtype

__all__ = [
    "Programs",
    "FullResult",
    "MetricValues",
    "pack_metrics",
    "metrics_length",
    "FORECAST_WEIGHTS",
    "COMPUTE",
    "SingleProgram",
]


@dataclass(frozen=True)
class MetricValues:
    """The host's reading of the full program's ``metrics`` vector (one device-to-host copy per computed step).

    The vector is ``[finite (1/0), ||r_prev - r||_p, ||r_prev||_p, ||r||_p, (motion num, den) per MoReg stride]``
    (``r`` the tap, ``r_prev`` the program's ``tap_prev`` input); it is built by :func:`pack_metrics` inside the full
    program and read back by :meth:`from_vector`, the two ends of one layout."""

    finite: bool
    diff_norm: float
    prev_norm: float
    tap_norm: float
    motion: tuple[tuple[float, float], ...]  # (numerator, denominator) per MoReg stride, in stride order

    @classmethod
    def from_vector(cls, metrics: torch.Tensor | list[float]) -> MetricValues:
        values = metrics.tolist() if isinstance(metrics, torch.Tensor) else list(metrics)
        return cls(values[0] == 1.0, values[1], values[2], values[3], tuple(zip(values[4::2], values[5::2])))


def pack_metrics(
    finite: torch.Tensor,
    diff_norm: torch.Tensor,
    prev_norm: torch.Tensor,
    tap_norm: torch.Tensor,
    motion: list[tuple[torch.Tensor, ...]],
) -> torch.Tensor:
    """The inverse of :meth:`MetricValues.from_vector`, traced into the full program."""
    return torch.stack([finite.float(), diff_norm, prev_norm, tap_norm, *(part for pair in motion for part in pair)])


def metrics_length(num_moreg_strides: int) -> int:
    """The length of the ``metrics`` vector :func:`pack_metrics` builds for that many MoReg strides."""
    return 4 + 2 * num_moreg_strides


@dataclass(frozen=True)
class FullResult:
    """One call of the full program, decoded: ``full(*inputs, tap_prev) -> (*outputs, *deltas, tap, metrics)``."""

    outputs: tuple[torch.Tensor, ...]
    deltas: tuple[torch.Tensor, ...]
    tap: torch.Tensor
    metrics: torch.Tensor


@dataclass
class Programs:
    """The two static programs. ``full(*inputs, tap_prev) -> (*outputs, *deltas, tap, metrics)`` (decode it with
    :meth:`decode_full`); ``skip(*inputs, *cached) -> outputs`` with ``cached`` from :meth:`skip_cached_inputs`: one
    delta per stream (``forecast_order`` 0), or per stream the deltas of the last ``forecast_order + 1`` computed
    steps followed by one ``forecast_weights`` vector (the skip program adds ``sum_j w_j * D_j``).

    ``cond`` (built by the ``insert_cond`` pass when asked for, else None) is the one conditional program
    ``cond(*inputs, compute, *cached, tap_prev) -> (*outputs, *deltas, tap, metrics)``: ``torch.cond`` of the two
    (:class:`SingleProgram` serves the two programs' calls with it). ``delta_shapes[i](*inputs)`` is the shape of
    delta ``i`` for a call, ``delta_dtypes[i]`` its dtype: what :meth:`zero_cached` needs for a step with nothing
    cached."""

    full: fx.GraphModule
    skip: fx.GraphModule
    tap_shape: fx.GraphModule
    tap_dtype: torch.dtype
    moreg_strides: tuple[int, ...]  # strides whose motion norms the full program emits (empty: none)
    num_outputs: int
    delta_names: list[str]
    forecast_order: int = 0
    context_parallel: Any = None  # the model's ContextParallel (adacache_compile.parallel), or None
    norm_ord: int = 1
    delta_shapes: list[Any] = field(default_factory=list)
    delta_dtypes: list[torch.dtype] = field(default_factory=list)
    cond: Any = None

    def decode_full(self, results) -> FullResult:
        """Split the full program's flat output tuple into outputs, deltas, tap and metrics."""
        results = tuple(results)
        n_out, n_deltas = self.num_outputs, len(self.delta_names)
        if len(results) != n_out + n_deltas + 2:
            raise ValueError(
                f"full program returned {len(results)} values; expected {n_out} outputs + {n_deltas} deltas + tap + "
                "metrics"
            )
        return FullResult(results[:n_out], results[n_out : n_out + n_deltas], results[-2], results[-1])

    def zero_tap(self, inputs) -> torch.Tensor:
        """A zero ``tap_prev`` of the tap's shape for this call (the first computed step has no previous tap)."""
        return torch.zeros(self.tap_shape(*inputs), dtype=self.tap_dtype, device=inputs[0].device)

    @property
    def skip_cached_names(self) -> list[str]:
        """Names of the skip program's inputs after the model's: per stream its delta slots, then the weights."""
        if self.forecast_order == 0:
            return list(self.delta_names)
        slots = [f"{name}_prev{j}" if j else name for name in self.delta_names for j in range(self.forecast_order + 1)]
        return [*slots, FORECAST_WEIGHTS]

    def skip_cached_inputs(self, history, weights=None) -> list[torch.Tensor]:
        """The skip program's inputs after the model's. ``history``: the computed steps' delta tuples, newest first
        (at least one); ``weights``: ``forecast_order + 1`` floats (slots past ``len(history)`` must weigh 0: they are
        filled with the newest deltas so the program's inputs keep their shapes)."""
        if self.forecast_order == 0:
            return list(history[0])
        slots = self.forecast_order + 1
        if weights is None or len(weights) != slots:
            raise ValueError(f"skip program of forecast order {self.forecast_order}: expected {slots} weights")
        rows = [history[j] if j < len(history) else history[0] for j in range(slots)]
        cached = [rows[j][s] for s in range(len(self.delta_names)) for j in range(slots)]
        newest = history[0][0]
        return [*cached, torch.tensor(list(weights), dtype=weights_dtype(newest.dtype), device=newest.device)]

    def zero_cached(self, inputs) -> list[torch.Tensor]:
        """Zero cached inputs of the right shapes for this call: what the conditional program reads (and ignores) on
        a computed step with nothing cached yet."""
        device = inputs[0].device
        zeros = tuple(
            torch.zeros(shape(*inputs), dtype=dtype, device=device)
            for shape, dtype in zip(self.delta_shapes, self.delta_dtypes)
        )
        weights = [0.0] * (self.forecast_order + 1) if self.forecast_order else None
        return self.skip_cached_inputs([zeros], weights)


FORECAST_WEIGHTS = "forecast_weights"
COMPUTE = "compute"


class SingleProgram:
    """The full and the skip program's calls, served by the one conditional program ``programs.cond`` (run by
    ``run_cond``: the fx GraphModule, its inductor compilation or an exported ``cached.onnx``).

    :func:`~adacache_compile.step.run_step` calls :meth:`full` and :meth:`skip` as it calls the two programs, so
    the schedule and sessions are the same; the step's choice goes in as the host-made bool tensor ``compute``. The
    inputs the chosen branch does not read get stand-ins of the right shapes: zero cached deltas on a computed step,
    a zero ``tap_prev`` on a skipped one (allocated once per input signature)."""

    def __init__(self, programs: Programs, run_cond):
        self.programs = programs
        self.run_cond = run_cond
        self._stand_ins: tuple[tuple, tuple[list[torch.Tensor], torch.Tensor]] | None = None
        self._flags = {flag: torch.tensor(flag) for flag in (True, False)}

    def _unused_inputs(self, inputs) -> tuple[list[torch.Tensor], torch.Tensor]:
        key = tuple((tuple(t.shape), t.device) for t in inputs)
        if self._stand_ins is None or self._stand_ins[0] != key:
            self._stand_ins = (key, (self.programs.zero_cached(inputs), self.programs.zero_tap(inputs)))
        return self._stand_ins[1]

    def full(self, *args: torch.Tensor):
        """``full(*inputs, tap_prev) -> (*outputs, *deltas, tap, metrics)``."""
        inputs, tap_prev = args[:-1], args[-1]
        cached, _ = self._unused_inputs(inputs)
        return self.run_cond(*inputs, self._flags[True], *cached, tap_prev)

    def skip(self, *args: torch.Tensor):
        """``skip(*inputs, *cached) -> outputs``."""
        split = len(args) - len(self.programs.skip_cached_names)
        inputs, cached = args[:split], args[split:]
        _, tap_prev = self._unused_inputs(inputs)
        return tuple(self.run_cond(*inputs, self._flags[False], *cached, tap_prev))[: self.programs.num_outputs]
