"""The benchmark's method record (:class:`BenchMethod`) and our methods: the AdaCache presets, the forecasting
presets the library ships, and fixed schedules (static strides, evenly spaced grids) through our own programs."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from adacache_compile.testbed.demo import Method

__all__ = [
    "DEFAULT_REPEATS",
    "BenchMethod",
    "our_method",
    "adacache_methods",
    "forecast_preset_names",
    "forecast_methods",
    "static_group",
    "static_methods",
    "even_grid_methods",
    "calibrated_methods",
    "target_grid_methods",
    "CALIBRATION_TARGETS",
    "TARGET_GRID_ORDERS",
    "has_forecasting",
    "forecast_order",
]

logger = logging.getLogger(__name__)

DEFAULT_REPEATS = 3
STATIC_STRIDES = (2, 3, 4, 5)
# Forecasting static strides: the same one-entry codebooks with each forecast order (ours, AdaCacheConfig.forecast_order).
STATIC_FORECAST_ORDERS = (1, 2)
# Evenly spaced schedules of these many computed steps (steps 1 and N included) with the forecast presets' order:
# static comparators at the forecast presets' compute that integer strides cannot express.
EVEN_GRID_COUNTS = (11, 12, 13, 14, 20, 21)
EVEN_GRID_ORDER = 2
# The compute fractions `calibrate` is run at with default arguments (benchmarks/results/calibration_<testbed>.json),
# and the forecast orders of the evenly spaced grids at those computes: its comparator "the best fixed grid, any
# stride or even spacing, any forecast order, at equal compute".
CALIBRATION_TARGETS = (0.2, 0.28, 0.35, 0.45, 0.5)
TARGET_GRID_ORDERS = (0, 1, 2)
CALIBRATED_GROUP = "calibrate (defaults)"


@dataclass
class BenchMethod(Method):
    """A :class:`Method` with what the bench needs on top.

    ``family``: "uncached", "adacache", "static", "hook" or "cache-dit"; ``group``: the series of the Pareto plot
    (one marker / line per group). ``hook``: for a diffusers hook, a factory of its config given the
    :class:`~diffusers_hooks.HookedDenoiser` (the timestep callback, the testbed, the step count); ``uncond_first``
    puts the unconditional half first for it; ``on_layers``: the hook is enabled on the testbed's one list of whole
    layers (``adapters.layer_stack``; block-stack hooks), not on the transformer; ``calibration``: what must run on
    calibration videos before it (``diffusers_hooks.MagCacheCalibration``). ``cache_dit``: for cache-dit, a factory
    ``num_steps -> (DBCacheConfig, calibrator config or None)``. ``repeats``: timed rounds. ``compute_fraction`` /
    ``compute_source``: fraction of block compute and how it was obtained ("schedule" for ours, "linear FLOPs"
    measured for peers). ``peer_computed``: per video the steps on which a peer ran every layer (cache-dit's own
    record; for block-stack hooks the steps on which the last block ran); ``peer_warnings``: what a peer's library
    warned while it ran on video 1.
    """

    family: str = "adacache"
    hook: Callable[[object], object] | None = None
    uncond_first: bool = False
    on_layers: bool = False
    calibration: object | None = None
    cache_dit: Callable[[int], tuple[object, object | None]] | None = None
    group: str = ""
    repeats: int = 1
    round_seconds: list[float] = field(default_factory=list)
    compute_fraction: float | None = None
    compute_source: str = "n/a"
    peer_computed: list[int] = field(default_factory=list)
    peer_warnings: list[str] = field(default_factory=list)

    @property
    def peer(self) -> bool:
        """A method of another project (diffusers hook or cache-dit), run on the model itself."""
        return self.hook is not None or self.cache_dit is not None


def our_method(label: str, config, group: str = "AdaCache", repeats: int = DEFAULT_REPEATS) -> BenchMethod:
    """One method of ours: ``config`` (an ``AdaCacheConfig``) run through our programs, ``repeats`` timed rounds."""
    return BenchMethod(label, config, family="adacache", group=group, repeats=repeats)


def _preset(name: str, num_steps: int):
    """The preset calibrated for `num_steps` ("fast-50"), else the 30-step reference one with a warning."""
    from adacache_compile.config import AdaCacheConfig

    variant, _, suffix = name.partition("+")
    wanted = f"{variant}-{num_steps}" + (f"+{suffix}" if suffix else "")
    try:
        return wanted, AdaCacheConfig.preset(wanted)
    except ValueError:
        fallback = f"{variant}-30" + (f"+{suffix}" if suffix else "")
        logger.warning("no preset %r; using %r", wanted, fallback)
        return fallback, AdaCacheConfig.preset(fallback)


def has_forecasting() -> bool:
    """Whether this library's AdaCacheConfig has the forecasting fields (forecast_order, decision_metric)."""
    from adacache_compile.config import AdaCacheConfig

    return "forecast_order" in {f.name for f in dataclasses.fields(AdaCacheConfig)}


def forecast_order(config) -> int:
    return getattr(config, "forecast_order", 0) if config is not None else 0


def adacache_methods(num_steps: int, repeats: int = DEFAULT_REPEATS) -> list[BenchMethod]:
    """AdaCache fast/slow, each with and without MoReg, from the presets for `num_steps` (forecast order 0)."""
    methods = []
    for name in ("fast", "fast+moreg", "slow", "slow+moreg"):
        preset, config = _preset(name, num_steps)
        label = "AdaCache-" + name.replace("+moreg", "+MoReg")
        methods.append(our_method(f"{label} ({preset})", config, repeats=repeats))
    return methods


def forecast_preset_names(num_steps: int) -> list[str]:
    """The forecasting presets the library ships (names containing "+f"), those for `num_steps` when there are any."""
    from adacache_compile.config import PRESETS

    names = sorted(name for name in PRESETS if "+f" in name)
    own = [name for name in names if name.split("+")[0].endswith(f"-{num_steps}")]
    return own or names


def forecast_methods(num_steps: int, repeats: int = DEFAULT_REPEATS) -> list[BenchMethod]:
    """Every forecasting preset (`forecast_preset_names`), labelled ``AdaCache-fast+f1 (fast-50+f1)``."""
    from adacache_compile.config import AdaCacheConfig

    methods = []
    for preset in forecast_preset_names(num_steps):
        config = AdaCacheConfig.preset(preset)
        variant, *suffixes = preset.split("+")
        label = "AdaCache-" + "+".join([variant.rsplit("-", 1)[0], *(x.replace("moreg", "MoReg") for x in suffixes)])
        methods.append(
            our_method(f"{label} ({preset})", config, group=f"AdaCache +f{forecast_order(config)}", repeats=repeats)
        )
    return methods


def static_group(order: int, even: bool = False) -> str:
    """The plot series and comparator of a fixed schedule: ``static`` (order 0), ``static +f2``, ``static even +f2``."""
    kind = "static even" if even else "static"
    return f"{kind} +f{order}" if order else kind


def static_methods(strides=STATIC_STRIDES, forecast_orders=(0,)) -> list[BenchMethod]:
    """Compute every k-th step (plus the forced steps) through our own programs: a one-entry codebook; with a
    forecast order > 0 the skip steps forecast the cached delta at that order (labelled ``static k=2 +f1``)."""
    from adacache_compile.config import AdaCacheConfig, forecast_config

    methods = []
    for order in forecast_orders:
        suffix, group = (f" +f{order}" if order else ""), static_group(order)
        for k in strides:
            # Each order with the start and forced steps of its presets: the reference's at order 0, the forecast
            # presets' regular grid (1, 1 + k, ..., N) otherwise, so that "adaptivity pays" compares like with like.
            config = forecast_config(((1e9, k),), order) if order else AdaCacheConfig(codebook=((1e9, k),))
            methods.append(BenchMethod(f"static k={k}{suffix}", config, family="static", group=group))
    return methods


def even_grid_methods(num_steps: int, counts=EVEN_GRID_COUNTS, order: int = EVEN_GRID_ORDER) -> list[BenchMethod]:
    """Fixed schedules of ``count`` computed steps spread evenly over 1..N (``config.even_grid``), forecasting at
    ``order``: labelled ``static even n=13 +f2``."""
    from adacache_compile.config import even_grid, schedule_config

    return [
        BenchMethod(
            f"static even n={count} +f{order}",
            schedule_config(even_grid(count, num_steps), order),
            family="static",
            group=static_group(order, even=True),
        )
        for count in counts
        if count <= num_steps
    ]


def calibrated_methods(testbed: str, num_steps: int, repeats: int = DEFAULT_REPEATS, results=None) -> list[BenchMethod]:
    """The configs ``adacache-compile calibrate --testbed <testbed>`` chose with default arguments at
    :data:`CALIBRATION_TARGETS` on the calibration videos (disjoint from the benchmark's), read from the committed
    record ``results/calibration_<testbed>.json``, labelled ``calibrate@0.28 (<winner>)``; none when the record is
    missing or was made for another step count."""
    import json
    from pathlib import Path

    from adacache_compile.config import AdaCacheConfig

    path = Path(results or Path(__file__).resolve().parent.parent / "results") / f"calibration_{testbed}.json"
    if not path.exists():
        logger.warning("no %s: no calibrated configs in this run", path)
        return []
    report = json.loads(path.read_text())
    if report["num_steps"] != num_steps:
        logger.warning("%s was calibrated for %d steps, not %d: left out", path, report["num_steps"], num_steps)
        return []
    return [
        our_method(
            f"calibrate@{target} ({result['winner']})",
            AdaCacheConfig.from_dict(result["config"]),
            group=CALIBRATED_GROUP,
            repeats=repeats,
        )
        for target, result in report["targets"].items()
    ]


def target_grid_methods(num_steps: int) -> list[BenchMethod]:
    """Evenly spaced grids at the compute of every calibration target, at every forecast order (those
    :func:`even_grid_methods` does not run already)."""
    counts = sorted({max(2, round(f * num_steps)) for f in CALIBRATION_TARGETS})
    methods = []
    for order in TARGET_GRID_ORDERS:
        have = set(EVEN_GRID_COUNTS) if order == EVEN_GRID_ORDER else set()
        methods += even_grid_methods(num_steps, [c for c in counts if c not in have], order)
    return methods
