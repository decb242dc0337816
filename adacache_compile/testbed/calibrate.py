"""``adacache-compile calibrate``: record uncached runs of the bundled testbed and calibrate codebooks on them with
:mod:`adacache_compile.calibrate` (the algorithm; this module only records and reports). The shipped ``fast-50`` /
``slow-50`` presets and the 50-step MoReg threshold come from this command."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..calibrate import (
    RECORD_CONFIG,
    calibrate_config,
    metrics_from_stats,
    moreg_threshold,
    motions_from_stats,
    simulate,
)
from ..config import MoRegConfig
from .timing import timed_runs

__all__ = ["CALIBRATION_VIDEOS", "record_testbed_metrics", "calibrate_testbed"]

# Calibration videos: three shapes x every motion bucket, seeds disjoint from the demo's and the benchmark's.
CALIBRATION_VIDEOS = [
    (shape, motion, 1000 + 10 * i + motion)
    for i, shape in enumerate(("square", "disc", "cross"))
    for motion in range(4)
]


def record_testbed_metrics(testbed, videos, num_steps: int, progress: bool = False):
    """Per-step metrics and motions of uncached testbed generations (rate 1 at every step: the outputs are the
    uncached ones). Returns ``(metric runs, motion runs)``."""
    from ..runtime import optimize
    from .sample import sample

    recorder = optimize(testbed.transformer, RECORD_CONFIG, num_steps=num_steps)
    recorded = timed_runs(
        lambda video: sample(recorder, testbed, [video[:2]], [video[2]], num_steps=num_steps, progress=progress),
        videos,
        context=lambda: recorder.generation(num_steps=num_steps),
        after=lambda: recorder.stats["history"][-1],
    )
    runs = [metrics_from_stats(history) for history in recorded.records]
    motions = [motions_from_stats(history) for history in recorded.records]
    return runs, motions


def _parse_target(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def calibrate_testbed(
    num_steps: int,
    targets: Sequence[str] = ("fast", "slow"),
    template: str = "fast",
    videos=CALIBRATION_VIDEOS,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Record ``videos`` on the shipped testbed, calibrate one config per target (a template name or a compute
    fraction, as text) and the MoReg threshold; print them, write the report to ``out`` (JSON) when given and return
    it. ``report["targets"][target]["config"]`` is a config dict (:meth:`AdaCacheConfig.from_dict`)."""
    from . import load_testbed

    testbed = load_testbed()
    runs, motions = record_testbed_metrics(testbed, videos, num_steps, progress=progress)
    window = MoRegConfig(window=(0.1, 0.9)).window_for(num_steps)
    threshold = moreg_threshold(motions, window)
    print(f"MoReg threshold (median motion in steps {window[0]}..{window[1]}): {threshold:.4f} (reference 0.385)")
    calibrated = {}
    for target in targets:
        config = calibrate_config(runs, num_steps, _parse_target(target), template=template)
        fractions = [len(simulate(config, run, num_steps)) / num_steps for run in runs]
        calibrated[target] = {
            "config": config.to_dict(),
            "simulated_compute_fraction": sum(fractions) / len(fractions),
        }
        print(
            f"{target}: codebook {[(round(t, 4), r) for t, r in config.codebook]}, "
            f"simulated compute fraction {calibrated[target]['simulated_compute_fraction']:.2f}"
        )
    report = {
        "num_steps": num_steps,
        "videos": [list(video) for video in videos],
        "recorded_metrics": runs,
        "recorded_motions": motions,
        "moreg_window": window,
        "moreg_threshold": threshold,
        "targets": calibrated,
    }
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return report
