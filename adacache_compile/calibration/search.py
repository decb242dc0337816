"""The default calibration: one search over forecast order, what decides the steps (the AdaCache rule's codebooks,
fixed grids with their placement, the input policy, the gap policy) and each one's parameter, chosen by the error
measured on the user's own runs at the target compute.

:func:`search_families` builds the search space (a user pins any part of it with ``orders`` / ``kinds``);
:func:`search_config` simulates every family on the recorded runs (:class:`~.simulation.RunPredictor`), measures
the most promising of each (kind, order) group and the refinements that land them on the target
(:func:`~.select.select` with ``diverse=True``). Its cost is one uncached generation per calibration input (the
recording, which also gives the references) plus one cached generation per input and evaluation; the report says
how many of each it ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..config import MAX_FORECAST_ORDER, AdaCacheConfig
from .codebooks import _finite, base_config, codebook_families
from .families import KINDS, Family, gap_families, grid_families, input_families
from .select import Calibration, CalibrationError, select
from .simulation import RecordedRun, RunPredictor

__all__ = ["SEARCH_ORDERS", "SEARCH_LADDERS", "search_families", "search_config"]

SEARCH_ORDERS = tuple(range(MAX_FORECAST_ORDER + 1))
# The AdaCache rule's ladders in the default search (a subset of LADDERS: one, two and the reference's fast shape).
SEARCH_LADDERS = ((2,), (3,), (4,), (5,), (3, 2), (4, 3), (5, 4), (6, 4, 2), (6, 5, 4, 3, 2))


def search_families(
    runs: Sequence[RecordedRun],
    num_steps: int,
    orders: Sequence[int] = SEARCH_ORDERS,
    kinds: Sequence[str] = KINDS,
    ladders: Sequence[Sequence[int]] = SEARCH_LADDERS,
    decision_metric: str = "change",
) -> list[Family]:
    """Every family of the search: per forecast order in ``orders`` and kind in ``kinds``. The AdaCache rule's
    codebooks are placed on the pooled recorded metrics, with the reference's start and end at order 0 and the
    forecasting ones (:func:`~.codebooks.base_config`) above."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise CalibrationError(f"calibration kinds {list(kinds)}: expected a non-empty subset of {list(KINDS)}")
    bad = [o for o in orders if o not in SEARCH_ORDERS]
    if bad or not orders:
        raise CalibrationError(f"forecast orders {list(orders)}: expected a non-empty subset of {list(SEARCH_ORDERS)}")
    families: list[Family] = []
    pooled = _finite([m for run in runs for m in run.metrics]) if "adacache" in kinds else []
    for order in orders:
        if "adacache" in kinds:
            families += codebook_families(pooled, base_config(order, decision_metric), ladders)
        if "grid" in kinds:
            families += grid_families(num_steps, order)
        if "input" in kinds:
            families += input_families(order)
        if "gap" in kinds:
            families += gap_families(order)
    return families


def search_config(
    runs: Sequence[RecordedRun],
    num_steps: int,
    target: float,
    evaluate: Callable[[AdaCacheConfig], tuple],
    *,
    orders: Sequence[int] = SEARCH_ORDERS,
    kinds: Sequence[str] = KINDS,
    decision_metric: str = "change",
    extra: Mapping[str, AdaCacheConfig] | None = None,
    max_candidates: int = 6,
    max_evaluations: int = 12,
    tolerance: float | None = None,
    log: Callable[[str], object] | None = None,
) -> Calibration:
    """The config with the least measured error at ``target`` over the search space (see the module docstring).
    ``runs``: the recorded sessions (:func:`~.simulation.recorded_runs`); ``evaluate(config) -> (error, fraction[,
    info])`` runs the calibration inputs with ``config``."""
    families = search_families(runs, num_steps, orders, kinds, decision_metric=decision_metric)
    return select(
        families,
        RunPredictor(runs, num_steps),
        target,
        evaluate,
        tolerance=tolerance,
        max_candidates=max_candidates,
        max_evaluations=max_evaluations,
        extra=extra,
        diverse=True,
        log=log,
    )
