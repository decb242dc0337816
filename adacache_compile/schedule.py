"""The host-side AdaCache rule: which steps to compute, decided from a few scalars per computed step.

The compiled full program returns the norms (`StepMetrics`); this module turns them into the next caching rate.
Pure Python, no torch: the rule is cheap and must be identical on every rank.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from adacache_compile.config import AdaCacheConfig

__all__ = ["StepMetrics", "StepRecord", "StepSchedule", "Schedule", "make_schedule"]

logger = logging.getLogger(__name__)


@dataclass
class StepMetrics:
    """Scalars the full program returns on a computed step (read once per computed step).

    Attributes:
        diff_norm: ||r_prev - r||_p of the metric tap (meaningless when there was no previous computed step).
        prev_norm: ||r_prev||_p.
        motion: per MoReg stride k, (num, den) = (||r[k:] - r[:-k]||_1, ||r[k:]||_1 + ||r[:-k]||_1) along the frame
            axis; empty when MoReg is off.
        delta_error: for :class:`~adacache_compile.config.GapPolicy`: relative L1 error of the forecast of this
            step's fused deltas from the earlier computed steps, ``sum ||D - D_hat||_1 / sum ||D||_1`` over the
            streams; None when nothing earlier is cached or the policy does not read it.
        delta_error_order: the order that forecast had (fewer earlier steps than ``forecast_order + 1`` lower it).
    """

    diff_norm: float
    prev_norm: float
    motion: tuple[tuple[float, float], ...] = ()
    delta_error: float | None = None
    delta_error_order: int = 0


@dataclass
class StepRecord:
    """What the schedule decided on one computed step.

    Attributes:
        step: the 1-based step.
        rate: the caching rate decided on this step; the next step due is `step + rate`.
        metric: c after the division by the rate and MoReg; None on the first computed step or when non-finite.
        raw_metric: ||r_prev - r|| / ||r_prev|| before any normalisation; None where `metric` is None.
        moreg_factor: m' + |g| that multiplied the metric; None when MoReg is off or the metric is None.
        motion: the measured motion m; None outside the MoReg window (where m' = 1) or when MoReg is off.
        nonfinite: the metrics were unusable (prev_norm == 0, NaN or Inf); rate was reset to 1.
    """

    step: int
    rate: int
    metric: float | None
    raw_metric: float | None
    moreg_factor: float | None
    motion: float | None
    nonfinite: bool = False


class StepSchedule:
    """What every step policy shares: the forced steps, the computed and skipped steps, the records of one
    generation of ``num_steps`` steps, and how a step is checked. Usage per step i = 1..N: ``if
    schedule.is_computed(i)``: run the full program, then ``schedule.observe(i, metrics)``; else run the skip program
    and ``schedule.mark_skipped(i)``.

    A policy that decides from the step's own input (``needs_input``) is told it with :meth:`see_input` before
    :meth:`is_computed`; one that reads the forecast error of the fused delta (``needs_delta_error``) gets it in
    ``StepMetrics.delta_error``."""

    needs_input = False
    needs_delta_error = False

    def __init__(self, config: AdaCacheConfig, num_steps: int) -> None:
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"{type(self).__name__}.num_steps: expected an int >= 1, got {num_steps!r}")
        self.config = config
        self.num_steps = num_steps
        self.forced_steps = config.forced_for(num_steps)
        self._warned_nonfinite = False
        self.reset()

    def reset(self) -> None:
        """Start a new generation: no computed step yet, rate 1, no records."""
        self.rate = 1
        self.last_computed = 0
        self.records: list[StepRecord] = []
        self.computed_steps: list[int] = []
        self.skipped_steps: list[int] = []
        self._force_next = False

    def see_input(self, step: int, change: float | None) -> None:
        """The relative change of the step's input since the previous step (None on the first step)."""

    def is_computed(self, step: int) -> bool:
        """Whether 1-based `step` must run the full program."""
        self._check_step(step)
        return (
            not self.config.enabled
            or self.last_computed == 0
            or self._force_next
            or step in self.forced_steps
            or self._due(step)
        )

    def _due(self, step: int) -> bool:
        return step >= self.last_computed + self.rate

    def mark_skipped(self, step: int) -> None:
        """Record that `step` ran the skip program."""
        if self.is_computed(step):
            raise ValueError(
                f"{type(self).__name__}.mark_skipped: step {step} must be computed (last computed "
                f"{self.last_computed}, rate {self.rate})"
            )
        self.skipped_steps.append(step)

    def _record(self, step: int, record: StepRecord) -> StepRecord:
        self.rate = record.rate
        self._force_next = record.nonfinite
        self.last_computed = step
        self.computed_steps.append(step)
        self.records.append(record)
        return record

    def _check_order(self, step: int) -> None:
        self._check_step(step)
        if step <= self.last_computed:
            raise ValueError(
                f"{type(self).__name__}.observe: step {step} is not after the last computed step "
                f"{self.last_computed}; steps must increase within a generation (call reset() between generations, "
                "and keep one schedule per CFG branch when the pipeline calls the model once per branch)"
            )

    def _nonfinite(self, step: int, detail: str) -> StepRecord:
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            logger.warning(
                "AdaCache step %s: metric is not finite (%s); not using it, rate reset to 1 and the next step is "
                "computed. Further occurrences in this schedule are recorded in stats only.",
                step,
                detail,
            )
        return StepRecord(step, 1, None, None, None, None, nonfinite=True)

    def _check_step(self, step: int) -> None:
        if not isinstance(step, int) or isinstance(step, bool) or not 1 <= step <= self.num_steps:
            raise ValueError(f"{type(self).__name__}: step must be an int in 1..{self.num_steps}, got {step!r}")


class Schedule(StepSchedule):
    """AdaCache's step schedule for one generation of `num_steps` steps (docs/algorithm.md, "The schedule").

    Interpretation of the reference rule:
    - On the first computed step there is no r_prev: no metric, no MoReg evaluation, m_prev stays 1 and the rate
      stays 1, exactly as the reference, which evaluates MoReg only inside the branch that has a previous residual
      (``config.first_rate``, ours, sets another rate there).
    - "rate" in `c / rate` and in the motion gradient is the rate in force (decided on the previous computed step),
      also on forced steps (N-1, N) reached before that rate elapsed, as the reference divides by its stored rate.
    - The MoReg window is checked on the current step i with inclusive ends.
    - A step that is due is never skipped: a caller that jumps past `last_computed + rate` gets True.
    - Non-finite metrics (prev_norm == 0, NaN, Inf anywhere the rule reads, including the motion terms inside the
      window) are not used: the record is flagged, rate becomes 1, m_prev is left as it was and the next step is
      forced. The runtime also drops the cached deltas and tap on such a step, so the next computed step has no
      r_prev (``observe(step, None)``): it measures nothing and keeps rate 1.
    """

    def __init__(self, config: AdaCacheConfig, num_steps: int) -> None:
        self.moreg_window = None if config.moreg is None else config.moreg.window_for(num_steps)
        self._thresholds = [threshold for threshold, _ in config.codebook]
        self._rates = [rate for _, rate in config.codebook]
        self._first_rate = config.resolved_first_rate()
        super().__init__(config, num_steps)

    def reset(self) -> None:
        """Start a new generation: no computed step yet, rate 1, m_prev 1, no records."""
        super().reset()
        self._moreg_prev = 1.0

    def observe(self, step: int, metrics: StepMetrics | None) -> StepRecord:
        """Apply the rule to the metrics of computed step `step` and return what it decided.

        ``metrics=None`` means there is no previous tap to compare with (its cache was dropped, e.g. after an input
        change mid-generation): like the first computed step, the rate goes back to 1 and nothing is measured."""
        self._check_order(step)
        if self.last_computed == 0 or metrics is None:
            # Nothing measured: the first computed step sets first_rate (1 in the reference), a step after a dropped
            # cache goes back to 1.
            record = StepRecord(step, self._first_rate if self.last_computed == 0 else 1, None, None, None, None)
        else:
            record = self._decide(step, metrics)
        return self._record(step, record)

    def _decide(self, step: int, metrics: StepMetrics) -> StepRecord:
        rate_in_force = self.rate
        diff_norm, prev_norm = float(metrics.diff_norm), float(metrics.prev_norm)
        if prev_norm == 0 or not (math.isfinite(diff_norm) and math.isfinite(prev_norm)):
            return self._nonfinite(step, f"diff_norm={diff_norm}, prev_norm={prev_norm}")
        raw_metric = diff_norm / prev_norm
        metric = raw_metric / rate_in_force

        moreg = self.config.moreg
        moreg_factor = motion = None
        if moreg is not None:
            lo, hi = self.moreg_window
            if lo <= step <= hi:
                motion = self._motion(step, metrics)
                if motion is None:
                    return self._nonfinite(step, f"motion={metrics.motion}")
                try:
                    regularised = (motion / moreg.threshold) ** moreg.power / moreg.scale
                except OverflowError:
                    return self._nonfinite(step, f"motion={motion} overflows the MoReg power {moreg.power}")
            else:
                regularised = 1.0
            gradient = moreg.gradient_multiplier * (regularised - self._moreg_prev) / rate_in_force
            moreg_factor = regularised + abs(gradient)
            metric *= moreg_factor
        if not math.isfinite(metric):
            return self._nonfinite(step, f"metric={metric}")

        if moreg is not None:
            self._moreg_prev = regularised
        rate = next((r for threshold, r in zip(self._thresholds, self._rates) if metric < threshold), self._rates[-1])
        return StepRecord(step, rate, metric, raw_metric, moreg_factor, motion)

    def _motion(self, step: int, metrics: StepMetrics) -> float | None:
        strides = self.config.moreg.strides
        if len(metrics.motion) != len(strides):
            raise ValueError(
                f"Schedule.observe: step {step}: StepMetrics.motion has {len(metrics.motion)} (num, den) pairs, "
                f"MoRegConfig.strides has {len(strides)} strides {strides}"
            )
        ratios = []
        for num, den in metrics.motion:
            num, den = float(num), float(den)
            if den == 0 or not (math.isfinite(num) and math.isfinite(den)):
                return None
            ratios.append(num / den)
        return sum(ratios) / len(ratios)


def make_schedule(config: AdaCacheConfig, num_steps: int) -> StepSchedule:
    """The schedule of ``config``'s policy for one generation: the AdaCache rule (:class:`Schedule`) or one of
    :mod:`adacache_compile.policies`."""
    if config.policy is None:
        return Schedule(config, num_steps)
    from .policies import POLICY_SCHEDULES

    return POLICY_SCHEDULES[config.policy.kind](config, num_steps)
