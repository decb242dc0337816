"""The command line of the quality–latency benchmark (``python benchmarks/quality_latency.py``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .diffusers_hooks import hook_candidates
from .lineup import default_methods
from .methods import DEFAULT_REPEATS
from .report import output_paths, write_outputs
from .run import run_bench
from .videos import bench_videos

__all__ = ["main"]


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    from adacache_compile.testbed import DEFAULT_TESTBED, TESTBEDS

    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument(
        "--testbed",
        default=DEFAULT_TESTBED,
        help=f"a shipped testbed ({', '.join(TESTBEDS)}; default: {DEFAULT_TESTBED}) or a testbed checkpoint directory",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory (default: bench_out)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS, help="timed rounds of uncached and AdaCache (default: 3)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, 0 = leave as is (default: 1)")
    parser.add_argument(
        "--videos", type=int, default=None, help="only the first N benchmark videos (default: all 16; for smoke runs)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from adacache_compile.testbed import load_testbed

    if args.threads:
        torch.set_num_threads(args.threads)
    testbed = load_testbed(args.testbed)
    videos = bench_videos(testbed.family)[: args.videos]
    methods = default_methods(testbed.name, args.steps, args.repeats)
    results = run_bench(testbed, methods, videos, args.steps, candidates=hook_candidates(testbed.name))
    print(write_outputs(results, args.out))
    print(f"wrote {', '.join(str(p) for p in output_paths(testbed.name, args.out).values())}")
    return 0
