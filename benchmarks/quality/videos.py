"""The videos of each testbed's benchmark, and the videos peers are calibrated on (disjoint from them).

A video is ``(first label, second label index, seed)``: latte-shapes (shape, motion bucket), ltx-textures (pattern,
camera motion); ``testbed.sample`` takes the first two as its label pair.
"""

from __future__ import annotations

__all__ = ["BENCH_SEED_BASE", "PEER_CALIBRATION_SEED_BASE", "bench_videos", "peer_calibration_videos"]

# Seeds 3000-3015: disjoint from our calibration's (1000-1033, testbed.calibrate), the demo's (11-14) and the peers'
# calibration (2000-2003).
BENCH_SEED_BASE = 3000
PEER_CALIBRATION_SEED_BASE = 2000


def bench_videos(family) -> list[tuple[str, int, int]]:
    """One video per (first label, second label) of the testbed's family: 16 for both testbeds, seeds 3000 + 4 i + j
    for first label i and second label j."""
    count = len(family.second_labels)
    return [
        (first, second, BENCH_SEED_BASE + count * index + second)
        for index, first in enumerate(family.first_labels)
        for second in range(count)
    ]


def peer_calibration_videos(family, count: int | None = None) -> list[tuple[str, int, int]]:
    """What a peer that must be calibrated on the model (MagCache's magnitude ratios) is calibrated on: one video per
    second label (first labels in turn), seeds 2000 + j, never a benchmark video; the first ``count`` of them."""
    videos = [
        (family.first_labels[second % len(family.first_labels)], second, PEER_CALIBRATION_SEED_BASE + second)
        for second in range(len(family.second_labels))
    ]
    return videos[:count] if count is not None else videos
