"""Any config run on recorded generations, without running the model: the steps it would compute and a proxy of the
error its skips would make.

A :class:`RecordedRun` is one session of a rate-1 recording (every step computed, so its output is the uncached
one): the AdaCache metric per step (from ``stats``), the relative change of the latent input per step and a fixed
sample of the fused deltas per step (:meth:`~adacache_compile.runtime.ProgramRuntime.recording`). On it,
:class:`RunPredictor` replays each policy's own schedule class — the AdaCache rule on the metrics (with the drift
model of :func:`~adacache_compile.calibration.codebooks.simulate`), the input policy on the input changes, the gap
policy on the forecast errors of the sampled deltas at the nodes it picks, a fixed grid as it is — and scores the
computed steps with one proxy for every kind and order: the L1 error, over the skipped steps, of the delta the skip
would add (its forecast at the config's order from the computed steps before it) against the recorded one, relative
to the run's mean delta. :class:`MetricPredictor` is the AdaCache rule on metrics alone (no samples), as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import AdaCacheConfig
from ..forecast import extrapolation_weights
from ..schedule import StepMetrics, make_schedule
from .codebooks import _run, metrics_from_stats

__all__ = ["RecordedRun", "recorded_runs", "RunPredictor", "MetricPredictor"]


@dataclass
class RecordedRun:
    """One recorded session: ``metrics`` (the AdaCache metric of steps 2..N), ``changes`` (the latent input's
    relative change at steps 1..N, None at step 1) and ``deltas`` ([N, k] samples of the fused deltas per step)."""

    metrics: list[float]
    changes: list[float | None]
    deltas: torch.Tensor

    @property
    def num_steps(self) -> int:
        return len(self.changes)

    def to_dict(self) -> dict:
        """The scalars (not the samples), for a report."""
        return {"metrics": self.metrics, "input_changes": self.changes}


def recorded_runs(history: Sequence[dict], recordings: Sequence[tuple[int, str, list]]) -> list[RecordedRun]:
    """Join the finished sessions of a rate-1 recording (``stats["history"]`` entries) with their step samples
    (``recording()``'s ``(generation, branch, samples)``), by generation number."""
    by_generation = {generation: samples for generation, _, samples in recordings}
    runs = []
    for entry in history:
        samples = by_generation.get(entry["generation"])
        if samples is None:
            raise ValueError(f"recorded_runs: generation {entry['generation']} ({entry['branch']}) has no samples")
        steps = [s.step for s in samples]
        if steps != list(range(1, len(steps) + 1)):
            raise ValueError(
                f"recorded_runs: generation {entry['generation']} computed steps {steps}; a recording computes every "
                "step (record with recorder_config)"
            )
        runs.append(
            RecordedRun(
                metrics_from_stats(entry),
                [s.input_change for s in samples],
                torch.stack([s.deltas for s in samples]),
            )
        )
    return runs


class _Predictor:
    """``fraction(config)``, ``predict(config) -> (fraction, proxy)`` and ``schedules(config)`` over runs; memoised
    per config."""

    def __init__(self, runs: Sequence, num_steps: int):
        if not runs:
            raise ValueError("a calibration needs at least one recorded run")
        self.runs = list(runs)
        self.num_steps = num_steps
        self._memo: dict = {}

    def _simulate(self, config: AdaCacheConfig, run) -> tuple[list[int], float]:
        raise NotImplementedError

    def _all(self, config: AdaCacheConfig) -> list[tuple[list[int], float]]:
        key = config.to_json()
        if key not in self._memo:
            self._memo[key] = [self._simulate(config, run) for run in self.runs]
        return self._memo[key]

    def schedules(self, config: AdaCacheConfig) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(steps) for steps, _ in self._all(config))

    def fraction(self, config: AdaCacheConfig) -> float:
        results = self._all(config)
        return sum(len(steps) for steps, _ in results) / (len(results) * self.num_steps)

    def predict(self, config: AdaCacheConfig) -> tuple[float, float]:
        results = self._all(config)
        return self.fraction(config), sum(proxy for _, proxy in results) / len(results)


class MetricPredictor(_Predictor):
    """The AdaCache rule on recorded metrics alone (runs: lists of the metric at steps 2..N); the proxy is the
    drift the skipped steps would have shown (:func:`~adacache_compile.calibration.codebooks.predict`)."""

    def _simulate(self, config, run):
        if config.policy is not None:
            raise ValueError(f"MetricPredictor simulates the AdaCache rule only, not policy {config.policy.kind!r}")
        return _run(config, run, self.num_steps)


class RunPredictor(_Predictor):
    """Every kind of config on :class:`RecordedRun`s (see the module docstring)."""

    def _simulate(self, config, run: RecordedRun):
        if run.num_steps != self.num_steps:
            raise ValueError(f"a recorded run of {run.num_steps} steps for a calibration of {self.num_steps}")
        if config.policy is None:
            steps, _ = _run(config, run.metrics, self.num_steps)
        else:
            steps = self._policy_steps(config, run)
        return steps, delta_proxy(run, steps, config.forecast_order)

    def _policy_steps(self, config: AdaCacheConfig, run: RecordedRun) -> list[int]:
        schedule = make_schedule(config, self.num_steps)
        order = config.forecast_order
        for step in range(1, self.num_steps + 1):
            schedule.see_input(step, run.changes[step - 1])
            if not schedule.is_computed(step):
                schedule.mark_skipped(step)
                continue
            nodes = schedule.computed_steps[::-1][: order + 1]  # newest first
            if not nodes:
                schedule.observe(step, None)
                continue
            error = forecast_error(run.deltas, nodes, step)
            schedule.observe(step, StepMetrics(1.0, 1.0, (), error, len(nodes) - 1))
        return list(schedule.computed_steps)


def _forecast(deltas: torch.Tensor, nodes: Sequence[int], step: int) -> torch.Tensor:
    weights = extrapolation_weights(list(nodes), step, len(nodes))
    total = deltas[nodes[0] - 1] * weights[0]
    for node, weight in zip(nodes[1:], weights[1:]):
        total = total + deltas[node - 1] * weight
    return total


def forecast_error(deltas: torch.Tensor, nodes: Sequence[int], step: int) -> float:
    """Relative L1 error of the forecast of step ``step``'s sampled delta from the steps ``nodes`` (newest first)."""
    actual = deltas[step - 1]
    norm = float(actual.abs().sum())
    error = float((actual - _forecast(deltas, nodes, step)).abs().sum())
    return error / norm if norm > 0 else math.inf


def delta_proxy(run: RecordedRun, steps: Sequence[int], order: int) -> float:
    """Sum over the skipped steps of ``||D_s - D_hat_s||_1``, ``D_hat_s`` the forecast at ``order`` from the
    computed steps before ``s``, relative to the run's mean ``||D||_1``."""
    deltas = run.deltas
    scale = float(deltas.abs().sum(dim=1).mean()) or 1.0
    computed = sorted(steps)
    total, index = 0.0, 0
    for step in range(1, run.num_steps + 1):
        while index < len(computed) and computed[index] < step:
            index += 1
        if index < len(computed) and computed[index] == step:
            continue
        nodes = computed[:index][::-1][: order + 1]
        if nodes:
            total += float((deltas[step - 1] - _forecast(deltas, nodes, step)).abs().sum())
    return total / scale
