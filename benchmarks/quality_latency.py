"""Quality against latency on a testbed for AdaCache, fixed schedules, the diffusers cache hooks and cache-dit, with
a JSON record, a markdown report and a Pareto plot, each named after the testbed.

    python benchmarks/quality_latency.py [--testbed latte-shapes|ltx-textures] [--out bench_out] [--steps 50]
        [--repeats 3] [--threads 1] [--videos N]

Every method generates the same videos (one per pair of the testbed's labels, fixed seeds), one video per generation.
Wall time is measured in rounds: each round runs every method still due a repeat, so slow drift of a shared machine
hits all methods alike; a method's time is the median of its rounds, and speedups are ratios within this run.

Diffusers hooks are driven through ``HookedDenoiser``, which gives them what a pipeline would (the current
timestep, ``cache_context`` with the step index, the sampler's sigma and the step count, the unconditional half
first for FasterCache); block-stack hooks (FirstBlockCache, SeaCache, MagCache) and cache-dit run on the testbed's
one list of whole layers (a view of Latte, whose two interleaved block lists they cannot cache as one stack; LTX-Video
as it is). MagCache's ratios are calibrated first, on videos disjoint from the measured ones. What does not apply is
probed and recorded with the reason. The code lives in ``benchmarks/quality/``, one module per job (its
``__init__`` lists them).
"""

from __future__ import annotations

import sys

from adacache_compile.testbed.families import FAMILIES

if __package__:
    from .quality.cli import main as _main
    from .quality.videos import bench_videos
else:  # run as a script: benchmarks/ is sys.path[0]
    from quality.cli import main as _main
    from quality.videos import bench_videos

__all__ = ["BENCH_VIDEOS", "main"]

# The first testbed's benchmark videos (benchmarks/schedule_search.py scores schedules on them).
BENCH_VIDEOS = bench_videos(FAMILIES["latte-shapes"])


def main(argv: list[str] | None = None) -> int:
    return _main(argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
