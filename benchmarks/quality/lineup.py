"""The methods of a full run, in order: one entry of :data:`METHOD_SETS` per set of methods.

To add a method (a calibrated config, a new policy), add one entry: a function of the run (:class:`Lineup`)
returning its methods, e.g. ``lambda run: [our_method("AdaCache-calibrated", config, repeats=run.repeats)]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .cache_dit_peer import cache_dit_methods
from .diffusers_hooks import hook_methods
from .methods import (
    DEFAULT_REPEATS,
    STATIC_FORECAST_ORDERS,
    BenchMethod,
    adacache_methods,
    calibrated_methods,
    even_grid_methods,
    forecast_methods,
    has_forecasting,
    static_methods,
    target_grid_methods,
)

__all__ = ["Lineup", "METHOD_SETS", "default_methods"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lineup:
    """What a set of methods may depend on: the testbed's name, the step count, the timed rounds of our methods, and
    whether this library forecasts (``AdaCacheConfig.forecast_order``)."""

    testbed: str
    num_steps: int
    repeats: int = DEFAULT_REPEATS
    forecasting: bool = True


METHOD_SETS: tuple[Callable[[Lineup], list[BenchMethod]], ...] = (
    # The reference: first, timed as often as ours.
    lambda run: [BenchMethod("uncached", None, family="uncached", repeats=run.repeats)],
    # Ours: the AdaCache presets (order 0) and every forecasting preset the library ships.
    lambda run: adacache_methods(run.num_steps, run.repeats),
    lambda run: forecast_methods(run.num_steps, run.repeats) if run.forecasting else [],
    # Fixed schedules through our programs: static strides (order 0 and forecasting), evenly spaced grids.
    lambda run: static_methods(forecast_orders=(0, *STATIC_FORECAST_ORDERS) if run.forecasting else (0,)),
    lambda run: even_grid_methods(run.num_steps) if run.forecasting else [],
    lambda run: target_grid_methods(run.num_steps) if run.forecasting else [],
    # Ours, calibrated on the testbed's calibration videos with default arguments (the committed record).
    lambda run: calibrated_methods(run.testbed, run.num_steps, run.repeats) if run.forecasting else [],
    # Peers: diffusers' hooks, then cache-dit.
    lambda run: hook_methods(run.testbed),
    lambda run: cache_dit_methods(),
)


def default_methods(testbed: str, num_steps: int, repeats: int = DEFAULT_REPEATS) -> list[BenchMethod]:
    """Every method of :data:`METHOD_SETS` for a run on ``testbed`` (a name of ``adapters.PEER_SPECS``)."""
    forecasting = has_forecasting()
    if not forecasting:
        logger.warning("AdaCacheConfig has no forecast_order: no forecasting presets or strides in this run")
    run = Lineup(testbed, num_steps, repeats, forecasting)
    return [method for method_set in METHOD_SETS for method in method_set(run)]
