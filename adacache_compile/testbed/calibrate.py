"""``adacache-compile calibrate``: record the bundled testbed and calibrate codebooks on it with
:mod:`adacache_compile.calibration` (the algorithm; this module records, measures and reports).

- :func:`record_testbed`: rate-1 runs (:func:`~adacache_compile.calibration.recorder_config` of the target config, so
  the recorded metric is the one the config acts on, for every forecast order and decision metric); their outputs
  are the uncached videos, the references of the evaluation.
- :class:`TestbedEvaluator`: the ``evaluate`` of :func:`~adacache_compile.calibration.select_config` — generate the
  calibration videos with a config and return ``(-mean PSNR, computed fraction, details)`` against the references.
- :func:`calibrate_testbed`: both, per (forecast order, decision metric) and target, and the JSON report.

The shipped 50-step presets and the 50-step MoReg threshold come from this command
(``benchmarks/results/calibration_testbed_50.json``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibration import (
    CalibrationError,
    base_config,
    calibrate_config,
    default_tolerance,
    metrics_from_stats,
    moreg_threshold,
    motions_from_stats,
    predict,
    recorder_config,
    select_config,
    simulate,
)
from ..config import AdaCacheConfig, MoRegConfig
from .timing import timed_runs

__all__ = [
    "CALIBRATION_VIDEOS",
    "Recording",
    "record_testbed",
    "record_testbed_metrics",
    "TestbedEvaluator",
    "calibrate_testbed",
    "preset_target",
]

# Calibration videos: three shapes x every motion bucket, seeds disjoint from the demo's (11-14) and the
# benchmark's (3000-3015).
CALIBRATION_VIDEOS = [
    (shape, motion, 1000 + 10 * i + motion)
    for i, shape in enumerate(("square", "disc", "cross"))
    for motion in range(4)
]


@dataclass
class Recording:
    """Rate-1 runs of the testbed: per-step metrics (steps 2..N) and motions per video, and the output videos."""

    config: AdaCacheConfig  # the recorder config
    runs: list[list[float]]
    motions: list[list[tuple[int, float]]]
    outputs: list[torch.Tensor]
    cached: object = None  # the cached transformer that recorded them


def record_testbed(
    testbed, videos, num_steps: int, config: AdaCacheConfig | None = None, progress: bool = False, cached=None
):
    """Record ``videos`` with :func:`recorder_config` of ``config`` (default: the reference metric), one video per
    generation. Every step is computed, so the outputs are the uncached videos (to float rounding). ``cached``: a
    cached testbed transformer to reuse (switched with ``use_config``; saves a capture), else a new one."""
    from ..runtime import optimize
    from .sample import sample

    record = recorder_config(config)
    if cached is None:
        cached = optimize(testbed.transformer, record, num_steps=num_steps)
    else:
        cached.use_config(record)
    recorder = cached
    recorded = timed_runs(
        lambda video: sample(recorder, testbed, [video[:2]], [video[2]], num_steps=num_steps, progress=progress),
        videos,
        context=lambda: recorder.generation(num_steps=num_steps),
        after=lambda: recorder.stats["history"][-1],
    )
    runs = [metrics_from_stats(history) for history in recorded.records]
    motions = [motions_from_stats(history) for history in recorded.records]
    return Recording(record, runs, motions, list(recorded.results), recorder)


def record_testbed_metrics(testbed, videos, num_steps: int, progress: bool = False, config=None):
    """``(metric runs, motion runs)`` of :func:`record_testbed`."""
    recording = record_testbed(testbed, videos, num_steps, config, progress)
    return recording.runs, recording.motions


class TestbedEvaluator:
    """``evaluate(config) -> (error, computed_fraction, info)`` on the testbed: generate ``videos`` (one per
    generation) with ``config`` and compare each with its reference (the uncached video).

    error = minus the mean PSNR (dB) over the videos, the figure the benchmark ranks by; an identical video counts
    as 100 dB so that the mean stays finite. computed fraction = computed steps / N, mean over the videos. One
    cached transformer serves every config (:meth:`CachedTransformer.use_config` re-captures only when the programs
    change, e.g. another forecast order)."""

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
        from .metrics import psnr_per_video
        from .sample import sample

        key = config.to_json()
        if key in self._memo:  # the runs are deterministic: a config measured once is not run again
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
        psnrs = [
            min(psnr_per_video(video, reference)[0], self.IDENTICAL_PSNR)
            for video, reference in zip(runs.results, self.references)
        ]
        computed = [len(steps) for steps in runs.records]
        mean_psnr = sum(psnrs) / len(psnrs)
        info = {"psnr": mean_psnr, "psnr_per_video": psnrs, "computed_steps_per_video": computed}
        self._memo[key] = (-mean_psnr, sum(computed) / (len(computed) * n), info)
        return self._memo[key]


def _spread(videos: list, count: int) -> list:
    """``count`` of ``videos`` spread evenly over the list (with the calibration list's order: every shape and
    motion bucket is represented as soon as count >= 4)."""
    if not 1 <= count <= len(videos):
        raise ValueError(f"eval_videos {count}: expected 1..{len(videos)}")
    return [videos[(i * len(videos)) // count] for i in range(count)]


def _parse_target(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _combination_key(order: int, metric: str) -> str:
    return f"f{order}-{metric}"


def _rounded(codebook) -> list:
    return [(round(t, 4), r) for t, r in codebook]


def preset_target(name: str, base: AdaCacheConfig, evaluator) -> tuple[float, dict[str, AdaCacheConfig]]:
    """The target of a preset name and the candidate it adds: the compute fraction ``evaluator`` measures for the
    preset as shipped, and the preset's codebook placed into ``base`` (the start and end every candidate of this
    forecast order runs with; order 0: the shipped preset itself), named ``"preset:<name>"``."""
    shipped = AdaCacheConfig.preset(name)
    _, fraction, _ = evaluator(shipped)
    candidate = shipped if base.forecast_order == 0 else base.replace(codebook=shipped.codebook)
    return fraction, {f"preset:{name}": candidate}


def calibrate_testbed(
    num_steps: int,
    targets: Sequence[str] = ("fast", "slow"),
    template: str = "fast",
    videos=CALIBRATION_VIDEOS,
    out: str | Path | None = None,
    progress: bool = True,
    forecast_orders: Sequence[int] = (0,),
    decision_metrics: Sequence[str] = ("change",),
    eval_videos: int | None = None,
    compare: Sequence[str] = (),
    tolerance: float | None = None,
    max_candidates: int = 5,
    max_evaluations: int = 10,
) -> dict:
    """Record ``videos`` on the shipped testbed and calibrate one config per target, for every combination of
    ``forecast_orders`` x ``decision_metrics`` (order 0 with "forecast" is the change metric and is skipped when
    "change" is asked too); print them, write the report to ``out`` (JSON) when given and return it.

    A target is a compute fraction (``"0.28"``: :func:`~adacache_compile.calibration.select_config`, measured on the
    ``eval_videos`` videos spread over the list, default all), a template name (``"fast"``, ``"slow"``: its quantiles unscaled, no
    measurement) or a preset name (``"fast-50"``: the preset is measured as shipped and the target is its measured
    fraction, so the calibrated config and the shipped preset compute equally; the preset's codebook is a candidate
    too, in the combination's start and end, :func:`~adacache_compile.calibration.base_config`).
    ``compare``: presets to measure once per combination of order 0 for the report.

    ``report["targets"][target]["config"]`` (first combination) and
    ``report["combinations"][key]["targets"][target]["config"]`` are config dicts (:meth:`AdaCacheConfig.from_dict`).
    """
    from . import load_testbed

    testbed = load_testbed()
    say = print
    combos = [(o, m) for o in forecast_orders for m in decision_metrics]
    if "change" in decision_metrics:
        combos = [(o, m) for o, m in combos if not (o == 0 and m == "forecast")]
    if not combos:
        raise ValueError("calibrate_testbed: no (forecast order, decision metric) combination to calibrate")
    eval_set = _spread(list(videos), eval_videos or len(videos))
    tolerance = default_tolerance(num_steps) if tolerance is None else tolerance
    window = MoRegConfig(window=(0.1, 0.9)).window_for(num_steps)
    report: dict = {
        "num_steps": num_steps,
        "videos": [list(video) for video in videos],
        "eval_videos": [list(video) for video in eval_set],
        "tolerance": tolerance,
        "error": "minus the mean PSNR (dB) of the eval videos against their uncached runs (identical: 100 dB)",
        "moreg_window": window,
        "combinations": {},
    }
    cached = None
    for index, (order, metric) in enumerate(combos):
        key = _combination_key(order, metric)
        base = base_config(order, metric)
        say(f"[{key}] recording {len(videos)} videos at rate 1 ({num_steps} steps)")
        recording = record_testbed(testbed, videos, num_steps, base, progress=progress, cached=cached)
        cached = recording.cached  # one cached transformer for every recording and evaluation (one capture per order)
        runs = recording.runs
        references = dict(zip(map(tuple, videos), recording.outputs))
        evaluator = TestbedEvaluator(
            testbed, eval_set, [references[tuple(v)] for v in eval_set], num_steps, cached=cached
        )
        entry: dict = {
            "base": {"forecast_order": order, "decision_metric": metric},
            "recorder": recording.config.to_dict(),
            "recorded_metrics": runs,
            "targets": {},
        }
        if index == 0:
            threshold = moreg_threshold(recording.motions, window)
            say(f"MoReg threshold (median motion in steps {window[0]}..{window[1]}): {threshold:.4f} (reference 0.385)")
            report.update(
                recorded_metrics=runs, recorded_motions=recording.motions, moreg_threshold=threshold, targets={}
            )
        if order == 0 and compare:
            entry["compare"] = {}
            for name in compare:
                preset = AdaCacheConfig.preset(name)
                error, fraction, info = evaluator(preset)
                entry["compare"][name] = {
                    "config": preset.to_dict(),
                    "predicted_fraction": predict(preset, runs, num_steps)[0],
                    "measured_fraction": fraction,
                    "error": error,
                    "psnr": info["psnr"],
                    "info": info,
                }
                say(f"[{key}] {name}: measured fraction {fraction:.3f}, PSNR {info['psnr']:.2f} dB")
        seen: list = []  # (measured candidate, target it was measured for)
        for target in targets:
            parsed = _parse_target(target)
            extra = None
            if isinstance(parsed, str) and "-" in parsed:
                parsed, extra = preset_target(parsed, base, evaluator)
            if not isinstance(parsed, str):
                # Candidates measured for an earlier target of this combination that landed in this band join as
                # candidates (served from the evaluator's memo: no new run), named "<name>@<earlier target>".
                for c, earlier in seen:
                    if (
                        abs(c.measured_fraction - parsed) <= tolerance + 1e-12
                        and c.config not in (extra or {}).values()
                    ):
                        extra = {**(extra or {}), f"{c.name}@{earlier}": c.config}
            if isinstance(parsed, str):
                config = calibrate_config(runs, num_steps, parsed, base=base, template=template)
                fractions = [len(simulate(config, run, num_steps)) / num_steps for run in runs]
                result = {"config": config.to_dict(), "simulated_compute_fraction": sum(fractions) / len(fractions)}
                say(
                    f"[{key}] {target}: codebook {_rounded(config.codebook)}, simulated {result['simulated_compute_fraction']:.2f}"
                )
            else:
                say(f"[{key}] target {parsed:.3f} (tolerance {tolerance:.3f}):")
                try:
                    calibration = select_config(
                        runs,
                        num_steps,
                        parsed,
                        evaluator,
                        base,
                        tolerance=tolerance,
                        max_candidates=max_candidates,
                        max_evaluations=max_evaluations,
                        extra=extra,
                        log=say,
                    )
                except CalibrationError as e:
                    say(f"[{key}] {target}: {e}")
                    entry["targets"][target] = {"target": parsed, "failed": str(e)}
                    continue
                winner = calibration.winner
                seen.extend((c, target) for c in calibration.candidates if c.measured_fraction is not None)
                result = {
                    **calibration.to_dict(),
                    "simulated_compute_fraction": winner.predicted_fraction,
                    "psnr": winner.info.get("psnr"),
                }
                say(
                    f"[{key}] {target}: {winner.name} {_rounded(calibration.config.codebook)}, measured fraction "
                    f"{winner.measured_fraction:.3f}, PSNR {winner.info.get('psnr', math.nan):.2f} dB"
                )
            entry["targets"][target] = result
            if index == 0:
                report["targets"][target] = result
        report["combinations"][key] = entry
        if out:  # written after every combination: a long run keeps what it has
            Path(out).write_text(json.dumps(report, indent=2))
    if out:
        say(f"wrote {out}")
    return report
