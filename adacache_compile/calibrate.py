"""Codebook calibration from uncached runs.

The reference published codebooks only for 30 and 100 steps and calibrated them from baseline runs on a few prompts.
This module does the same from a user's own generations: record the stride-1 metric (relative L1 change of the tap
between consecutive steps) at every step with a rate-1 codebook (:data:`RECORD_CONFIG`), then place the codebook
thresholds at quantiles of that distribution (fast / slow templates shaped like the reference ones), or scale them
until a simulated schedule reaches a target fraction of computed steps. Recording the bundled testbed and the
``adacache-compile calibrate`` command live in :mod:`adacache_compile.testbed.calibrate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .config import AdaCacheConfig, MoRegConfig
from .schedule import Schedule, StepMetrics

__all__ = [
    "RECORD_CONFIG",
    "TEMPLATES",
    "codebook_from_metrics",
    "simulate",
    "calibrate_config",
    "metrics_from_stats",
    "motions_from_stats",
    "moreg_threshold",
]

# Rate 1 at every step: every step is computed and its metric recorded (the run equals the uncached model). MoReg
# over every step records the motion estimate too (it cannot change a rate-1 schedule).
RECORD_CONFIG = AdaCacheConfig(codebook=((1e12, 1),), moreg=MoRegConfig(window=(1, 1.0)))
_OPEN_END = 1e6  # the last pair's threshold: "anything larger"

# (quantile, rate) pairs shaped like the reference codebooks: fast steps down from rate 6, slow from rate 3.
TEMPLATES: dict[str, tuple[tuple[float, int], ...]] = {
    "fast": ((0.30, 6), (0.45, 5), (0.60, 4), (0.75, 3), (0.90, 2)),
    "slow": ((0.30, 3), (0.60, 2)),
}


def metrics_from_stats(history: dict) -> list[float]:
    """The per-step metrics of one recorded generation (``cached.stats['history'][i]``), first step excluded."""
    return [r["raw_metric"] for r in history["records"] if r["raw_metric"] is not None]


def motions_from_stats(history: dict) -> list[tuple[int, float]]:
    """``(step, motion)`` pairs of one recorded generation (MoReg's frame-difference ratio of the tap)."""
    return [(r["step"], r["motion"]) for r in history["records"] if r["motion"] is not None]


def moreg_threshold(motions: Sequence[Sequence[tuple[int, float]]], window: tuple[int, int]) -> float:
    """The median motion inside the MoReg window: the reference's 0.385 is where ``(m / threshold) ** 8 == 1``, i.e.
    the motion level at which MoReg neither adds nor removes compute; its value depends on the model's residual
    features, so it is calibrated like the codebook."""
    lo, hi = window
    values = [m for run in motions for step, m in run if lo <= step <= hi and math.isfinite(m)]
    if not values:
        raise ValueError(f"no recorded motion inside the MoReg window {window}")
    return _quantile(values, 0.5)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def codebook_from_metrics(metrics: Sequence[float], target: str = "fast", scale: float = 1.0):
    """Ascending ``(threshold, rate)`` pairs from recorded per-step metrics and a template name."""
    finite = [m for m in metrics if math.isfinite(m)]
    if len(finite) < 3:
        raise ValueError(f"calibration needs at least 3 recorded metrics, got {len(finite)}")
    if target not in TEMPLATES:
        raise ValueError(f"calibration target {target!r}: expected one of {sorted(TEMPLATES)}")
    pairs, last = [], 0.0
    for q, rate in TEMPLATES[target]:
        threshold = max(_quantile(finite, q) * scale, last * (1 + 1e-6) + 1e-12)
        pairs.append((threshold, rate))
        last = threshold
    pairs.append((max(_OPEN_END, last * 10), 1))
    return tuple(pairs)


def simulate(config: AdaCacheConfig, per_step_metrics: Sequence[float], num_steps: int) -> list[int]:
    """Computed steps the schedule would take if the metric over a stride were the mean per-step metric over it
    (times the stride, as a steady drift gives); MoReg is not simulated."""
    schedule = Schedule(config.replace(moreg=None), num_steps)
    series = list(per_step_metrics)
    for step in range(1, num_steps + 1):
        if not schedule.is_computed(step):
            schedule.mark_skipped(step)
            continue
        if schedule.last_computed == 0:
            schedule.observe(step, None)
            continue
        window = series[schedule.last_computed - 1 : step - 1] or [series[-1]]
        change = sum(window)
        schedule.observe(step, StepMetrics(diff_norm=change, prev_norm=1.0))
    return list(schedule.computed_steps)


def calibrate_config(
    runs: Sequence[Sequence[float]],
    num_steps: int,
    target: str | float = "fast",
    base: AdaCacheConfig | None = None,
    template: str = "fast",
) -> AdaCacheConfig:
    """A config whose codebook comes from recorded runs (each a list of per-step metrics, steps 2..N).

    ``target`` is a template name (``"fast"``, ``"slow"``) or a fraction of steps to compute (e.g. ``0.4``): the
    thresholds of ``template`` are then scaled (bisection on a log scale) until the simulated mean fraction is
    closest.
    """
    base = base or AdaCacheConfig(codebook=((1.0, 1),))
    pooled = [m for run in runs for m in run]
    if isinstance(target, str):
        return base.replace(codebook=codebook_from_metrics(pooled, target))
    if not 0 < target <= 1:
        raise ValueError(f"target compute fraction {target}: expected a number in (0, 1]")

    def fraction(scale: float) -> float:
        config = base.replace(codebook=codebook_from_metrics(pooled, template, scale))
        return sum(len(simulate(config, run, num_steps)) for run in runs) / (len(runs) * num_steps)

    lo, hi = 1e-3, 1e3  # larger scale -> larger thresholds -> higher rates -> fewer computed steps
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if fraction(mid) > target:
            lo = mid
        else:
            hi = mid
    return base.replace(codebook=codebook_from_metrics(pooled, template, hi))
