"""Is there a better fixed schedule than the regular grid, and does it carry over to other videos? (testbed, CPU)

For each stride k: start from the forecasting grid 1, 1 + k, ..., N (the schedule of ``stride-k+f2``) and search, on
one video set (``--search-on``, the calibration videos by default), the common schedule with as many computed steps
that maximises the mean PSNR against the uncached videos: a local search that moves each computed step but the first
and the last by -2, -1, +1, +2 while the mean improves by more than ``--min-gain`` dB, ``--passes`` times over the
schedule. Then it scores the grid and the schedule found on the other set. With ``--per-video V``, the same search runs
for each of V videos of the scoring set on that video alone: an upper bound, in this neighbourhood, on what a
per-video schedule could gain at equal compute (no causal rule is given the answer it uses).

A schedule is run as a config, with the library's own runtime: ``config.schedule_config(steps, order)`` (the schedule
as the forced steps, no rate ever elapsing after step 1).

Usage: python benchmarks/schedule_search.py [--strides 4 5] [--order 2] [--passes 2] [--per-video 4]
       [--out benchmarks/results/schedule_search.json]
With the defaults above it took 40 minutes on 1 thread (50 steps, alongside other work); nothing is timed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adacache_compile import optimize
from adacache_compile.config import schedule_config
from adacache_compile.testbed import load_testbed
from adacache_compile.testbed.calibrate import CALIBRATION_VIDEOS, TestbedEvaluator, _spread
from adacache_compile.testbed.sample import sample

try:
    from benchmarks.quality_latency import BENCH_VIDEOS
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    from quality_latency import BENCH_VIDEOS

VIDEO_SETS = {"calibration": CALIBRATION_VIDEOS, "bench": BENCH_VIDEOS}
MOVES = (-2, -1, 1, 2)


def grid(stride: int, num_steps: int) -> list[int]:
    """The forecasting grid of ``stride-k+f2``: 1, 1 + k, ... and N."""
    return sorted({*range(1, num_steps + 1, stride), num_steps})


class Scorer:
    """Mean PSNR (dB) of a schedule on the videos of a :class:`TestbedEvaluator`."""

    def __init__(self, evaluator: TestbedEvaluator, order: int):
        self.evaluator, self.order = evaluator, order

    @classmethod
    def on(cls, testbed, videos, num_steps: int, order: int, cached) -> Scorer:
        """A scorer of ``videos`` against their uncached runs, through ``cached``."""
        references = [
            sample(testbed.transformer, testbed, [v[:2]], [v[2]], num_steps=num_steps, progress=False) for v in videos
        ]
        return cls(TestbedEvaluator(testbed, videos, references, num_steps, cached=cached), order)

    def for_videos(self, indices: list[int]) -> Scorer:
        """A scorer of a subset of the videos, sharing the references and the cached transformer."""
        e = self.evaluator
        subset = TestbedEvaluator(
            e.testbed, [e.videos[i] for i in indices], [e.references[i] for i in indices], e.num_steps, cached=e.cached
        )
        return Scorer(subset, self.order)

    def __call__(self, steps: list[int]) -> float:
        num_steps = self.evaluator.num_steps
        error, fraction, _ = self.evaluator(schedule_config(steps, self.order))
        if round(fraction * num_steps) != len(steps):
            raise RuntimeError(f"schedule_search: {steps} computed {fraction * num_steps:.2f} steps")
        return -error


def local_search(score: Scorer, start: list[int], passes: int, min_gain: float, log=print) -> tuple[list[int], float]:
    """Move each computed step but the first and last while the score improves by more than ``min_gain``."""
    best, best_score = list(start), score(start)
    for index in range(passes):
        improved = False
        for i in range(1, len(best) - 1):
            for move in MOVES:
                candidate = list(best)
                candidate[i] += move
                if not candidate[i - 1] < candidate[i] < candidate[i + 1]:
                    continue
                value = score(candidate)
                if value > best_score + min_gain:
                    best, best_score, improved = candidate, value, True
        log(f"  pass {index + 1}: {best_score:.2f} dB {best}")
        if not improved:
            break
    return best, best_score


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strides", type=int, nargs="+", default=[4, 5])
    parser.add_argument("--order", type=int, default=2, help="forecast order of every schedule (default 2)")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--min-gain", type=float, default=0.05, help="dB a move must gain to be kept")
    parser.add_argument("--search-on", choices=sorted(VIDEO_SETS), default="calibration")
    parser.add_argument("--videos", type=int, default=None, help="use this many videos of each set (spread)")
    parser.add_argument("--per-video", type=int, default=0, help="also search per video on this many scoring videos")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    testbed = load_testbed()
    search_set = args.search_on
    score_set = next(name for name in VIDEO_SETS if name != search_set)
    pick = (lambda videos: _spread(list(videos), args.videos)) if args.videos else list
    # One cached transformer (one capture) serves both sets.
    cached = optimize(testbed.transformer, schedule_config(grid(args.strides[0], args.steps), args.order))
    search = Scorer.on(testbed, pick(VIDEO_SETS[search_set]), args.steps, args.order, cached)
    scoring = Scorer.on(testbed, pick(VIDEO_SETS[score_set]), args.steps, args.order, cached)
    report = {"num_steps": args.steps, "order": args.order, "search_on": search_set, "score_on": score_set, "rows": []}
    for stride in args.strides:
        start = grid(stride, args.steps)
        print(f"stride {stride} ({len(start)} computed steps): searching on the {search_set} videos")
        found, found_score = local_search(search, start, args.passes, args.min_gain)
        row = {
            "stride": stride,
            "computed_steps": len(start),
            "grid": start,
            "found": found,
            f"grid_{search_set}": search(start),
            f"found_{search_set}": found_score,
            f"grid_{score_set}": scoring(start),
            f"found_{score_set}": scoring(found),
        }
        if args.per_video:
            row["per_video"] = []
            for index in _spread(list(range(len(scoring.evaluator.videos))), args.per_video):
                one = scoring.for_videos([index])
                print(f"  {score_set} video {index}: per-video search")
                best, best_score = local_search(one, start, args.passes, args.min_gain, log=lambda *_: None)
                row["per_video"].append({"video": index, "grid": one(start), "found": best_score, "schedule": best})
        report["rows"].append(row)
        print(format_row(row, search_set, score_set))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


def format_row(row: dict, search_set: str, score_set: str) -> str:
    lines = [
        f"stride {row['stride']}, {row['computed_steps']} computed steps: found {row['found']}",
        f"  {search_set} (searched): grid {row[f'grid_{search_set}']:.2f} dB -> found {row[f'found_{search_set}']:.2f}",
        f"  {score_set} (held out):  grid {row[f'grid_{score_set}']:.2f} dB -> found {row[f'found_{score_set}']:.2f}",
    ]
    for item in row.get("per_video", []):
        lines.append(
            f"  per video {item['video']}: grid {item['grid']:.2f} dB -> {item['found']:.2f} {item['schedule']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
