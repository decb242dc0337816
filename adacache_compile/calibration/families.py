"""The one-parameter families a calibration solves for a target compute: each maps a parameter to a config, and a
larger parameter never computes more steps.

- the AdaCache rule's codebooks (:func:`~adacache_compile.calibration.codebooks.codebook_families`);
- fixed grids (:func:`grid_families`): computed steps spread over 1..N, with the first gap after step 1 placed at a
  share of the regular spacing (where the first computed steps fall moves a forecast's quality most);
- :class:`~adacache_compile.config.InputPolicy` (:func:`input_families`): the threshold, per cap on consecutive skips;
- :class:`~adacache_compile.config.GapPolicy` (:func:`gap_families`): the tolerance, per largest and first gap;

each at a forecast order. :func:`~adacache_compile.calibration.search.search_families` is the default search
space of ``calibrate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..config import AdaCacheConfig, GapPolicy, InputPolicy, policy_config, schedule_config

__all__ = [
    "Family",
    "KINDS",
    "GRID_PLACEMENTS",
    "INPUT_CAPS",
    "GAP_SHAPES",
    "grid_steps",
    "grid_families",
    "input_families",
    "gap_families",
]

# What decides the steps: the AdaCache rule's codebook, a fixed grid, or one of the policies.
KINDS = ("adacache", "grid", "input", "gap")
# The first gap after step 1 as a share of the grid's regular spacing (1: evenly spaced).
GRID_PLACEMENTS = (1.0, 0.75, 0.5)
# InputPolicy.max_skips of the input-policy families.
INPUT_CAPS = (3, 5, 8)
# (max_gap, first_gap) of the gap-policy families.
GAP_SHAPES = ((8, 2), (8, 3), (8, 4), (12, 3))


@dataclass
class Family:
    """``make(param)`` for ``param`` in [lo, hi] (``log``: bisected on a log scale); larger computes fewer steps.
    ``kind`` (one of :data:`KINDS`) and ``order`` (the forecast order) group families for the measured selection;
    ``info`` describes the family in the report."""

    name: str
    make: Callable[[float], AdaCacheConfig]
    lo: float
    hi: float
    log: bool = False
    kind: str = "adacache"
    order: int = 0
    info: dict = field(default_factory=dict)


def grid_steps(spacing: float, num_steps: int, placement: float = 1.0) -> list[int]:
    """Steps 1 and N and the computed steps between them at ``spacing`` (rounded to a whole number of gaps over
    1..N), the first gap after step 1 shortened to ``placement`` times the spacing and the rest spread evenly."""
    gaps = max(1, round((num_steps - 1) / max(spacing, 1.0)))
    regular = (num_steps - 1) / gaps
    first = 1 + max(1, round(placement * regular))
    if gaps == 1 or first >= num_steps:
        return sorted({1, num_steps})
    rest = [first + (num_steps - first) * i / (gaps - 1) for i in range(gaps)]
    return sorted({1, *(round(s) for s in rest)})


def grid_families(num_steps: int, order: int, placements: Sequence[float] = GRID_PLACEMENTS) -> list[Family]:
    """Fixed grids at ``order`` (:func:`~adacache_compile.config.schedule_config`), the parameter the spacing."""
    return [
        Family(
            f"grid:{placement:g}",
            lambda spacing, placement=placement: schedule_config(grid_steps(spacing, num_steps, placement), order),
            1.0,
            float(max(num_steps - 1, 1)),
            kind="grid",
            order=order,
            info={"first_gap_share": placement},
        )
        for placement in placements
    ]


def input_families(order: int, caps: Sequence[int] = INPUT_CAPS) -> list[Family]:
    """:class:`InputPolicy` at ``order``, the parameter the threshold, one family per cap on skips in a row."""
    return [
        Family(
            f"input:cap{cap}",
            lambda threshold, cap=cap: policy_config(InputPolicy(threshold=threshold, max_skips=cap), order),
            1e-5,
            10.0,
            log=True,
            kind="input",
            order=order,
            info={"max_skips": cap},
        )
        for cap in caps
    ]


def gap_families(order: int, shapes: Sequence[tuple[int, int]] = GAP_SHAPES) -> list[Family]:
    """:class:`GapPolicy` at ``order``, the parameter the tolerance, one family per (largest gap, first gap)."""
    return [
        Family(
            f"gap:max{max_gap}-first{first_gap}",
            lambda tolerance, max_gap=max_gap, first_gap=first_gap: policy_config(
                GapPolicy(tolerance=tolerance, max_gap=max_gap, first_gap=first_gap), order
            ),
            1e-6,
            10.0,
            log=True,
            kind="gap",
            order=order,
            info={"max_gap": max_gap, "first_gap": first_gap},
        )
        for max_gap, first_gap in shapes
    ]
