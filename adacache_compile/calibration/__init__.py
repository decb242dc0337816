"""Calibration from recorded runs: which config to run at a target compute, chosen by measured error.

- :mod:`.codebooks`: the AdaCache rule's codebooks placed on recorded metrics, and the rule simulated on them.
- :mod:`.families`: the one-parameter families a calibration solves for a target compute (codebooks, fixed grids,
  the input and the gap policy, at each forecast order).
- :mod:`.simulation`: recorded runs (metrics, input changes, samples of the fused deltas) and every config
  simulated on them, with one error proxy for all.
- :mod:`.select`: the measured selection (simulate, rank, measure the best, refine onto the target, keep the least
  measured error; the nearest with a warning when none lands).
- :mod:`.search`: the default search over forecast order, policy and placement (``calibrate`` with default
  arguments).

Recording a pipeline or a loop and measuring its candidates: :mod:`adacache_compile.pipeline_calibration`; the
bundled testbeds and ``adacache-compile calibrate``: :mod:`adacache_compile.testbed.calibrate`.
"""

from .codebooks import (
    LADDERS,
    RECORD_CONFIG,
    TEMPLATES,
    base_config,
    calibrate_config,
    codebook_families,
    codebook_from_metrics,
    metric_growth,
    metrics_from_stats,
    moreg_threshold,
    motions_from_stats,
    placed_codebook,
    predict,
    recorder_config,
    simulate,
)
from .families import KINDS, Family, gap_families, grid_families, grid_steps, input_families
from .search import SEARCH_LADDERS, SEARCH_ORDERS, search_config, search_families
from .select import (
    Calibration,
    CalibrationError,
    CalibrationWarning,
    Candidate,
    _next_solve_for,
    candidate_configs,
    default_tolerance,
    select,
    select_config,
    solve_family,
)
from .simulation import MetricPredictor, RecordedRun, RunPredictor, recorded_runs

__all__ = [
    "LADDERS",
    "RECORD_CONFIG",
    "TEMPLATES",
    "KINDS",
    "SEARCH_LADDERS",
    "SEARCH_ORDERS",
    "base_config",
    "calibrate_config",
    "codebook_families",
    "codebook_from_metrics",
    "metric_growth",
    "metrics_from_stats",
    "moreg_threshold",
    "motions_from_stats",
    "placed_codebook",
    "predict",
    "recorder_config",
    "simulate",
    "Family",
    "gap_families",
    "grid_families",
    "grid_steps",
    "input_families",
    "search_config",
    "search_families",
    "Calibration",
    "CalibrationError",
    "CalibrationWarning",
    "Candidate",
    "_next_solve_for",
    "candidate_configs",
    "default_tolerance",
    "select",
    "select_config",
    "solve_family",
    "MetricPredictor",
    "RecordedRun",
    "RunPredictor",
    "recorded_runs",
]
