"""Codebook calibration from recorded runs.

The reference published codebooks only for 30 and 100 steps and calibrated them from baseline runs on a few prompts.
This module does the same from a user's own generations:

1. **Record** the metric the target config will act on at every step: a rate-1 run of the target's settings
   (:func:`recorder_config`: same tap, region, norm, forecast order and decision metric, a rate-1 codebook), so every
   step is computed, its output is the uncached one, and ``stats`` holds one metric per step.
2. **Candidates** (:func:`candidate_configs`): codebooks of several rate ladders, their thresholds placed on the
   recorded metrics by two one-parameter families (the template quantiles *scaled*, or the quantiles *shifted* in
   logit space), each family solved by bisection for the target compute fraction predicted by :func:`simulate`.
3. **Selection** (:func:`select_config`): the candidates are ranked by a predicted error (:func:`simulate`'s proxy),
   the best few are *measured* by a caller-supplied ``evaluate(config) -> (error, computed_fraction)`` (a short
   validation run on the calibration prompts), a candidate whose measured fraction misses the target is re-solved
   for the bias it showed and measured again, and the least measured error within ``tolerance`` of the target wins.

:func:`codebook_from_metrics` (template quantiles) and :func:`calibrate_config` (the template scaled until the
predicted fraction is hit, the method before :func:`select_config`) stay. Recording the bundled testbed, its
``evaluate`` and the ``adacache-compile calibrate`` command live in :mod:`adacache_compile.testbed.calibrate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import AdaCacheConfig, MoRegConfig, forecast_config
from .schedule import Schedule, StepMetrics

__all__ = [
    "RECORD_CONFIG",
    "TEMPLATES",
    "LADDERS",
    "CalibrationError",
    "Candidate",
    "Calibration",
    "recorder_config",
    "metric_growth",
    "codebook_from_metrics",
    "placed_codebook",
    "simulate",
    "predict",
    "candidate_configs",
    "default_tolerance",
    "select_config",
    "calibrate_config",
    "metrics_from_stats",
    "motions_from_stats",
    "moreg_threshold",
]

_RECORD_CODEBOOK = ((1e12, 1),)
_OPEN_END = 1e6  # the last pair's threshold: "anything larger"


def recorder_config(config: AdaCacheConfig | None = None, *, record_motion: bool = True) -> AdaCacheConfig:
    """The rate-1 config that records the metric ``config`` acts on.

    Everything that changes the metric stays as in ``config`` (tap, region, ``norm_ord``, ``forecast_order``,
    ``decision_metric``, MoReg strides); the codebook is rate 1 at every metric, so every step is computed (the run's
    output is the uncached one) and each step's metric is recorded, and MoReg covers every step so the motion is
    recorded too (it cannot change a rate-1 schedule). With ``decision_metric="forecast"`` the recorded value at step
    i is the forecast error of the tap from steps i-1, i-2, ... (spacing 1), which is what the codebook is placed on.
    ``record_motion=False`` leaves MoReg as ``config`` has it (a model whose tap has no known frame layout cannot
    measure motion).
    """
    base = config if config is not None else AdaCacheConfig(codebook=((1.0, 1),))
    if not record_motion:
        return base.replace(codebook=_RECORD_CODEBOOK, enabled=True)
    strides = base.moreg.strides if base.moreg is not None else MoRegConfig().strides
    return base.replace(codebook=_RECORD_CODEBOOK, moreg=MoRegConfig(strides=strides, window=(1, 1.0)), enabled=True)


# Rate 1 at every step with the default (reference) metric.
RECORD_CONFIG = recorder_config()


def base_config(forecast_order: int = 0, decision_metric: str = "change") -> AdaCacheConfig:
    """The config a calibration places its codebooks into: at order 0 the reference's start and forced steps, with
    forecasting those of the forecast presets (:func:`~adacache_compile.config.forecast_config`: the first computed
    step at the codebook's top rate, steps 1 and N forced), so that a calibrated forecasting codebook is selected with
    the start and end it will run with."""
    if forecast_order == 0:
        return AdaCacheConfig(codebook=((_OPEN_END, 1),), decision_metric=decision_metric)
    return forecast_config(((_OPEN_END, 1),), forecast_order, decision_metric)


# (quantile, rate) pairs shaped like the reference codebooks: fast steps down from rate 6, slow from rate 3.
TEMPLATES: dict[str, tuple[tuple[float, int], ...]] = {
    "fast": ((0.30, 6), (0.45, 5), (0.60, 4), (0.75, 3), (0.90, 2)),
    "slow": ((0.30, 3), (0.60, 2)),
}

# Rate ladders (the rates above 1, descending; every codebook ends with rate 1) of the candidates beside the
# templates: one rate (close to a static stride with a safety valve), two adjacent rates (between two strides), and
# wider ladders up to the reference's fast shape.
LADDERS: tuple[tuple[int, ...], ...] = (
    (2,),
    (3,),
    (4,),
    (5,),
    (3, 2),
    (4, 3),
    (5, 4),
    (4, 2),
    (4, 3, 2),
    (5, 4, 3),
    (6, 4, 2),
    (6, 5, 4, 3, 2),
)


class CalibrationError(ValueError):
    """No candidate codebook met the target compute fraction within the tolerance."""


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


def _finite(metrics: Sequence[float]) -> list[float]:
    finite = [m for m in metrics if math.isfinite(m)]
    if len(finite) < 3:
        raise ValueError(f"calibration needs at least 3 recorded metrics, got {len(finite)}")
    return finite


def _ascending(thresholds: Sequence[float], rates: Sequence[int]):
    """``(threshold, rate)`` pairs made strictly ascending (ties nudged up), closed by ``(open end, 1)``."""
    pairs, last = [], 0.0
    for threshold, rate in zip(thresholds, rates):
        threshold = max(threshold, last * (1 + 1e-6) + 1e-12)
        pairs.append((threshold, rate))
        last = threshold
    pairs.append((max(_OPEN_END, last * 10), 1))
    return tuple(pairs)


def codebook_from_metrics(metrics: Sequence[float], target: str = "fast", scale: float = 1.0):
    """Ascending ``(threshold, rate)`` pairs from recorded per-step metrics and a template name."""
    finite = _finite(metrics)
    if target not in TEMPLATES:
        raise ValueError(f"calibration target {target!r}: expected one of {sorted(TEMPLATES)}")
    quantiles, rates = zip(*TEMPLATES[target])
    return _ascending([_quantile(finite, q) * scale for q in quantiles], rates)


def _logit(q: float) -> float:
    return math.log(q / (1 - q))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def placed_codebook(
    metrics: Sequence[float], quantiles: Sequence[float], rates: Sequence[int], family: str, param: float
):
    """A codebook with ``rates`` (descending, > 1; rate 1 closes it) and thresholds placed on ``metrics``.

    - ``family="scale"``: threshold j = quantile ``quantiles[j]`` of the metrics times ``param`` (the template scaling
      of :func:`calibrate_config`; the thresholds keep their ratios).
    - ``family="shift"``: threshold j = quantile ``sigmoid(logit(quantiles[j]) + param)`` (plain quantile placement:
      every threshold moves along the distribution, the rates keep their share of its mass in logit terms).

    Larger ``param`` gives larger thresholds in both, i.e. higher rates and fewer computed steps."""
    finite = _finite(metrics)
    if len(quantiles) != len(rates) or not rates:
        raise ValueError(f"placed_codebook: {len(quantiles)} quantiles for {len(rates)} rates")
    if family == "scale":
        thresholds = [_quantile(finite, q) * param for q in quantiles]
    elif family == "shift":
        thresholds = [_quantile(finite, _sigmoid(_logit(q) + param)) for q in quantiles]
    else:
        raise ValueError(f"placed_codebook: family {family!r}: expected 'scale' or 'shift'")
    return _ascending(thresholds, rates)


def metric_growth(config: AdaCacheConfig) -> float:
    """Exponent e of the metric's growth with the spacing k of computed steps, as :func:`simulate` models it: the
    metric a step sees k steps after the last computed one is the sum of the k per-step metrics recorded in between
    times ``k ** (e - 1)``.

    1 for every decision metric and forecast order. For the change metric that is a steady drift. For the forecast
    metric the Newton remainder of a degree-p forecast would suggest e = p + 1, but on the testbed (50 steps, orders
    1 and 2) that model over-predicted the compute by 0.05-0.2 (e.g. 0.45 predicted, 0.335 measured) while e = 1 was
    within 0.05 of the measured fraction for every candidate; the measured refinement of :func:`select_config`
    corrects the rest. ``simulate(..., growth=)`` takes another exponent."""
    del config  # the same model for every config; kept as the one place to change it
    return 1.0


def _run(config: AdaCacheConfig, series: Sequence[float], num_steps: int, growth=None) -> tuple[list[int], float]:
    schedule = Schedule(config.replace(moreg=None), num_steps)
    growth = metric_growth(config) if growth is None else growth
    series = list(series) or [0.0]
    proxy = 0.0

    def drift(step: int) -> float:
        """The metric a step would see since the last computed one: window sum times spacing ** (growth - 1)."""
        window = series[schedule.last_computed - 1 : step - 1] or [series[-1]]
        change = sum(window)
        return change if growth == 1 else change * (step - schedule.last_computed) ** (growth - 1)

    for step in range(1, num_steps + 1):
        if not schedule.is_computed(step):
            proxy += drift(step)
            schedule.mark_skipped(step)
            continue
        if schedule.last_computed == 0:
            schedule.observe(step, None)
            continue
        schedule.observe(step, StepMetrics(diff_norm=drift(step), prev_norm=1.0))
    return list(schedule.computed_steps), proxy


def simulate(
    config: AdaCacheConfig, per_step_metrics: Sequence[float], num_steps: int, growth: float | None = None
) -> list[int]:
    """Computed steps the schedule would take on a run whose recorded per-step metrics (steps 2..N, spacing 1) are
    ``per_step_metrics``: a computed step k steps after the last one sees the sum of the k per-step metrics in
    between times ``k ** (growth - 1)`` (default :func:`metric_growth`: 1, a steady drift); MoReg is not simulated.
    Forced steps, warm-up and everything else the schedule decides are the real schedule's."""
    return _run(config, per_step_metrics, num_steps, growth)[0]


def predict(config: AdaCacheConfig, runs: Sequence[Sequence[float]], num_steps: int) -> tuple[float, float]:
    """``(compute fraction, error proxy)`` of ``config`` simulated on every recorded run, means over the runs.

    The error proxy is the sum, over the skipped steps of a run, of the metric the step would have shown had it been
    computed (the tap's change since, or its forecast error from, the last computed steps, modelled as in
    :func:`simulate`): a ranking of candidates before they are measured, not an error estimate."""
    fractions, proxies = [], []
    for run in runs:
        computed, proxy = _run(config, run, num_steps)
        fractions.append(len(computed) / num_steps)
        proxies.append(proxy)
    return sum(fractions) / len(fractions), sum(proxies) / len(proxies)


@dataclass
class Candidate:
    """One candidate codebook of :func:`select_config`: how it was made, what was predicted and what was measured.

    ``family``: ``"scale"``, ``"shift"`` (see :func:`placed_codebook`), ``"template"`` or ``"given"`` (a config the
    caller passed in). ``param``: the family's parameter solved for ``solved_for`` (the target, or the target
    corrected by a measured bias). ``measured_fraction``/``error`` are None until evaluated; ``info`` holds
    whatever else ``evaluate`` returned (e.g. PSNR per video)."""

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "rates": list(self.rates),
            "quantiles": list(self.quantiles),
            "param": self.param,
            "solved_for": self.solved_for,
            "codebook": [[t, r] for t, r in self.config.codebook],
            "predicted_fraction": self.predicted_fraction,
            "proxy_error": self.proxy_error,
            "measured_fraction": self.measured_fraction,
            "error": self.error,
            **({"info": self.info} if self.info else {}),
        }


def _even_quantiles(count: int, lo: float = 0.3, hi: float = 0.9) -> tuple[float, ...]:
    """``count`` quantiles evenly spaced over [lo, hi] (the span of the fast template); one sits at the middle."""
    if count == 1:
        return ((lo + hi) / 2,)
    return tuple(lo + (hi - lo) * j / (count - 1) for j in range(count))


def _solve(make: Callable[[float], AdaCacheConfig], runs, num_steps: int, target: float, lo: float, hi: float, log):
    """Bisection of a monotone family parameter (larger: fewer computed steps) for the predicted fraction ``target``;
    returns ``(param, config, fraction, proxy)`` of the evaluated point whose fraction is closest to the target
    (ties: the smaller fraction, i.e. the cheaper)."""
    best = None

    def point(param: float):
        nonlocal best
        config = make(param)
        fraction, proxy = predict(config, runs, num_steps)
        key = (abs(fraction - target), fraction)
        if best is None or key < best[0]:
            best = (key, (param, config, fraction, proxy))
        return fraction

    for _ in range(40):
        mid = math.sqrt(lo * hi) if log else (lo + hi) / 2
        if point(mid) > target:
            lo = mid
        else:
            hi = mid
    point(hi)
    return best[1]


# Parameter ranges of the families: scale factors (log bisection) and logit shifts.
_SCALE_RANGE = (1e-3, 1e3)
_SHIFT_RANGE = (-12.0, 12.0)


def _solve_candidate(pooled, runs, num_steps, base, name, family, quantiles, rates, target) -> Candidate:
    def make(param: float) -> AdaCacheConfig:
        return base.replace(codebook=placed_codebook(pooled, quantiles, rates, family, param))

    lo, hi = _SCALE_RANGE if family == "scale" else _SHIFT_RANGE
    param, config, fraction, proxy = _solve(make, runs, num_steps, target, lo, hi, log=family == "scale")
    return Candidate(name, config, fraction, proxy, family, tuple(quantiles), tuple(rates), param, target)


def candidate_configs(
    runs: Sequence[Sequence[float]],
    num_steps: int,
    target: float,
    base: AdaCacheConfig | None = None,
    ladders: Sequence[Sequence[int]] = LADDERS,
    templates: Mapping[str, Sequence[tuple[float, int]]] | None = None,
) -> list[Candidate]:
    """Candidate codebooks for a target compute fraction, each solved so that its predicted fraction is closest.

    For every template (default :data:`TEMPLATES`): its quantiles scaled (``scale:<name>``, what
    :func:`calibrate_config` does) and shifted (``shift:<name>``). For every ladder of :data:`LADDERS`: its quantiles
    spaced evenly over [0.3, 0.9], scaled (``scale:<rates>``) and shifted (``shift:<rates>``); a one-rate ladder has
    one threshold, which both families move alike, so only ``shift``. Exact duplicates (same codebook) are dropped.
    Everything but the codebook comes from ``base`` (forecast order, decision metric, forced steps, ...)."""
    if not 0 < target <= 1:
        raise ValueError(f"target compute fraction {target}: expected a number in (0, 1]")
    base = base or AdaCacheConfig(codebook=((1.0, 1),))
    pooled = _finite([m for run in runs for m in run])
    shapes = []
    for tname, pairs in (TEMPLATES if templates is None else templates).items():
        quantiles, rates = zip(*pairs)
        shapes.append((tname, quantiles, rates))
    for ladder in ladders:
        shapes.append(("-".join(map(str, ladder)), _even_quantiles(len(ladder)), tuple(ladder)))
    candidates, seen = [], set()
    for shape, quantiles, rates in shapes:
        for family in ("scale", "shift") if len(rates) > 1 else ("shift",):
            candidate = _solve_candidate(
                pooled, runs, num_steps, base, f"{family}:{shape}", family, quantiles, rates, target
            )
            if candidate.config.codebook not in seen:
                seen.add(candidate.config.codebook)
                candidates.append(candidate)
    return candidates


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
    """What :func:`select_config` chose and how: the winner, every candidate (evaluated or not), the settings."""

    config: AdaCacheConfig
    winner: Candidate
    target: float
    tolerance: float
    candidates: list[Candidate]
    evaluations: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "winner": self.winner.name,
            "target": self.target,
            "tolerance": self.tolerance,
            "predicted_fraction": self.winner.predicted_fraction,
            "measured_fraction": self.winner.measured_fraction,
            "error": self.winner.error,
            "evaluations": self.evaluations,
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


def select_config(
    runs: Sequence[Sequence[float]],
    num_steps: int,
    target: float,
    evaluate: Callable[[AdaCacheConfig], tuple],
    base: AdaCacheConfig | None = None,
    *,
    tolerance: float | None = None,
    max_candidates: int = 5,
    max_evaluations: int = 10,
    max_retries: int = 3,
    extra: Mapping[str, AdaCacheConfig] | None = None,
    ladders: Sequence[Sequence[int]] = LADDERS,
    log: Callable[[str], object] | None = None,
) -> Calibration:
    """The codebook with the least *measured* error among those whose *measured* compute fraction is within
    ``tolerance`` of ``target``.

    ``runs``: recorded per-step metrics (steps 2..N of each run) from :func:`recorder_config` of ``base`` — the metric
    the chosen config will act on. ``evaluate(config)`` returns ``(error, computed_fraction)`` or ``(error,
    computed_fraction, info_dict)`` of a real run of ``config`` on the calibration inputs (lower error is better: an
    MSE, or minus a PSNR; the fraction is computed steps / N over the runs).

    1. :func:`candidate_configs` for ``target``; those whose predicted fraction is within ``max(2 tolerance, 0.03)``
       are kept, a candidate whose simulated schedules equal an earlier one's on every run is dropped, the rest
       ranked by the predicted error proxy (:func:`predict`); ``extra`` configs (e.g. shipped presets) join unranked.
    2. The ``max_candidates`` best are measured in rank order. The simulation misjudges the real compute by a bias
       (``measured - predicted``); each candidate after the first is re-solved for ``target - bias`` (the mean bias
       measured so far) before it is measured.
    3. While evaluations remain (``max_evaluations`` in all, ``extra`` not counted), a family (ladder and placement)
       that has not landed in the band is re-solved for the predicted fraction that should land it — interpolated
       between its measured points on both sides of the target, else a secant or bias step — and measured again (at
       most ``max_retries`` times per family), the family whose error expected at the target is least first (its
       nearest measured point moved along the slope of error over fraction of all measurements).
    4. The winner: least error among candidates measured within ``tolerance`` (default
       :func:`default_tolerance`); :class:`CalibrationError` when there is none.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target compute fraction {target}: expected a number in (0, 1]")
    tolerance = default_tolerance(num_steps) if tolerance is None else float(tolerance)
    if not tolerance > 0:
        raise ValueError(f"tolerance {tolerance}: expected a number > 0")
    base = base or AdaCacheConfig(codebook=((1.0, 1),))
    say = log or (lambda _text: None)
    pooled = _finite([m for run in runs for m in run])
    candidates = candidate_configs(runs, num_steps, target, base, ladders=ladders)
    window = max(2 * tolerance, 0.03)
    ranked, seen = [], set()
    for candidate in sorted(candidates, key=lambda c: c.proxy_error):
        schedules = tuple(tuple(simulate(candidate.config, run, num_steps)) for run in runs)
        if abs(candidate.predicted_fraction - target) <= window and schedules not in seen:
            seen.add(schedules)
            ranked.append(candidate)
    measured: list[Candidate] = []
    codebooks: set = set()

    def measure(candidate: Candidate) -> Candidate:
        error, fraction, info = _unpack(evaluate(candidate.config))
        candidate.error, candidate.measured_fraction, candidate.info = error, fraction, info
        codebooks.add(candidate.config.codebook)
        measured.append(candidate)
        say(
            f"  {candidate.name:<22} predicted {candidate.predicted_fraction:.3f} measured {fraction:.3f} "
            f"error {error:.4g}  {[(round(t, 4), r) for t, r in candidate.config.codebook]}"
        )
        return candidate

    def resolve(candidate: Candidate, solve_for: float) -> Candidate | None:
        solve_for = min(max(solve_for, 1e-3), 1.0)
        fresh = _solve_candidate(
            pooled,
            runs,
            num_steps,
            base,
            candidate.name,
            candidate.family,
            candidate.quantiles,
            candidate.rates,
            solve_for,
        )
        return None if fresh.config.codebook in codebooks else fresh

    for name, config in (extra or {}).items():
        fraction, proxy = predict(config, runs, num_steps)
        measure(Candidate(name, config, fraction, proxy))
    evaluations = 0
    biases: list[float] = []
    for candidate in ranked[:max_candidates]:
        if evaluations >= max_evaluations:
            break
        if biases:
            candidate = resolve(candidate, target - sum(biases) / len(biases)) or candidate
            if candidate.config.codebook in codebooks:
                continue
        measure(candidate)
        evaluations += 1
        biases.append(candidate.measured_fraction - candidate.predicted_fraction)

    def within(c: Candidate) -> bool:
        return c.measured_fraction is not None and abs(c.measured_fraction - target) <= tolerance + 1e-12

    # Refinement: re-solve a family that missed the band for the fraction that should land it (a secant step on
    # its measured points), the family with the least error expected at the target first.
    retries: dict[str, int] = {}
    while evaluations < max_evaluations:
        landed = {c.name for c in measured if within(c)}
        families: dict[str, list[Candidate]] = {}
        for c in measured:
            if c.family in ("scale", "shift") and c.name not in landed and retries.get(c.name, 0) < max_retries:
                families.setdefault(c.name, []).append(c)
        slope = _error_slope(measured)
        order = sorted(families.values(), key=lambda points: _expected_error(points, target, slope))
        retried = False
        for points in order:
            name = points[0].name
            retries[name] = retries.get(name, 0) + 1
            fresh = resolve(points[-1], _next_solve_for(points, target))
            if fresh is None:
                continue
            measure(fresh)
            evaluations += 1
            retried = True
            break
        if not retried:
            break

    admitted = [c for c in measured if within(c)]
    unevaluated = [c for c in ranked if c.measured_fraction is None and c.config.codebook not in codebooks]
    if not admitted:
        lines = "; ".join(f"{c.name} {c.measured_fraction:.3f}" for c in measured) or "none measured"
        raise CalibrationError(
            f"no candidate computed {target:.3f} +- {tolerance:.3f} of the steps when measured "
            f"(measured fractions: {lines}); raise the tolerance or max_evaluations, or record more runs"
        )
    winner = min(admitted, key=lambda c: (c.error, c.measured_fraction))
    say(f"  -> {winner.name}: measured {winner.measured_fraction:.3f}, error {winner.error:.4g}")
    return Calibration(winner.config, winner, target, tolerance, measured + unevaluated, evaluations)


def calibrate_config(
    runs: Sequence[Sequence[float]],
    num_steps: int,
    target: str | float = "fast",
    base: AdaCacheConfig | None = None,
    template: str = "fast",
) -> AdaCacheConfig:
    """A config whose codebook comes from recorded runs (each a list of per-step metrics, steps 2..N), by prediction
    only (no measurement; :func:`select_config` measures).

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
