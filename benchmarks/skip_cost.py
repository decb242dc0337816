"""How much a skip step costs against a full step, on a small DiT where the blocks dominate.

Usage: python benchmarks/skip_cost.py [--depth 12] [--dim 256] [--repeats 15]
Prints the median full and skip program times and their ratio (target: skip <= 25 % of full).
"""

from __future__ import annotations

import argparse

import torch

import adacache_compile as ac
from adacache_compile.testbed.timing import timed_runs
from adacache_compile.testbed.tiny_models import TinyVideoDiT


def median_ms(fn, repeats: int) -> float:
    """Median wall milliseconds of ``repeats`` calls of ``fn()`` after one untimed call."""
    return timed_runs(lambda _: fn(), range(repeats), warmup=1).median * 1e3


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark DiT's size options (shared with ``single_file.py``)."""
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)


def cached_model(args) -> tuple[torch.nn.Module, dict, ac.CachedTransformer, list[torch.Tensor]]:
    """The benchmark DiT of ``args``, its example call, its cached module and the call's flat inputs."""
    torch.manual_seed(0)
    model = TinyVideoDiT(dim=args.dim, heads=4, depth=args.depth).eval()
    kwargs = dict(hidden_states=torch.randn(2, 4, args.frames, args.size, args.size), timestep=torch.full((2,), 500))
    cached = ac.optimize(model, example_inputs=kwargs)
    return model, kwargs, cached, cached.captures.latest().captured.flatten((), kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    model, kwargs, cached, inputs = cached_model(args)
    programs = cached.programs
    with torch.no_grad():
        tap_prev = programs.zero_tap(inputs)
        deltas = programs.decode_full(programs.full(*inputs, tap_prev)).deltas
        full_ms = median_ms(lambda: programs.full(*inputs, tap_prev), args.repeats)
        skip_ms = median_ms(lambda: programs.skip(*inputs, *deltas), args.repeats)
        eager_ms = median_ms(lambda: model(**kwargs), args.repeats)
    print(f"model: TinyVideoDiT depth={args.depth} dim={args.dim}, tokens={args.frames * (args.size // 2) ** 2}")
    print(f"threads={torch.get_num_threads()} repeats={args.repeats} (median)")
    print(f"eager model {eager_ms:.2f} ms | full program {full_ms:.2f} ms | skip program {skip_ms:.2f} ms")
    print(f"skip / full = {skip_ms / full_ms:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
