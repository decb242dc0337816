"""The graph passes, in the one order they run. Each is ``(GraphModule, CachePlan) -> PassResult``."""

from __future__ import annotations

import logging

import torch.fx as fx

from ..errors import AdaCacheError, PassError
from ..plan import CachePlan, PassResult
from .elide_copies import elide_copies
from .find_blocks import find_blocks
from .find_stream import find_stream
from .hoist_leaks import hoist_leaks
from .insert_cond import insert_cond
from .split_programs import adacache_metrics, split_programs
from .tap_metric import tap_metric

__all__ = ["PASSES", "run_passes", "adacache_metrics"]

logger = logging.getLogger(__name__)

PASSES = [find_blocks, find_stream, hoist_leaks, tap_metric, split_programs, elide_copies, insert_cond]


def run_passes(gm: fx.GraphModule, plan: CachePlan, passes=None) -> CachePlan:
    """Run ``passes`` (default: :data:`PASSES`) in order on ``gm``; errors name the pass that raised them."""
    for graph_pass in passes or PASSES:
        try:
            result: PassResult = graph_pass(gm, plan)
        except (AdaCacheError, ValueError):
            raise
        except Exception as e:
            raise PassError(f"pass {graph_pass.__name__} failed: {type(e).__name__}: {e}") from e
        gm = result.graph_module
        logger.debug("after %s (modified=%s):\n%s", graph_pass.__name__, result.modified, gm.graph)
    return plan
