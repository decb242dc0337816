"""AdaCache configuration: one frozen dataclass per concern, defaults and named presets in one place.

Every value that the reference implementation fixes (codebooks, MoReg hyper-parameters, forced steps, windows) is
defined here once; the rest of the package reads it from an `AdaCacheConfig`. See docs/algorithm.md ("The schedule",
"MoReg", "Presets") for the rule these fields parameterise and where each preset comes from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "AdaCacheConfig",
    "MoRegConfig",
    "PRESETS",
    "CODEBOOK_REFERENCE_100",
    "CODEBOOK_FAST_30",
    "CODEBOOK_SLOW_30",
    "CODEBOOK_FAST_50",
    "CODEBOOK_SLOW_50",
    "MOREG_WINDOW_50",
    "MOREG_THRESHOLD_50",
    "MOREG_WINDOW_100",
    "MOREG_WINDOW_30",
    "MAX_FORECAST_ORDER",
    "DECISION_METRICS",
    "CODEBOOK_FAST_50_F2",
    "CODEBOOK_SLOW_50_F2",
    "STRIDE_PRESETS",
    "FORECAST_FORCED_STEPS",
    "FIRST_RATE_TOP",
    "forecast_config",
    "schedule_config",
    "even_grid",
    "InputPolicy",
    "GapPolicy",
    "POLICIES",
    "policy_config",
]

Codebook = tuple[tuple[float, int], ...]

# Forecasting of the cached delta (ours): orders 0 (reuse, the reference) .. MAX_FORECAST_ORDER.
MAX_FORECAST_ORDER = 2
# What the codebook acts on: the reference's change of the tap, or the error of its forecast.
DECISION_METRICS = ("change", "forecast")
# AdaCacheConfig.first_rate meaning "the codebook's largest rate".
FIRST_RATE_TOP = "top"

# Reference codebooks (Open-Sora v1.2), ascending (threshold, rate) pairs.
CODEBOOK_REFERENCE_100: Codebook = ((0.03, 12), (0.05, 10), (0.07, 8), (0.09, 6), (0.11, 4), (1.00, 3))
CODEBOOK_FAST_30: Codebook = ((0.08, 6), (0.16, 5), (0.24, 4), (0.32, 3), (0.40, 2), (1.00, 1))
CODEBOOK_SLOW_30: Codebook = ((0.08, 3), (0.16, 2), (0.24, 1), (0.32, 1), (0.40, 1), (1.00, 1))

# Reference MoReg windows (inclusive, 1-based steps) for the step counts the reference calibrated.
# 50 steps (no published codebook): calibrated on the bundled testbed with `adacache-compile calibrate --steps 50`
# (12 uncached generations, 3 shapes x 4 motion buckets, seeds 1000-1023; thresholds at quantiles of the recorded
# per-step metric; see adacache_compile/calibration.py TEMPLATES and benchmarks/results/calibration_testbed_50.json).
# fast-50: the fast template (rates 6..1) scaled to compute 28 % of the steps on the calibration videos
# (`adacache-compile calibrate --target 0.28 --template fast`); the plain fast template computed 34 %.
CODEBOOK_FAST_50: Codebook = ((0.0647, 6), (0.0704, 5), (0.0780, 4), (0.0891, 3), (0.1393, 2), (1e6, 1))
# slow-50: the slow template (rates 3, 2, 1) scaled to compute 45 % of the steps on the calibration videos
# (`adacache-compile calibrate --target 0.45 --template slow`); the plain slow template computed 61 %.
CODEBOOK_SLOW_50: Codebook = ((0.0671, 3), (0.0810, 2), (1e6, 1))
# Forecasting presets (50 steps; forecast order 2, decision metric "change"). How a forecasting schedule starts and
# ends (ours, config.forecast_config): the first computed step takes the codebook's top rate (first_rate="top")
# instead of the reference's 1, and only steps 1 and N are forced (the reference also forces N-1). The reference's
# steps 2 and N-1 are computed right next to another computed step; a forecast extrapolates best from regularly
# spaced ones (docs/algorithm.md, "Start and end of a forecasting schedule").
# The codebooks come from the measured selection (adacache_compile.calibration.select_config) with that start and
# end, at the compute of the order-0 presets: `adacache-compile calibrate --steps 50 --target fast-50 slow-50
# --forecast-order 2 --decision-metric change --eval-videos 8 --max-candidates 6 --max-evaluations 12`: per-step
# metrics recorded at rate 1 on the 12 calibration videos, the candidate with the highest mean PSNR (against the
# uncached videos, on 8 of them) whose measured compute fraction is within 0.01 of the target wins. Record:
# benchmarks/results/calibration_testbed_50_f2.json. Order 2 beat order 1 and "change" matched "forecast" (mean over
# the targets 0.22, 0.28, 0.40, 0.45: 42.40 vs 42.33 dB) in the sweep benchmarks/results/
# calibration_testbed_50_forecast.json (`--target 0.18 0.22 0.28 0.40 0.45 --forecast-order 1 2 --decision-metric
# change forecast`, same settings otherwise).
# A preset-name target is the measured compute fraction of that preset as shipped (fast-50: 0.245; slow-50: 0.420,
# order 0), and its codebook joins as a candidate in the forecasting start and end (fast-50's: 0.205 at 25.68 dB;
# slow-50's: 0.390 at 46.66 dB).
# fast-50+f2: target 0.245, measured 0.253, 39.01 dB.
CODEBOOK_FAST_50_F2: Codebook = ((0.0491, 5), (0.1057, 4), (1e6, 1))
# slow-50+f2: target 0.420, measured 0.422, 50.04 dB.
CODEBOOK_SLOW_50_F2: Codebook = ((0.055, 3), (0.1185, 2), (1e6, 1))
FORECAST_ORDER_50 = 2
DECISION_METRIC_50 = "change"
FORECAST_FORCED_STEPS = (1, -1)
# Static strides with the second-order forecast (any N): compute steps 1, 1 + k, 1 + 2k, ... and N.
STRIDE_PRESETS = (3, 4, 5)
MOREG_WINDOW_50 = (5, 45)
# MoReg's 0.385 is the motion level of the reference model's residual features at which MoReg is neutral; the
# testbed's median motion inside the window (same calibration run) plays that role for the 50-step presets.
MOREG_THRESHOLD_50 = 0.1765
MOREG_WINDOW_100 = (10, 90)
MOREG_WINDOW_30 = (4, 26)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"{field}: {problem}")


def _pair(value: Any, field: str) -> tuple[Any, Any]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise _fail(field, f"expected a pair (lo, hi), got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class MoRegConfig:
    """Motion regularisation (MoReg) of the AdaCache metric.

    Inside `window` the metric is multiplied by `m' + |g|` where `m = mean_k ||r[k:] - r[:-k]|| / (||r[k:]|| +
    ||r[:-k]||)` along the frame axis, `m' = (m / threshold) ** power / scale` and
    `g = gradient_multiplier * (m' - m'_prev) / rate`; outside it `m' = 1`.

    Attributes:
        strides: frame strides k of the motion estimate (positive ints).
        window: inclusive (lo, hi) range of 1-based steps where motion is measured. Each end is either an int >= 1
            (an absolute step) or a float in (0, 1] (a fraction of the step count N, resolved by `window_for`).
            The default (0.1, 0.9) gives the reference (10, 90) at N = 100.
        threshold: motion level that maps to m' = 1 (reference 0.385).
        power: exponent of the normalised motion (reference 8).
        scale: divisor of the normalised motion (reference 1).
        gradient_multiplier: weight of the motion gradient term (reference 10).
    """

    strides: tuple[int, ...] = (1,)
    window: tuple[float, float] = (0.1, 0.9)
    threshold: float = 0.385
    power: float = 8.0
    scale: float = 1.0
    gradient_multiplier: float = 10.0

    def __post_init__(self) -> None:
        strides = self.strides
        if not isinstance(strides, (tuple, list)) or not strides:
            raise _fail("MoRegConfig.strides", f"expected a non-empty sequence of positive ints, got {strides!r}")
        for index, stride in enumerate(strides):
            if not _is_int(stride) or stride < 1:
                raise _fail(f"MoRegConfig.strides[{index}]", f"expected a positive int, got {stride!r}")
        object.__setattr__(self, "strides", tuple(strides))

        window = _pair(self.window, "MoRegConfig.window")
        for end, value in zip(("lo", "hi"), window):
            field = f"MoRegConfig.window.{end}"
            if _is_int(value):
                if value < 1:
                    raise _fail(field, f"an absolute step must be an int >= 1, got {value!r}")
            elif isinstance(value, float):
                if not 0.0 < value <= 1.0:
                    raise _fail(field, f"a fractional step must be a float in (0, 1], got {value!r}")
            else:
                raise _fail(field, f"expected an int >= 1 (step) or a float in (0, 1] (fraction of N), got {value!r}")
        lo, hi = window
        if type(lo) is type(hi) and lo > hi:
            raise _fail("MoRegConfig.window", f"lo must be <= hi, got {window!r}")
        object.__setattr__(self, "window", window)

        for name in ("threshold", "power", "scale", "gradient_multiplier"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise _fail(f"MoRegConfig.{name}", f"expected a finite number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))

    def window_for(self, num_steps: int) -> tuple[int, int]:
        """The inclusive window in absolute 1-based steps for a generation of `num_steps` steps.

        A fractional end f becomes `round(f * num_steps)`, at least 1. Raises ValueError when an absolute end
        lies outside [1, num_steps] or the resolved window is empty.
        """
        if not _is_int(num_steps) or num_steps < 1:
            raise _fail("num_steps", f"expected an int >= 1, got {num_steps!r}")
        resolved = []
        for end, value in zip(("lo", "hi"), self.window):
            step = value if _is_int(value) else max(1, round(value * num_steps))
            if not 1 <= step <= num_steps:
                raise _fail(
                    f"MoRegConfig.window.{end}",
                    f"step {step} lies outside [1, N] for N = {num_steps} steps; use a window within 1..{num_steps} "
                    "or fractions of N",
                )
            resolved.append(step)
        lo, hi = resolved
        if lo > hi:
            raise _fail("MoRegConfig.window", f"resolves to ({lo}, {hi}) for N = {num_steps}: lo must be <= hi")
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        return {
            "strides": list(self.strides),
            "window": list(self.window),
            "threshold": self.threshold,
            "power": self.power,
            "scale": self.scale,
            "gradient_multiplier": self.gradient_multiplier,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoRegConfig:
        return cls(**_known_fields(cls, data))


def _positive(owner: str, name: str, value: Any, *, integer: bool = False) -> None:
    if integer:
        if not _is_int(value) or value < 1:
            raise _fail(f"{owner}.{name}", f"expected an int >= 1, got {value!r}")
    elif not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise _fail(f"{owner}.{name}", f"expected a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class InputPolicy:
    """Decide before each step from the step's own input (ours; the TeaCache / MagCache / SeaCache family):
    the relative L1 change of the model's latent input since the previous step, ``||x_i - x_{i-1}||_1 /
    ||x_{i-1}||_1``, is accumulated over the steps since the last computed one; a step is computed when the sum
    reaches ``threshold`` (the sum then starts again from 0) or after ``max_skips`` skipped steps in a row.

    Attributes:
        threshold: accumulated relative change at which a step is computed (> 0).
        max_skips: the most steps skipped in a row (>= 1).
        input: the model input that holds the latent (a capture input name); None: ``hidden_states`` (or
            ``sample``, ``latents``, ``x``) if the model has one, else its first input.
    """

    threshold: float
    max_skips: int = 4
    input: str | None = None

    kind = "input"

    def __post_init__(self) -> None:
        _positive("InputPolicy", "threshold", self.threshold)
        _positive("InputPolicy", "max_skips", self.max_skips, integer=True)
        if self.input is not None and not (isinstance(self.input, str) and self.input):
            raise _fail("InputPolicy.input", f"expected a model input name or None, got {self.input!r}")
        object.__setattr__(self, "threshold", float(self.threshold))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "threshold": self.threshold, "max_skips": self.max_skips, "input": self.input}


@dataclass(frozen=True)
class GapPolicy:
    """Error-controlled gaps between computed steps (ours), set as an ODE solver sets its step size: at each
    computed step the fused delta just computed is compared with the delta the forecast (``forecast_order``) from
    the earlier computed steps predicts for this step — the error a skip to here would have made, relative L1
    ``e`` — and the next gap becomes ``h * clip(safety * (tolerance / e) ** (1 / (p + 1)), shrink, grow)`` (``h`` the
    gap just taken, ``p`` the order the forecast had), at most ``max_gap``.

    Attributes:
        tolerance: the relative forecast error per computed step to aim at (> 0).
        max_gap: the largest gap (>= 1).
        first_gap: the gap after the first computed step, which has nothing to measure yet (>= 1).
        safety, shrink, grow: the controller's safety factor and the clip of the gap's change per computed step.
    """

    tolerance: float
    max_gap: int = 8
    first_gap: int = 2
    safety: float = 0.9
    shrink: float = 0.5
    grow: float = 2.0

    kind = "gap"

    def __post_init__(self) -> None:
        _positive("GapPolicy", "tolerance", self.tolerance)
        for name in ("max_gap", "first_gap"):
            _positive("GapPolicy", name, getattr(self, name), integer=True)
        for name in ("safety", "shrink", "grow"):
            _positive("GapPolicy", name, getattr(self, name))
            object.__setattr__(self, name, float(getattr(self, name)))
        if not self.shrink <= 1.0 <= self.grow:
            raise _fail("GapPolicy", f"expected shrink <= 1 <= grow, got shrink={self.shrink}, grow={self.grow}")
        object.__setattr__(self, "tolerance", float(self.tolerance))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tolerance": self.tolerance,
            "max_gap": self.max_gap,
            "first_gap": self.first_gap,
            "safety": self.safety,
            "shrink": self.shrink,
            "grow": self.grow,
        }


# Step policies other than the AdaCache rule, by their ``kind``.
POLICIES = {policy.kind: policy for policy in (InputPolicy, GapPolicy)}


def _policy_from(value: Any):
    if value is None or isinstance(value, tuple(POLICIES.values())):
        return value
    if isinstance(value, dict):
        data = dict(value)
        kind = data.pop("kind", None)
        if kind not in POLICIES:
            raise _fail("AdaCacheConfig.policy.kind", f"expected one of {sorted(POLICIES)}, got {kind!r}")
        return POLICIES[kind](**_known_fields(POLICIES[kind], data))
    raise _fail(
        "AdaCacheConfig.policy", f"expected an InputPolicy, a GapPolicy, a dict with a 'kind' or None, got {value!r}"
    )


@dataclass(frozen=True)
class AdaCacheConfig:
    """How AdaCache decides which denoising steps to compute, and what it caches.

    Attributes:
        codebook: ascending (threshold, rate) pairs; a computed step with metric c picks the rate of the first pair
            with c < threshold, else the last pair's rate. Thresholds must be > 0 and strictly ascending; rates are
            ints >= 1. Required by the AdaCache rule; None with another ``policy``.
        forced_steps: steps that are always computed. Positive values are 1-based steps, negative values count from
            the end (-1 = N, -2 = N-1). The reference forces 1, N-1 and N. Zero is not allowed.
        tap: the block whose self-attention residual feeds the metric: an index into the plan's block list (Python
            indexing, so negatives count from the end), a qualified block name, or None for the mid-depth block
            `len(blocks) // 2`.
        region: the cached region as [start, stop) block indices, or None for every block.
        moreg: motion regularisation, or None to leave the metric as is.
        norm_ord: order of the norms of the metric (1, the reference default, or 2).
        enabled: False computes every step; the output then equals the uncached model's.
        forecast_order: what a skip step adds for the cached blocks (ours, docs/algorithm.md "Forecasting the
            delta"): 0 reuses the last computed step's fused delta (the reference); 1 or 2 extrapolate it, in the step
            index, from the deltas of the last 2 or 3 computed steps (fewer while fewer exist). Costs (order + 1)
            deltas of memory.
        decision_metric: what the codebook acts on: "change" (the reference: rel-L1 change of the tap since the last
            computed step) or "forecast" (rel-L1 error of the tap forecast, at forecast_order, from the previous
            computed taps: the error a forecasting skip would have made). Both are divided by the rate in force.
        first_rate: the rate decided on the first computed step, which has no metric yet (ours; the reference: 1,
            so step 2 is always computed): an int >= 1, or "top" for the codebook's largest rate. A static stride k
            with ``first_rate="top"`` computes the regular grid 1, 1 + k, 1 + 2k, ... (plus the forced steps), the
            spacing a forecast extrapolates best from.
        policy: what decides which steps to compute: None for the AdaCache rule (the codebook, with MoReg and the
            decision metric), or :class:`InputPolicy` / :class:`GapPolicy` (ours; docs/algorithm.md "Policies").
            Every policy runs on the same programs and keeps ``forced_steps`` and ``forecast_order``.
    """

    codebook: Codebook | None = None
    forced_steps: tuple[int, ...] = (1, -2, -1)
    tap: int | str | None = None
    region: tuple[int, int] | None = None
    moreg: MoRegConfig | None = None
    norm_ord: int = 1
    enabled: bool = True
    forecast_order: int = 0
    decision_metric: str = "change"
    first_rate: int | str = 1
    policy: InputPolicy | GapPolicy | None = None

    def __post_init__(self) -> None:
        policy = _policy_from(self.policy)
        object.__setattr__(self, "policy", policy)
        if policy is None or self.codebook is not None:
            object.__setattr__(self, "codebook", _validated_codebook(self.codebook))
        if policy is not None:
            for name, value, default in (
                ("moreg", self.moreg, None),
                ("decision_metric", self.decision_metric, "change"),
                ("first_rate", self.first_rate, 1),
            ):
                if value != default:
                    raise _fail(
                        f"AdaCacheConfig.{name}",
                        f"{value!r} is a setting of the AdaCache rule, which policy={policy.kind!r} replaces; "
                        f"leave it at {default!r} (or set policy=None)",
                    )

        forced = self.forced_steps
        if not isinstance(forced, (tuple, list)):
            raise _fail("AdaCacheConfig.forced_steps", f"expected a sequence of non-zero ints, got {forced!r}")
        for index, step in enumerate(forced):
            if not _is_int(step) or step == 0:
                raise _fail(
                    f"AdaCacheConfig.forced_steps[{index}]",
                    f"expected a non-zero int (1-based step, or negative from the end), got {step!r}",
                )
        object.__setattr__(self, "forced_steps", tuple(forced))

        tap = self.tap
        if not (tap is None or _is_int(tap) or (isinstance(tap, str) and tap)):
            raise _fail("AdaCacheConfig.tap", f"expected a block index, a non-empty block name or None, got {tap!r}")

        if self.region is not None:
            start, stop = _pair(self.region, "AdaCacheConfig.region")
            if not (_is_int(start) and _is_int(stop) and 0 <= start < stop):
                raise _fail(
                    "AdaCacheConfig.region",
                    f"expected [start, stop) block indices with 0 <= start < stop, got {self.region!r}",
                )
            object.__setattr__(self, "region", (start, stop))

        moreg = self.moreg
        if isinstance(moreg, dict):
            moreg = MoRegConfig.from_dict(moreg)
        if moreg is not None and not isinstance(moreg, MoRegConfig):
            raise _fail("AdaCacheConfig.moreg", f"expected a MoRegConfig or None, got {moreg!r}")
        object.__setattr__(self, "moreg", moreg)

        if not _is_int(self.norm_ord) or self.norm_ord not in (1, 2):
            raise _fail("AdaCacheConfig.norm_ord", f"expected 1 or 2, got {self.norm_ord!r}")
        if not isinstance(self.enabled, bool):
            raise _fail("AdaCacheConfig.enabled", f"expected a bool, got {self.enabled!r}")
        if not _is_int(self.forecast_order) or not 0 <= self.forecast_order <= MAX_FORECAST_ORDER:
            raise _fail(
                "AdaCacheConfig.forecast_order",
                f"expected an int in 0..{MAX_FORECAST_ORDER} (0 reuses the delta, 1 linear, 2 quadratic), got "
                f"{self.forecast_order!r}",
            )
        if self.decision_metric not in DECISION_METRICS:
            raise _fail(
                "AdaCacheConfig.decision_metric", f"expected one of {DECISION_METRICS}, got {self.decision_metric!r}"
            )
        if self.first_rate != FIRST_RATE_TOP and not (_is_int(self.first_rate) and self.first_rate >= 1):
            raise _fail(
                "AdaCacheConfig.first_rate",
                f"expected an int >= 1 (the rate after the first computed step; 1 is the reference) or "
                f"{FIRST_RATE_TOP!r} (the codebook's largest rate), got {self.first_rate!r}",
            )

    @classmethod
    def preset(cls, name: str) -> AdaCacheConfig:
        """The named preset from `PRESETS`; ValueError listing the known names for an unknown one."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown AdaCache preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None

    @property
    def policy_name(self) -> str:
        """``"adacache"`` (the codebook rule) or the policy's kind."""
        return "adacache" if self.policy is None else self.policy.kind

    def resolved_first_rate(self) -> int:
        """:attr:`first_rate` as a rate: ``"top"`` is the codebook's largest rate."""
        return max(rate for _, rate in self.codebook) if self.first_rate == FIRST_RATE_TOP else self.first_rate

    def forced_for(self, num_steps: int) -> frozenset[int]:
        """The forced steps resolved to 1-based steps of a `num_steps`-step generation; those outside 1..N dropped."""
        if not _is_int(num_steps) or num_steps < 1:
            raise _fail("num_steps", f"expected an int >= 1, got {num_steps!r}")
        resolved = (step if step > 0 else num_steps + 1 + step for step in self.forced_steps)
        return frozenset(step for step in resolved if 1 <= step <= num_steps)

    def replace(self, **changes: Any) -> AdaCacheConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the codebook is a list of [threshold, rate]."""
        return {
            "codebook": None if self.codebook is None else [[threshold, rate] for threshold, rate in self.codebook],
            "forced_steps": list(self.forced_steps),
            "tap": self.tap,
            "region": None if self.region is None else list(self.region),
            "moreg": None if self.moreg is None else self.moreg.to_dict(),
            "norm_ord": self.norm_ord,
            "enabled": self.enabled,
            "forecast_order": self.forecast_order,
            "decision_metric": self.decision_metric,
            "first_rate": self.first_rate,
            "policy": None if self.policy is None else self.policy.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaCacheConfig:
        # A dict under "moreg" becomes a MoRegConfig in __post_init__.
        return cls(**_known_fields(cls, data))

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The config as JSON text; also written to `path` when one is given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike[str]) -> AdaCacheConfig:
        """A config from JSON text (a string starting with '{') or from the file at a path."""
        if isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{"):
            text, source = path_or_text, "JSON text"
        else:
            text, source = Path(path_or_text).read_text(encoding="utf-8"), str(path_or_text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"AdaCacheConfig.from_json: {source} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"AdaCacheConfig.from_json: {source} holds {type(data).__name__}, expected an object")
        return cls.from_dict(data)


def _validated_codebook(codebook: Any) -> Codebook:
    if isinstance(codebook, dict):
        raise _fail(
            "AdaCacheConfig.codebook",
            "expected a sequence of (threshold, rate) pairs, got a dict; use codebook.items()",
        )
    if not isinstance(codebook, (tuple, list)) or not codebook:
        raise _fail(
            "AdaCacheConfig.codebook", f"expected a non-empty sequence of (threshold, rate) pairs, got {codebook!r}"
        )
    pairs = []
    for index, entry in enumerate(codebook):
        field = f"AdaCacheConfig.codebook[{index}]"
        threshold, rate = _pair(entry, field)
        if not _is_real(threshold) or not math.isfinite(threshold) or threshold <= 0:
            raise _fail(field, f"threshold must be a finite number > 0, got {threshold!r}")
        if not _is_int(rate) or rate < 1:
            raise _fail(field, f"rate must be an int >= 1, got {rate!r}")
        if pairs and threshold <= pairs[-1][0]:
            raise _fail(field, f"thresholds must be strictly ascending, got {threshold!r} after {pairs[-1][0]!r}")
        pairs.append((float(threshold), rate))
    return tuple(pairs)


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}.from_dict: expected a dict, got {type(data).__name__}")
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown field(s) {unknown}; known fields: {sorted(names)}")
    return dict(data)


def _reference_presets() -> dict[str, AdaCacheConfig]:
    presets = {}
    for name, codebook, window in (
        ("reference-100", CODEBOOK_REFERENCE_100, MOREG_WINDOW_100),
        ("fast-30", CODEBOOK_FAST_30, MOREG_WINDOW_30),
        ("slow-30", CODEBOOK_SLOW_30, MOREG_WINDOW_30),
    ):
        presets[name] = AdaCacheConfig(codebook=codebook)
        presets[f"{name}+moreg"] = AdaCacheConfig(codebook=codebook, moreg=MoRegConfig(window=window))
    for name, codebook in (("fast-50", CODEBOOK_FAST_50), ("slow-50", CODEBOOK_SLOW_50)):
        presets[name] = AdaCacheConfig(codebook=codebook)
        presets[f"{name}+moreg"] = AdaCacheConfig(
            codebook=codebook, moreg=MoRegConfig(window=MOREG_WINDOW_50, threshold=MOREG_THRESHOLD_50)
        )
    for stride in STRIDE_PRESETS:
        presets[f"stride-{stride}+f2"] = forecast_config(((1e9, stride),), 2)
    for name, codebook in (("fast-50", CODEBOOK_FAST_50_F2), ("slow-50", CODEBOOK_SLOW_50_F2)):
        presets[f"{name}+f{FORECAST_ORDER_50}"] = forecast_config(codebook, FORECAST_ORDER_50, DECISION_METRIC_50)
    return presets


def forecast_config(codebook: Codebook, forecast_order: int, decision_metric: str = "change") -> AdaCacheConfig:
    """A forecasting config as the forecast presets are built: ``codebook`` (a one-entry codebook is a static
    stride), ``first_rate="top"`` (the first computed step takes the codebook's largest rate, also after
    ``replace(codebook=...)``) and only steps 1 and N forced (:data:`FORECAST_FORCED_STEPS`)."""
    return AdaCacheConfig(
        codebook=codebook,
        forecast_order=forecast_order,
        decision_metric=decision_metric,
        first_rate=FIRST_RATE_TOP,
        forced_steps=FORECAST_FORCED_STEPS,
    )


# The rate of a fixed schedule: after step 1 no rate ever elapses, only the forced steps are computed.
_NEVER = 10**9


def schedule_config(steps: Sequence[int], forecast_order: int = 0) -> AdaCacheConfig:
    """A fixed schedule: computes exactly ``steps`` (1-based, step 1 among them; a step past a generation's N is
    ignored) and skips every other step, reusing (order 0) or forecasting the cached delta at ``forecast_order``. For a
    schedule chosen offline, e.g. by ``benchmarks/schedule_search.py``, or an evenly spaced one (:func:`even_grid`)."""
    steps = list(steps)
    if not steps or any(not _is_int(s) or s < 1 for s in steps) or steps != sorted(set(steps)) or steps[0] != 1:
        raise _fail(
            "schedule_config(steps)", f"expected increasing 1-based step numbers starting with 1, got {steps!r}"
        )
    return forecast_config(((_NEVER, _NEVER),), forecast_order).replace(forced_steps=tuple(steps))


def policy_config(policy: InputPolicy | GapPolicy, forecast_order: int = 1) -> AdaCacheConfig:
    """A config run by ``policy`` with the forecasting start and end (only steps 1 and N forced,
    :data:`FORECAST_FORCED_STEPS`) and ``forecast_order``."""
    return AdaCacheConfig(policy=policy, forecast_order=forecast_order, forced_steps=FORECAST_FORCED_STEPS)


def even_grid(count: int, num_steps: int) -> list[int]:
    """``count`` computed steps spread evenly over 1..N, both ends included (rounded to whole steps)."""
    if not _is_int(count) or not 2 <= count <= num_steps:
        raise _fail("even_grid(count)", f"expected an int in 2..{num_steps}, got {count!r}")
    return sorted({round(1 + (num_steps - 1) * i / (count - 1)) for i in range(count)})


# Named presets. Add a step count by adding its "<name>" and "<name>+moreg" entries here.
PRESETS: dict[str, AdaCacheConfig] = _reference_presets()
