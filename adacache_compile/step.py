"""One denoising step: the skip program with the cached deltas, or the full program, whose metrics the schedule reads
(the one host read of a computed step).

The step sees programs through a narrow contract (:class:`StepPrograms`): run full, run skip, the programs' roles and
shapes (:class:`~adacache_compile.programs.Programs`), the share of the blocks the cached region holds, and a serial
number naming the capture. A torch capture (:class:`~adacache_compile.capture_cache.CompiledEntry`) and an exported
one (:class:`~adacache_compile.export.runtime.ExportedEntry`) both provide it.
"""

from __future__ import annotations

import itertools
import logging
from typing import Protocol

import torch

from .errors import AdaCacheError
from .forecast import extrapolation_weights, forecast
from .parallel import reduce_metrics
from .programs import MetricValues, Programs
from .schedule import StepMetrics
from .sessions import Session, StepSample

__all__ = ["StepPrograms", "run_step", "read_metrics", "next_serial", "LATENT_NAMES"]

# Names under which diffusers transformers take the latent (InputPolicy reads its change).
LATENT_NAMES = ("hidden_states", "sample", "latents", "x")

logger = logging.getLogger(__name__)

_serials = itertools.count(1)


def next_serial() -> int:
    """A number no other capture of this process has: what a session's cache is keyed by (``id()`` of a freed
    capture can come back for a new one)."""
    return next(_serials)


class StepPrograms(Protocol):
    """What a step needs of a capture."""

    programs: Programs
    serial: int
    region_fraction: float  # share of the model's blocks that the cached region holds (stats)
    input_names: list[str]  # the model inputs, in the programs' order

    def run_full(self, *args: torch.Tensor): ...

    def run_skip(self, *args: torch.Tensor): ...


def read_metrics(
    metrics: torch.Tensor, programs: Programs, sums: torch.Tensor | None = None
) -> tuple[MetricValues, list[float]]:
    """The host's reading of a full program's metrics vector, and of ``sums`` (additive values computed beside the
    program: the delta forecast error's L1 norms), in one device-to-host copy; on a context-parallel model the global
    values, summed over the CP group first (one all-reduce, :func:`~adacache_compile.parallel.reduce_metrics`), so
    every rank reads the same."""
    values = reduce_metrics(metrics, programs.context_parallel, programs.norm_ord, sums).tolist()
    return MetricValues.from_vector(values[: metrics.numel()]), values[metrics.numel() :]


def latent_index(input_names: list[str], name: str | None) -> int:
    """Which model input holds the latent: ``name`` (an :class:`~adacache_compile.config.InputPolicy`'s ``input``),
    else the first of :data:`LATENT_NAMES` the model has, else its first input."""
    if name is not None:
        if name not in input_names:
            raise AdaCacheError(
                f"InputPolicy.input={name!r}: the captured call has no input of that name; its inputs are {input_names}"
            )
        return input_names.index(name)
    return next((input_names.index(n) for n in LATENT_NAMES if n in input_names), 0)


def input_change(session: Session, latent: torch.Tensor) -> float | None:
    """``||x - x_prev||_1 / ||x_prev||_1`` of the latent input against the session's previous step's (None on the
    first step or after a shape change); keeps ``latent`` for the next step. A host read on every step."""
    previous, session.previous_input = session.previous_input, latent.detach().clone()
    if previous is None or previous.shape != latent.shape:
        return None
    work = torch.float64 if latent.dtype == torch.float64 else torch.float32
    sums = torch.stack([(latent.to(work) - previous.to(work)).abs().sum(), previous.to(work).abs().sum()]).tolist()
    return sums[0] / sums[1] if sums[1] > 0 else float("inf")


def sample_deltas(deltas, samples: int) -> torch.Tensor:
    """A fixed strided sample of at most ``samples`` elements of each delta, concatenated, float32 on the CPU: the
    same elements on every step of a generation (the strides depend only on the shapes), so forecasts and their
    errors can be computed on the samples as on the deltas."""
    parts = []
    for delta in deltas:
        flat = delta.detach().reshape(-1)
        stride = max(1, flat.numel() // samples)
        parts.append(flat[::stride][:samples].float())
    return torch.cat(parts).cpu()


def delta_error_sums(deltas, history, step: int, order: int) -> tuple[torch.Tensor, int]:
    """``([sum ||D - D_hat||_1, sum ||D||_1] over the streams, the forecast's order)``: how far this step's fused
    deltas are from their forecast at ``order`` from the earlier computed steps ``history`` ((step, deltas), newest
    first) — the error a skip to this step would have made (:class:`~adacache_compile.config.GapPolicy`)."""
    nodes = history[: order + 1]
    weights = extrapolation_weights([s for s, _ in nodes], step, len(nodes))
    error = norm = None
    for stream, delta in enumerate(deltas):
        predicted = forecast([node[stream] for _, node in nodes], weights)
        work = torch.float64 if delta.dtype == torch.float64 else torch.float32
        e = (delta.to(work) - predicted.to(work)).abs().sum()
        n = delta.to(work).abs().sum()
        error, norm = (e, n) if error is None else (error + e, norm + n)
    return torch.stack([error, norm]), len(nodes) - 1


def run_step(session: Session, entry: StepPrograms, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One denoising step of ``session`` on ``entry``: the flat outputs of the skip or the full program."""
    session.step += 1
    step = session.step
    key = (entry.serial, *((tuple(t.shape), t.dtype, t.device) for t in inputs))
    sched = session.schedule
    programs = entry.programs
    order = programs.forecast_order
    session.region_fraction = entry.region_fraction
    if session.deltas is not None and session.input_key != key:
        session.events.append(f"step {step}: input signature changed mid-generation; computing in full")
        logger.warning("session %r step %d: input signature changed; recomputing", session.name, step)
        session.clear_cache()
    change = None
    if sched.needs_input or session.recording is not None:
        policy = getattr(sched, "policy", None)
        change = input_change(session, inputs[latent_index(entry.input_names, getattr(policy, "input", None))])
        sched.see_input(step, change)
    if session.deltas is not None and not session.force_next and not sched.is_computed(step):
        sched.mark_skipped(step)
        history = session.delta_history
        weights = extrapolation_weights([s for s, _ in history], step, order + 1) if order else None
        cached = programs.skip_cached_inputs([deltas for _, deltas in history], weights)
        return tuple(entry.run_skip(*inputs, *cached))
    forecast_metric = sched.config.decision_metric == "forecast"
    had_tap = session.tap_value is not None
    if not had_tap:
        tap_prev = programs.zero_tap(inputs)
    elif forecast_metric:
        taps = session.tap_history
        tap_prev = forecast([t for _, t in taps], extrapolation_weights([s for s, _ in taps], step, len(taps)))
    else:
        tap_prev = session.tap_value
    result = programs.decode_full(entry.run_full(*inputs, tap_prev))
    sums = error_order = None
    if sched.needs_delta_error and session.delta_history:
        sums, error_order = delta_error_sums(result.deltas, session.delta_history, step, order)
    values, extra = read_metrics(result.metrics, programs, sums)  # the one host read of a computed step
    delta_error = None if sums is None else (extra[0] / extra[1] if extra[1] > 0 else float("inf"))
    session.force_next = False
    # The forecast metric is relative to the tap it forecast (||r - r_hat|| / ||r||), the reference's to r_prev.
    denominator = values.tap_norm if forecast_metric else values.prev_norm
    if not values.finite:
        nan = float("nan")
        record = sched.observe(step, StepMetrics(nan, nan, values.motion) if had_tap else None)
        _nonfinite(session, step, "a delta or the tap holds NaN/Inf", warn=not record.nonfinite)
        return result.outputs
    metrics = (
        StepMetrics(values.diff_norm, denominator, values.motion, delta_error, error_order or 0) if had_tap else None
    )
    if sched.observe(step, metrics).nonfinite:
        _nonfinite(session, step, "the metric is NaN/Inf", warn=False)
        return result.outputs
    if session.recording is not None:
        session.recording.append(StepSample(step, change, sample_deltas(result.deltas, session.recording_samples)))
    if step >= session.num_steps:
        session.clear_cache()  # the generation is over; free its buffers
        return result.outputs
    session.delta_history = [(step, result.deltas), *session.delta_history][: order + 1]
    session.tap_history = [(step, result.tap), *session.tap_history][: order + 1 if forecast_metric else 1]
    session.input_key = key
    return result.outputs


def _nonfinite(session: Session, step: int, why: str, *, warn: bool) -> None:
    """Drop the cache and force the next step; ``warn=False`` where the schedule has already warned."""
    if warn and not session.nonfinite_steps:
        logger.warning("session %r step %d: %s; this and the next step are computed in full", session.name, step, why)
    session.nonfinite_steps.append(step)
    session.events.append(f"step {step}: {why}; cache dropped")
    session.clear_cache()
    session.force_next = True
