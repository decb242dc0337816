"""Step policies beside the AdaCache rule (ours), on the same programs: host-side, so they run on every backend and
export, and decide the same on every rank of a context-parallel model.

- :class:`InputChangeSchedule` (:class:`~adacache_compile.config.InputPolicy`) decides *before* each step, from the
  step's own input: the relative L1 change of the latent since the previous step, accumulated since the last
  computed step, against a threshold, with a cap on consecutive skips (the TeaCache / MagCache / SeaCache family).
- :class:`GapSchedule` (:class:`~adacache_compile.config.GapPolicy`) decides at each computed step how long to wait,
  like the AdaCache rule, but from the error the forecast of the fused delta would have made for this step (an
  embedded error estimate, free on a computed step), with an ODE solver's step-size controller.

docs/algorithm.md ("Policies") says where each comes from and what the calibration measured of them.
"""

from __future__ import annotations

import math

from .config import AdaCacheConfig
from .schedule import StepMetrics, StepRecord, StepSchedule

__all__ = ["InputChangeSchedule", "GapSchedule", "POLICY_SCHEDULES", "next_gap"]


class InputChangeSchedule(StepSchedule):
    """:class:`~adacache_compile.config.InputPolicy` for one generation. The runtime reports each step's input
    change with :meth:`see_input` before asking :meth:`is_computed`; a non-finite change forces the step."""

    needs_input = True

    def __init__(self, config: AdaCacheConfig, num_steps: int) -> None:
        self.policy = config.policy
        super().__init__(config, num_steps)

    def reset(self) -> None:
        super().reset()
        self.accumulated = 0.0
        self.skips_in_a_row = 0
        self._seen: tuple[int, float | None] | None = None

    def see_input(self, step: int, change: float | None) -> None:
        self._check_step(step)
        if self._seen is not None and self._seen[0] == step:
            return  # asked again for the same step: its change is counted once
        self._seen = (step, change)
        if change is None:
            return
        if not math.isfinite(change):
            self._force_next = True
            return
        self.accumulated += change

    def _due(self, step: int) -> bool:
        return self.accumulated >= self.policy.threshold or self.skips_in_a_row >= self.policy.max_skips

    def mark_skipped(self, step: int) -> None:
        super().mark_skipped(step)
        self.skips_in_a_row += 1

    def observe(self, step: int, metrics: StepMetrics | None) -> StepRecord:
        """A computed step: the accumulation starts again."""
        self._check_order(step)
        accumulated, self.accumulated, self.skips_in_a_row = self.accumulated, 0.0, 0
        return self._record(step, StepRecord(step, 1, accumulated, accumulated, None, None))


def next_gap(gap: float, error: float, order: int, policy) -> float:
    """The gap after a computed step whose forecast (of ``order``, over the gap ``gap`` just taken) erred by
    ``error``: ``gap * clip(safety * (tolerance / error) ** (1 / (order + 1)), shrink, grow)``, within 1 ..
    ``max_gap`` (an exact forecast grows the gap by ``grow``)."""
    factor = policy.grow if error <= 0 else policy.safety * (policy.tolerance / error) ** (1.0 / (order + 1))
    factor = min(max(factor, policy.shrink), policy.grow)
    return min(max(gap * factor, 1.0), float(policy.max_gap))


class GapSchedule(StepSchedule):
    """:class:`~adacache_compile.config.GapPolicy` for one generation. The gap is kept as a real number and rounded
    to whole steps (the rate); a computed step without a forecast error (nothing earlier cached) keeps the gap, a
    non-finite error forces the next step and restarts from gap 1."""

    needs_delta_error = True

    def __init__(self, config: AdaCacheConfig, num_steps: int) -> None:
        self.policy = config.policy
        super().__init__(config, num_steps)

    def reset(self) -> None:
        super().reset()
        self.gap = float(self.policy.first_gap)

    def observe(self, step: int, metrics: StepMetrics | None) -> StepRecord:
        self._check_order(step)
        if self.last_computed == 0:
            self.gap = float(self.policy.first_gap)
            return self._record(step, StepRecord(step, round(self.gap), None, None, None, None))
        error = None if metrics is None else metrics.delta_error
        if error is None:
            return self._record(step, StepRecord(step, max(1, round(self.gap)), None, None, None, None))
        if not math.isfinite(error):
            self.gap = 1.0
            return self._record(step, self._nonfinite(step, f"delta forecast error {error}"))
        taken = step - self.last_computed
        self.gap = next_gap(float(taken), error, metrics.delta_error_order, self.policy)
        return self._record(step, StepRecord(step, max(1, round(self.gap)), error, error, None, None))


POLICY_SCHEDULES = {"input": InputChangeSchedule, "gap": GapSchedule}
