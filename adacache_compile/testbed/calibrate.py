"""``adacache-compile calibrate``: calibrate on a bundled testbed, with what a user's calibration runs
(:mod:`adacache_compile.pipeline_calibration`): a rate-1 recording of the calibration videos, then the search over
forecast order, policy and placement at each target, every candidate measured on the same videos against their
uncached runs (PSNR as the benchmark computes it).

- :data:`CALIBRATION_VIDEOS`: per testbed, videos disjoint from the demo's and the benchmark's.
- :class:`TestbedEvaluator`: ``evaluate(config) -> (error, computed_fraction, info)`` on testbed videos (used by
  ``benchmarks/schedule_search.py``).
- :func:`calibrate_testbed`: the recording, the targets and the JSON report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import AdaCacheConfig
from .timing import timed_runs

__all__ = ["CALIBRATION_VIDEOS", "calibration_videos", "TestbedEvaluator", "calibrate_testbed", "preset_target"]

# Calibration videos (first label, second label, seed): three first labels x every second label, seeds disjoint from
# the demo's (11-14) and the benchmark's (3000-3015). The same list for both testbeds (their labels are indices).
CALIBRATION_VIDEOS = [
    (first, second, 1000 + 10 * i + second) for i, first in enumerate((0, 1, 3)) for second in range(4)
]


def calibration_videos(count: int | None = None) -> list[tuple[int, int, int]]:
    """``count`` calibration videos spread over the list (every first and second label as soon as count >= 4)."""
    videos = CALIBRATION_VIDEOS
    return list(videos) if count is None else _spread(list(videos), count)


def _spread(videos: list, count: int) -> list:
    """``count`` of ``videos`` spread evenly over the list."""
    if not 1 <= count <= len(videos):
        raise ValueError(f"videos {count}: expected 1..{len(videos)}")
    return [videos[(i * len(videos)) // count] for i in range(count)]


def testbed_psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """The benchmark's PSNR of one testbed video (an identical video counts 100 dB, so means stay finite)."""
    from .metrics import psnr_per_video

    return min(psnr_per_video(video, reference)[0], TestbedEvaluator.IDENTICAL_PSNR)


class TestbedEvaluator:
    """``evaluate(config) -> (error, computed_fraction, info)`` on the testbed: generate ``videos`` (one per
    generation) with ``config`` and compare each with its reference (the uncached video).

    error = minus the mean PSNR (dB) over the videos, the figure the benchmark ranks by; computed fraction =
    computed steps / N, mean over the videos. One cached transformer serves every config; a config is measured
    once."""

    IDENTICAL_PSNR = 100.0

    def __init__(
        self, testbed, videos, references: Sequence[torch.Tensor], num_steps: int, progress: bool = False, cached=None
    ):
        if len(videos) != len(references):
            raise ValueError(f"TestbedEvaluator: {len(videos)} videos but {len(references)} references")
        self.testbed, self.videos, self.references = testbed, list(videos), list(references)
        self.num_steps, self.progress = num_steps, progress
        self.cached = cached
        self.calls = 0  # generations of the whole video set actually run (repeated configs are served from memo)
        self._memo: dict[str, tuple] = {}

    def __call__(self, config: AdaCacheConfig):
        from ..runtime import optimize
        from .sample import sample

        key = config.to_json()
        if key in self._memo:
            return self._memo[key]
        n = self.num_steps
        if self.cached is None:
            self.cached = optimize(self.testbed.transformer, config, num_steps=n)
        else:
            self.cached.use_config(config)
        cached = self.cached
        runs = timed_runs(
            lambda video: sample(cached, self.testbed, [video[:2]], [video[2]], num_steps=n, progress=self.progress),
            self.videos,
            context=lambda: cached.generation(num_steps=n),
            after=lambda: cached.stats["history"][-1]["computed_steps"],
        )
        self.calls += 1
        psnrs = [testbed_psnr(video, reference) for video, reference in zip(runs.results, self.references)]
        computed = [len(steps) for steps in runs.records]
        mean_psnr = sum(psnrs) / len(psnrs)
        info = {"psnr": mean_psnr, "psnr_per_video": psnrs, "computed_steps_per_video": computed}
        self._memo[key] = (-mean_psnr, sum(computed) / (len(computed) * n), info)
        return self._memo[key]


def preset_target(name: str, base: AdaCacheConfig, evaluator) -> tuple[float, dict[str, AdaCacheConfig]]:
    """The target of a preset name and the candidate it adds: the compute fraction ``evaluator`` measures for the
    preset as shipped, and the preset's codebook placed into ``base`` (the start and end every candidate of this
    forecast order runs with; order 0: the shipped preset itself), named ``"preset:<name>"``."""
    shipped = AdaCacheConfig.preset(name)
    _, fraction, _ = evaluator(shipped)
    candidate = shipped if base.forecast_order == 0 else base.replace(codebook=shipped.codebook)
    return fraction, {f"preset:{name}": candidate}


def _parse_target(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def calibrate_testbed(
    num_steps: int,
    targets: Sequence[str] = ("fast", "slow"),
    *,
    testbed: str | None = None,
    videos: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    forecast_orders: Sequence[int] | None = None,
    policies: Sequence[str] | None = None,
    compare: Sequence[str] = (),
    tolerance: float | None = None,
    max_candidates: int = 6,
    max_evaluations: int = 12,
) -> dict:
    """Record the calibration videos of ``testbed`` (a name or a checkpoint directory; default the first testbed)
    once at rate 1, then calibrate one config per target — a compute fraction (``"0.28"``), ``"fast"`` / ``"slow"``
    or a preset name (``"fast-50+f2"``: the preset's compute measured on these videos, the preset itself a
    candidate) — searching forecast orders and policies (``forecast_orders`` / ``policies`` pin them). Prints each
    result, writes the report to ``out`` (JSON, after every target) and returns it. ``compare``: presets measured
    once for the report."""
    from ..calibration import KINDS, SEARCH_ORDERS
    from ..pipeline_calibration import record_runs
    from ..runtime import optimize
    from . import load_testbed
    from .sample import sample

    bed = load_testbed(testbed)
    chosen = calibration_videos(videos)
    say = print
    cached = optimize(bed.transformer, AdaCacheConfig.preset("fast-50"), num_steps=num_steps)

    def run(index: int) -> torch.Tensor:
        first, second, seed = chosen[index]
        with cached.generation(num_steps):
            return sample(cached, bed, [(first, second)], [seed], num_steps=num_steps, progress=False)

    say(f"[{bed.name}] recording {len(chosen)} videos at rate 1 ({num_steps} steps)")
    recording = record_runs([cached], run, len(chosen), score=testbed_psnr, progress=progress)
    report: dict = {
        "testbed": bed.name,
        "num_steps": num_steps,
        "videos": [list(video) for video in chosen],
        "search": {
            "forecast_orders": list(forecast_orders or SEARCH_ORDERS),
            "policies": list(policies or KINDS),
            "max_candidates": max_candidates,
            "max_evaluations": max_evaluations,
        },
        "error": "minus the mean PSNR (dB) of the videos against their uncached runs (identical: 100 dB)",
        "recorded": [run.to_dict() for run in recording.runs],
        "targets": {},
        "compare": {},
    }
    for name in compare:
        error, fraction, info = recording.evaluate(AdaCacheConfig.preset(name))
        report["compare"][name] = {"measured_fraction": fraction, "psnr": info["psnr"], "info": info}
        say(f"[{bed.name}] {name}: measured fraction {fraction:.3f}, PSNR {info['psnr']:.2f} dB")
    for target in targets:
        parsed = _parse_target(target)
        say(f"[{bed.name}] target {target}:")
        calibration = recording.calibrate(
            parsed,
            forecast_order=None if forecast_orders is None else tuple(forecast_orders),
            policy=None if policies is None else tuple(policies),
            max_candidates=max_candidates,
            max_evaluations=max_evaluations,
            tolerance=tolerance,
            log=say,
        )
        winner = calibration.winner
        report["targets"][target] = {**calibration.to_dict(), "psnr": winner.info.get("psnr")}
        say(
            f"[{bed.name}] {target}: {winner.name}, measured fraction {winner.measured_fraction:.3f}"
            f"{'' if calibration.landed else ' (missed the target: nearest)'}, PSNR "
            f"{winner.info.get('psnr', math.nan):.2f} dB, cost {calibration.cost['uncached_generations']} uncached + "
            f"{calibration.cost['cached_generations']} cached generations"
        )
        if out:  # written after every target: a long run keeps what it has
            Path(out).write_text(json.dumps(report, indent=2))
    if out:
        say(f"wrote {out}")
    return report
