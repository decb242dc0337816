"""The measured selection: of the candidates the families give for a target compute, the one with the least
*measured* error whose *measured* compute is within a tolerance of the target.

1. Every family is solved (bisection of its parameter) for the target's predicted compute; candidates whose
   prediction lands near the target are ranked by the predicted error proxy; a candidate whose simulated schedules
   equal an earlier one's on every run is dropped; ``extra`` configs (e.g. shipped presets) join unranked.
2. The best are measured by a caller-supplied ``evaluate(config) -> (error, computed_fraction[, info])`` (real runs
   on the calibration inputs; lower error is better). With ``diverse=True`` the first measured are the best of each
   forecast order, then of each kind, then of each (kind, order) group (:func:`_first_measured`), so the
   measurement, not the proxy, decides between policies and orders. The simulation misjudges the real compute by a bias (``measured - predicted``):
   each candidate after the first is re-solved for ``target - bias`` (the mean bias so far) before it is measured.
3. While evaluations remain, a family that has not landed within the tolerance is re-solved for the predicted
   compute that should land it (interpolated between its measured points on both sides of the target, else a
   secant or a bias step) and measured again, the family whose error expected at the target is least first; with
   ``diverse=True``, when no family needs that, the next candidate in measurement order is measured.
4. The winner: the least measured error within the tolerance. When no candidate landed, the measured candidate
   nearest the target compute (then the least error) is returned with a warning and ``landed=False``: a calibration
   always gives a config and says what it achieved.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import AdaCacheConfig
from .codebooks import LADDERS, TEMPLATES, _finite, codebook_families
from .families import Family
from .simulation import MetricPredictor

__all__ = [
    "CalibrationError",
    "CalibrationWarning",
    "Candidate",
    "Calibration",
    "default_tolerance",
    "solve_family",
    "select",
    "select_config",
    "candidate_configs",
]

logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """A calibration that cannot start (no usable recording, a target outside (0, 1])."""


class CalibrationWarning(UserWarning):
    """No measured candidate landed within the tolerance of the target: the nearest one was chosen."""


@dataclass
class Candidate:
    """One candidate of :func:`select`: how it was made, what was predicted and what was measured.

    ``family``: the family's name (``"scale:4-3"``, ``"gap:max8-first3"``, ...) without the order, or ``"given"``
    (a config the caller passed in); ``source`` the :class:`~adacache_compile.calibration.families.Family` itself
    (None for a given config: it cannot be re-solved). ``param``: the family's parameter solved for ``solved_for``
    (the target, or the target corrected by a measured bias). ``measured_fraction``/``error`` are None until
    evaluated; ``info`` holds whatever else ``evaluate`` returned (e.g. PSNR per video)."""

    name: str
    config: AdaCacheConfig
    predicted_fraction: float
    proxy_error: float
    family: str = "given"
    quantiles: tuple[float, ...] = ()
    rates: tuple[int, ...] = ()
    param: float | None = None
    solved_for: float | None = None
    measured_fraction: float | None = None
    error: float | None = None
    info: dict = field(default_factory=dict)
    source: Family | None = field(default=None, repr=False)

    @property
    def group(self) -> tuple[str, int]:
        """(kind, forecast order): what the diverse first measurements spread over."""
        kind = self.source.kind if self.source is not None else self.config.policy_name
        return kind, self.config.forecast_order

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "kind": self.group[0],
            "forecast_order": self.config.forecast_order,
            "rates": list(self.rates),
            "quantiles": list(self.quantiles),
            "param": self.param,
            "solved_for": self.solved_for,
            "codebook": None if self.config.codebook is None else [[t, r] for t, r in self.config.codebook],
            "policy": None if self.config.policy is None else self.config.policy.to_dict(),
            "forced_steps": list(self.config.forced_steps),
            "predicted_fraction": self.predicted_fraction,
            "proxy_error": self.proxy_error,
            "measured_fraction": self.measured_fraction,
            "error": self.error,
            **({"info": self.info} if self.info else {}),
        }


def default_tolerance(num_steps: int) -> float:
    """Half a computed step per video: ``0.5 / num_steps`` (0.01 at 50 steps).

    A candidate's error is compared with the others' only at the same compute; within +-0.5 / N of the target, any
    two admitted candidates differ by less than one computed step per video, the smallest change of compute a
    codebook can make on one video, so an error difference is not one bought with an extra step (at the fast end
    of the testbed one step per video is worth about 1 dB). Tighter than that, a candidate could not land inside at
    all on a single video; with V videos the mean fraction moves in steps of 1 / (N V), so the refinement lands."""
    return 0.5 / num_steps


@dataclass
class Calibration:
    """What :func:`select` chose and how: the winner, every candidate (evaluated or not), the settings, whether the
    winner landed within the tolerance, and what the selection cost (``evaluations`` calls of ``evaluate``;
    ``cost`` filled in by the caller that knows what one call runs)."""

    config: AdaCacheConfig
    winner: Candidate
    target: float
    tolerance: float
    candidates: list[Candidate]
    evaluations: int
    landed: bool = True
    cost: dict = field(default_factory=dict)

    @property
    def achieved_fraction(self) -> float:
        return self.winner.measured_fraction

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "winner": self.winner.name,
            "target": self.target,
            "tolerance": self.tolerance,
            "landed": self.landed,
            "achieved_fraction": self.achieved_fraction,
            "predicted_fraction": self.winner.predicted_fraction,
            "measured_fraction": self.winner.measured_fraction,
            "error": self.winner.error,
            "evaluations": self.evaluations,
            "cost": self.cost,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def _unpack(result) -> tuple[float, float, dict]:
    error, fraction, *rest = result
    info = rest[0] if rest else {}
    return float(error), float(fraction), dict(info)


def _error_slope(measured: Sequence[Candidate]) -> float:
    """Least-squares slope of measured error over measured fraction (0 without two distinct fractions)."""
    points = [(c.measured_fraction, c.error) for c in measured if math.isfinite(c.error)]
    if len({x for x, _ in points}) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def _expected_error(points: Sequence[Candidate], target: float, slope: float) -> float:
    """A family's error at the target: its measured point nearest the target moved along the common slope."""
    nearest = min(points, key=lambda c: abs(c.measured_fraction - target))
    return nearest.error + slope * (target - nearest.measured_fraction)


def _next_solve_for(points: Sequence[Candidate], target: float) -> float:
    """The predicted fraction to solve a family for so that its *measured* fraction lands on ``target``: linear
    interpolation between its measured points on both sides of the target, else a secant step from its last two
    points (when their slope is sane), else the last point's bias (measured - predicted) subtracted."""
    below = [c for c in points if c.measured_fraction < target]
    above = [c for c in points if c.measured_fraction > target]
    if below and above:
        lo = max(below, key=lambda c: c.measured_fraction)
        hi = min(above, key=lambda c: c.measured_fraction)
        w = (target - lo.measured_fraction) / (hi.measured_fraction - lo.measured_fraction)
        return lo.solved_for + w * (hi.solved_for - lo.solved_for)
    last = points[-1]
    if len(points) >= 2:
        prev = points[-2]
        dm = last.measured_fraction - prev.measured_fraction
        if dm != 0:
            gain = (last.solved_for - prev.solved_for) / dm
            if 0.25 <= gain <= 4:
                return last.solved_for + gain * (target - last.measured_fraction)
    return last.solved_for + (target - last.measured_fraction)


def solve_family(family: Family, predictor, target: float) -> Candidate:
    """Bisection of ``family``'s parameter (larger: fewer computed steps) for the predicted fraction ``target``: the
    evaluated point whose fraction is closest (ties: the smaller fraction, i.e. the cheaper), as a candidate."""
    best = None
    lo, hi = family.lo, family.hi

    def point(param: float) -> float:
        nonlocal best
        config = family.make(param)
        fraction = predictor.fraction(config)
        key = (abs(fraction - target), fraction)
        if best is None or key < best[0]:
            best = (key, param, config, fraction)
        return fraction

    for _ in range(40):
        mid = math.sqrt(lo * hi) if family.log else (lo + hi) / 2
        if point(mid) > target:
            lo = mid
        else:
            hi = mid
    point(hi)
    _, param, config, fraction = best
    proxy = predictor.predict(config)[1]
    info = family.info
    return Candidate(
        family.name if family.kind == "adacache" and not family.order else f"{family.name}@f{family.order}",
        config,
        fraction,
        proxy,
        family.name,
        tuple(info.get("quantiles", ())),
        tuple(info.get("rates", ())),
        param,
        target,
        source=family,
    )


def _check_target(target: float) -> None:
    if not 0 < target <= 1:
        raise CalibrationError(f"target compute fraction {target}: expected a number in (0, 1]")


def _first_measured(ranked: Sequence[Candidate], count: int, diverse: bool) -> list[Candidate]:
    """The first ``count`` candidates to measure. ``diverse``: the proxy ranks well within a kind and order but not
    across them (it scores skips on the uncached trajectory), so first the best of each forecast order, then the best
    of each kind not yet in, then the best of the other (kind, order) groups, then the rest, each in proxy order."""
    if not diverse:
        return list(ranked[:count])
    chosen: list[Candidate] = []

    def take(key) -> None:
        covered = {key(c) for c in chosen}
        for candidate in ranked:
            if len(chosen) < count and key(candidate) not in covered:
                chosen.append(candidate)
                covered.add(key(candidate))

    take(lambda c: c.config.forecast_order)
    take(lambda c: c.group[0])
    take(lambda c: c.group)
    return chosen + [c for c in ranked if c not in chosen][: count - len(chosen)]


def select(
    families: Sequence[Family],
    predictor,
    target: float,
    evaluate: Callable[[AdaCacheConfig], tuple],
    *,
    tolerance: float | None = None,
    max_candidates: int = 5,
    max_evaluations: int = 10,
    max_retries: int = 3,
    extra: Mapping[str, AdaCacheConfig] | None = None,
    diverse: bool = False,
    log: Callable[[str], object] | None = None,
) -> Calibration:
    """The measured selection over ``families`` (see the module docstring); ``predictor`` simulates a config on the
    recorded runs (``fraction``, ``predict``, ``schedules``: :class:`~.simulation.RunPredictor` or
    :class:`~.simulation.MetricPredictor`)."""
    _check_target(target)
    num_steps = predictor.num_steps
    tolerance = default_tolerance(num_steps) if tolerance is None else float(tolerance)
    if not tolerance > 0:
        raise CalibrationError(f"tolerance {tolerance}: expected a number > 0")
    say = log or (lambda _text: None)
    candidates = [solve_family(family, predictor, target) for family in families]
    window = max(2 * tolerance, 0.03)
    ranked, seen = [], set()
    for candidate in sorted(candidates, key=lambda c: c.proxy_error):
        schedules = predictor.schedules(candidate.config)
        if abs(candidate.predicted_fraction - target) <= window and schedules not in seen:
            seen.add(schedules)
            ranked.append(candidate)
    measured: list[Candidate] = []
    configs: set = set()

    def measure(candidate: Candidate) -> Candidate:
        error, fraction, info = _unpack(evaluate(candidate.config))
        candidate.error, candidate.measured_fraction, candidate.info = error, fraction, info
        configs.add(candidate.config)
        measured.append(candidate)
        say(
            f"  {candidate.name:<26} predicted {candidate.predicted_fraction:.3f} measured {fraction:.3f} "
            f"error {error:.4g}  {_describe(candidate.config)}"
        )
        return candidate

    def resolve(candidate: Candidate, solve_for: float) -> Candidate | None:
        fresh = solve_family(candidate.source, predictor, min(max(solve_for, 1e-3), 1.0))
        return None if fresh.config in configs else fresh

    for name, config in (extra or {}).items():
        fraction, proxy = predictor.predict(config)
        measure(Candidate(name, config, fraction, proxy))
    evaluations = 0
    biases: list[float] = []
    # Diverse: every ranked candidate in measurement order; the first max_candidates now, the rest while evaluations
    # remain after the refinement (the proxy does not rank across kinds and orders well enough to stop early).
    order = _first_measured(ranked, len(ranked) if diverse else max_candidates, diverse)
    waiting = order[max_candidates:]

    def measure_next(candidate: Candidate) -> bool:
        if biases:
            candidate = resolve(candidate, target - sum(biases) / len(biases)) or candidate
            if candidate.config in configs:
                return False
        measure(candidate)
        biases.append(candidate.measured_fraction - candidate.predicted_fraction)
        return True

    for candidate in order[:max_candidates]:
        if evaluations >= max_evaluations:
            break
        evaluations += measure_next(candidate)

    def within(c: Candidate) -> bool:
        return c.measured_fraction is not None and abs(c.measured_fraction - target) <= tolerance + 1e-12

    retries: dict[str, int] = {}
    while evaluations < max_evaluations:
        landed = {c.name for c in measured if within(c)}
        by_family: dict[str, list[Candidate]] = {}
        for c in measured:
            if c.source is not None and c.name not in landed and retries.get(c.name, 0) < max_retries:
                by_family.setdefault(c.name, []).append(c)
        slope = _error_slope(measured)
        retried = False
        for points in sorted(by_family.values(), key=lambda points: _expected_error(points, target, slope)):
            name = points[0].name
            retries[name] = retries.get(name, 0) + 1
            fresh = resolve(points[-1], _next_solve_for(points, target))
            if fresh is None:
                continue
            measure(fresh)
            evaluations += 1
            retried = True
            break
        while not retried and waiting:
            retried = measure_next(waiting.pop(0))
            evaluations += retried
        if not retried:
            break

    if not measured:
        raise CalibrationError(
            f"no candidate predicted near {target:.3f} of the steps (families: {len(families)}); record more runs or "
            "widen the search"
        )
    admitted = [c for c in measured if within(c)]
    unevaluated = [c for c in ranked if c.measured_fraction is None and c.config not in configs]
    if admitted:
        winner = min(admitted, key=lambda c: (c.error, c.measured_fraction))
    else:
        winner = min(measured, key=lambda c: (abs(c.measured_fraction - target), c.error))
        message = (
            f"no candidate computed {target:.3f} +- {tolerance:.3f} of the steps when measured (measured: "
            + "; ".join(f"{c.name} {c.measured_fraction:.3f}" for c in measured)
            + f"); chose the nearest, {winner.name}, which computes {winner.measured_fraction:.3f}"
        )
        warnings.warn(message, CalibrationWarning, stacklevel=2)
        logger.warning("%s", message)
    say(f"  -> {winner.name}: measured {winner.measured_fraction:.3f}, error {winner.error:.4g}")
    return Calibration(winner.config, winner, target, tolerance, measured + unevaluated, evaluations, bool(admitted))


def _describe(config: AdaCacheConfig) -> str:
    if config.policy is not None:
        return f"{config.policy.to_dict()} f{config.forecast_order}"
    if config.codebook and config.codebook[0][1] >= 10**9:
        return f"grid {list(config.forced_steps)} f{config.forecast_order}"
    return f"{[(round(t, 4), r) for t, r in config.codebook]} f{config.forecast_order}"


def candidate_configs(
    runs: Sequence[Sequence[float]],
    num_steps: int,
    target: float,
    base: AdaCacheConfig | None = None,
    ladders: Sequence[Sequence[int]] = LADDERS,
    templates: Mapping[str, Sequence[tuple[float, int]]] | None = None,
) -> list[Candidate]:
    """The AdaCache rule's codebook candidates for a target compute fraction on recorded metrics (runs: lists of the
    metric at steps 2..N), each family solved so that its predicted fraction is closest; exact duplicates (same
    codebook) dropped. Everything but the codebook comes from ``base``."""
    _check_target(target)
    base = base or AdaCacheConfig(codebook=((1.0, 1),))
    predictor = MetricPredictor(runs, num_steps)
    pooled = _finite([m for run in runs for m in run])
    candidates, seen = [], set()
    for family in codebook_families(pooled, base, ladders, TEMPLATES if templates is None else templates):
        candidate = solve_family(family, predictor, target)
        if candidate.config.codebook not in seen:
            seen.add(candidate.config.codebook)
            candidates.append(candidate)
    return candidates


def select_config(
    runs: Sequence[Sequence[float]],
    num_steps: int,
    target: float,
    evaluate: Callable[[AdaCacheConfig], tuple],
    base: AdaCacheConfig | None = None,
    *,
    ladders: Sequence[Sequence[int]] = LADDERS,
    **kwargs: Any,
) -> Calibration:
    """:func:`select` over the AdaCache rule's codebooks on recorded metrics alone (runs: lists of the metric at
    steps 2..N, :func:`~.codebooks.recorder_config` of ``base``), everything but the codebook from ``base``."""
    _check_target(target)
    base = base or AdaCacheConfig(codebook=((1.0, 1),))
    pooled = _finite([m for run in runs for m in run])
    families = codebook_families(pooled, base, ladders)
    return select(families, MetricPredictor(runs, num_steps), target, evaluate, **kwargs)
