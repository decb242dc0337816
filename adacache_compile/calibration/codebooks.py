"""Codebooks from recorded runs: where the AdaCache rule's thresholds go, and how its schedule is simulated on the
per-step metrics of a recorded run.

The reference published codebooks only for 30 and 100 steps and calibrated them from baseline runs on a few prompts;
this module places codebooks on a user's own recorded metrics: :func:`recorder_config` records the metric the target
config acts on (a rate-1 run: every step computed, its output the uncached one), :func:`placed_codebook` puts a rate
ladder's thresholds on the recorded metrics (the quantiles *scaled*, or *shifted* in logit space), and
:func:`simulate` / :func:`predict` run the rule on the recorded metrics. :func:`codebook_families` turns ladders and
templates into the one-parameter families the measured selection (:mod:`.select`) solves for a target compute.
:func:`codebook_from_metrics` (template quantiles) and :func:`calibrate_config` (the template scaled until the
predicted fraction is hit, by prediction only) stay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..config import AdaCacheConfig, MoRegConfig, forecast_config
from ..schedule import Schedule, StepMetrics
from .families import Family

__all__ = [
    "RECORD_CONFIG",
    "TEMPLATES",
    "LADDERS",
    "recorder_config",
    "base_config",
    "metric_growth",
    "codebook_from_metrics",
    "placed_codebook",
    "codebook_families",
    "simulate",
    "predict",
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


def _even_quantiles(count: int, lo: float = 0.3, hi: float = 0.9) -> tuple[float, ...]:
    """``count`` quantiles evenly spaced over [lo, hi] (the span of the fast template); one sits at the middle."""
    if count == 1:
        return ((lo + hi) / 2,)
    return tuple(lo + (hi - lo) * j / (count - 1) for j in range(count))


# Parameter ranges of the families: scale factors (log bisection) and logit shifts.
_SCALE_RANGE = (1e-3, 1e3)
_SHIFT_RANGE = (-12.0, 12.0)


def codebook_families(
    metrics: Sequence[float],
    base: AdaCacheConfig,
    ladders: Sequence[Sequence[int]] = LADDERS,
    templates: Mapping[str, Sequence[tuple[float, int]]] | None = None,
) -> list[Family]:
    """The AdaCache rule's one-parameter families on the pooled recorded ``metrics``: for every template (default
    :data:`TEMPLATES`) its quantiles scaled (``scale:<name>``) and shifted (``shift:<name>``); for every ladder its
    quantiles spaced evenly over [0.3, 0.9], scaled and shifted (a one-rate ladder has one threshold, which both move
    alike: ``shift`` only). Everything but the codebook comes from ``base`` (forecast order, start and end, ...)."""
    pooled = _finite(metrics)
    shapes = []
    for name, pairs in (TEMPLATES if templates is None else templates).items():
        quantiles, rates = zip(*pairs)
        shapes.append((name, tuple(quantiles), tuple(rates)))
    for ladder in ladders:
        shapes.append(("-".join(map(str, ladder)), _even_quantiles(len(ladder)), tuple(ladder)))
    families = []
    for shape, quantiles, rates in shapes:
        for placement in ("scale", "shift") if len(rates) > 1 else ("shift",):

            def make(param: float, quantiles=quantiles, rates=rates, placement=placement) -> AdaCacheConfig:
                return base.replace(codebook=placed_codebook(pooled, quantiles, rates, placement, param))

            lo, hi = _SCALE_RANGE if placement == "scale" else _SHIFT_RANGE
            families.append(
                Family(
                    f"{placement}:{shape}",
                    make,
                    lo,
                    hi,
                    log=placement == "scale",
                    kind="adacache",
                    order=base.forecast_order,
                    info={"quantiles": list(quantiles), "rates": list(rates)},
                )
            )
    return families


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
