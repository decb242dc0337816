"""Batched serving: K concurrent requests with mixed schedules, every request its own schedule inside one batched
step, against the same requests one after another, against one decision per batch, and against uncached batching.

Usage:
    python benchmarks/batch_serving.py                    # testbed (CPU): K = 1, 2, 4, 8, median of 3 rounds
    python benchmarks/batch_serving.py --smoke            # a few steps, K = 1, 2, one round: checks the plumbing
    python benchmarks/batch_serving.py --gpu              # Wan-shaped random-init DiT, bf16, one CUDA GPU

Captures happen before anything is timed, and every method runs one untimed round per K first. A round starts K requests at once (each in its own thread inside ``BatchedTransformer.request``) and ends when the
last is done: videos per second = K / wall seconds, a request's latency = its end - the round's start. Request i
takes ``MIX[i % 4]`` (its preset and N; different seeds and labels), one video, CFG in one call. Methods:

- ``sequential``: the K requests one after another through the plain runtime (``optimize``; ``use_config`` and
  ``generation(N)`` per request): what one process serves without batching;
- ``per-request``: the batched transformer, each request its own schedule: per step one full-program call over the
  rows that compute and one skip-program call over the rows that skip;
- ``union``: the same batches with one decision per batch (``BatchedTransformer(union=True)``: a batch runs every row
  in full when any request computes, the decision that batch-wide caches take);
- ``uncached``: the same batches with every request uncached (the full program every step).

Reported per K: videos/s, mean and max latency, the share of rows that ran the full program, and the ratios of
per-request batching to union batching and to the sequential runs (targets at K = 4: >= 1.3x and >= 1x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import adacache_compile as ac
from adacache_compile.config import AdaCacheConfig
from adacache_compile.serving import BatchedTransformer
from adacache_compile.testbed.timing import timed_runs

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.batch_serving
    from benchmarks.gpu_check import WAN_TEXT_DIM, add_wan_arguments, wan_model
except ImportError:
    from gpu_check import WAN_TEXT_DIM, add_wan_arguments, wan_model

# (preset, N) per request, cycled: fast and slow schedules, three step counts.
MIX = (("fast-50+f2", 50), ("slow-50+f2", 50), ("fast-50+f2", 30), ("slow-50+f2", 40))
# A random-init model has no learned trajectory (the trained presets compute nearly every step on it,
# benchmarks/README.md "GPU check"): fixed grids of three strides and three step counts mix the schedules there.
GPU_MIX = (("stride-3+f2", 50), ("stride-5+f2", 50), ("stride-4+f2", 30), ("stride-5+f2", 40))
METHODS = ("sequential", "per-request", "union", "uncached")
SMOKE_STEPS = 6  # N of every request in --smoke


@dataclass(frozen=True)
class RequestSpec:
    index: int
    config: AdaCacheConfig
    steps: int


class TestbedWorkload:
    """The bundled testbed's sampler (DDIM, CFG in one call), one video per request."""

    name = "testbed"

    def __init__(self):
        from adacache_compile.testbed import load_testbed

        self.testbed = load_testbed()
        self.model = self.testbed.transformer
        self.family = self.testbed.family

    def generate(self, module, spec: RequestSpec) -> torch.Tensor:
        from adacache_compile.testbed import sample

        labels = [(spec.index % 4, (spec.index // 4) % 4)]
        return sample(module, self.testbed, labels, [1000 + spec.index], spec.steps, progress=False)


class WanWorkload:
    """A random-init Wan-shaped DiT in bf16 on CUDA (``benchmarks/gpu_check.py``'s model), flow-matching Euler with
    Wan's shift, CFG in one call (both halves in the batch), random text embeddings."""

    name = "wan"

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.model = wan_model(args, self.device, self.dtype)
        self.shape = (16, args.frames, args.height, args.width)
        self.text = (args.text_len, WAN_TEXT_DIM)

    def generate(self, module, spec: RequestSpec) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler

        generator = torch.Generator(self.device).manual_seed(1000 + spec.index)
        latents = torch.randn(1, *self.shape, generator=generator, device=self.device, dtype=self.dtype)
        text = torch.randn(2, *self.text, generator=generator, device=self.device, dtype=self.dtype)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
        scheduler.set_timesteps(spec.steps, device=self.device)
        for t in scheduler.timesteps:
            both = torch.cat([latents, latents])
            pred = module(hidden_states=both, timestep=t.expand(2), encoder_hidden_states=text, return_dict=False)[0]
            pred_cond, pred_uncond = pred.chunk(2)
            latents = scheduler.step(pred_uncond + 5.0 * (pred_cond - pred_uncond), t, latents).prev_sample
        return latents


def _sync() -> None:
    """Wait for the GPU's queued work, so a request's end is when its video exists."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def requests(k: int, mix, smoke: bool) -> list[RequestSpec]:
    return [
        RequestSpec(i, AdaCacheConfig.preset(mix[i % len(mix)][0]), SMOKE_STEPS if smoke else mix[i % len(mix)][1])
        for i in range(k)
    ]


def sequential_round(runtime, workload, specs: list[RequestSpec]) -> dict:
    """The requests one after another, in one thread of their own: the batched methods run their programs outside
    the main thread too (the engine's thread), and on the shared 2-core machine the main thread's OpenMP regions were
    seen 2-10x slower than a spawned thread's under load, which would favour batching for no reason of its own."""
    result: dict = {}

    def run() -> None:
        start = time.perf_counter()
        latencies, computed = [], 0
        for spec in specs:
            runtime.use_config(spec.config)
            with runtime.generation(spec.steps):
                workload.generate(runtime, spec)
            _sync()
            latencies.append(time.perf_counter() - start)
            computed += len(runtime.stats["history"][-1]["computed_steps"])
        result.update(latencies=latencies, full_share=computed / sum(s.steps for s in specs))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if not result:
        raise RuntimeError("the sequential round failed (see the thread's traceback above)")
    return result


def batched_round(engine: BatchedTransformer, workload, specs: list[RequestSpec], uncached: bool) -> dict:
    before = engine.stats["batches"]["rows"]
    latencies: list[float] = [0.0] * len(specs)
    errors: list[BaseException] = []
    start = time.perf_counter()

    def one(spec: RequestSpec) -> None:
        config = spec.config.replace(enabled=False) if uncached else spec.config
        try:
            with engine.request(num_steps=spec.steps, config=config):
                workload.generate(engine, spec)
            _sync()
        except BaseException as e:  # noqa: BLE001 - re-raised by the round
            errors.append(e)
        latencies[spec.index] = time.perf_counter() - start

    threads = [threading.Thread(target=one, args=(spec,)) for spec in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    after = engine.stats["batches"]["rows"]
    full, skip = after["full"] - before["full"], after["skip"] - before["skip"]
    return {"latencies": latencies, "full_share": full / max(1, full + skip)}


def measure(method: str, runtimes: dict, workload, specs, repeats: int, warmup: int) -> dict:
    if method == "sequential":
        run = lambda _: sequential_round(runtimes["sequential"], workload, specs)  # noqa: E731
        runs = timed_runs(run, range(repeats), warmup=warmup)
    else:
        with BatchedTransformer(runtimes["batched"], union=method == "union") as engine:
            run = lambda _: batched_round(engine, workload, specs, uncached=method == "uncached")  # noqa: E731
            runs = timed_runs(run, range(repeats), warmup=warmup)
    latencies = [latency for result in runs.results for latency in result["latencies"]]
    return {
        "seconds": runs.median,
        "videos_per_s": len(specs) / runs.median,
        "latency_mean_s": statistics.mean(latencies),
        "latency_max_s": max(latencies),
        "full_share": runs.results[-1]["full_share"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default=None, help="concurrent requests per round (default 1,2,4,8; smoke 1,2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per method and K (default 3; smoke 1)")
    parser.add_argument("--smoke", action="store_true", help=f"N={SMOKE_STEPS}, K = 1, 2, one round")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--gpu", action="store_true", help="the Wan-shaped bf16 DiT on one CUDA GPU")
    parser.add_argument(
        "--cpu-dry-run", action="store_true", help="--gpu's code on the CPU in float32 (give tiny Wan sizes)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results: a file, or a directory for batch_serving.json in it (default $OUT)",
    )
    add_wan_arguments(parser)
    # The GPU variant's defaults: a 1.3B-shaped Wan on a small latent, so that K = 8 (16 rows) fits minutes.
    parser.set_defaults(frames=5, height=30, width=52, text_len=128)
    args = parser.parse_args(argv)
    ks = [int(k) for k in (args.ks or ("1,2" if args.smoke else "1,2,4,8")).split(",")]
    repeats = args.repeats or (1 if args.smoke else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU (or --cpu-dry-run)")
    wan = args.gpu or args.cpu_dry_run
    if args.cpu_dry_run:
        workload = WanWorkload(args, torch.device("cpu"), torch.float32)
    else:
        workload = WanWorkload(args, torch.device("cuda"), torch.bfloat16) if args.gpu else TestbedWorkload()
    mix = GPU_MIX if wan else MIX
    # The plain runtime as a user runs it (forecast order 2 programs, switched between presets by use_config); the
    # batched methods share programs of order 0 (as `adacache-compile serve` builds them: each request's forecast
    # is combined on the host).
    runtimes = {
        "sequential": ac.optimize(workload.model, AdaCacheConfig.preset(mix[0][0])),
        "batched": ac.optimize(workload.model, AdaCacheConfig.preset(mix[0][0]).replace(forecast_order=0)),
    }
    print(f"{workload.name}: K = {ks}, {repeats} round(s) per method, mix {list(mix)}", file=sys.stderr)
    capture = [RequestSpec(0, AdaCacheConfig.preset(mix[0][0]), 2)]
    sequential_round(runtimes["sequential"], workload, capture)  # the captures happen here, untimed
    with BatchedTransformer(runtimes["batched"]) as engine:
        batched_round(engine, workload, capture, uncached=False)
    results: dict[str, dict] = {}
    for k in ks:
        specs = requests(k, mix, args.smoke)
        # One untimed round per method first: lazily built kernels and allocations for new batch sizes.
        results[str(k)] = {m: measure(m, runtimes, workload, specs, repeats, warmup=1) for m in METHODS}
        print(table_rows(k, results[str(k)]))
    report = {
        "workload": workload.name,
        "device": torch.cuda.get_device_name() if args.gpu and not args.cpu_dry_run else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mix": [list(entry) for entry in mix],
        "smoke": args.smoke,
        "repeats": repeats,
        "results": results,
    }
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is not None and (out.is_dir() or not out.suffix):  # a directory: the file goes inside it
        out = out / "batch_serving.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    return 0


def table_rows(k: int, by_method: dict[str, dict]) -> str:
    """Markdown rows of one K: per method videos/s, latencies, full share, and per-request's ratios."""
    ours = by_method["per-request"]["videos_per_s"]
    lines = []
    for method, result in by_method.items():
        lines.append(
            f"| {k} | {method} | {result['videos_per_s']:.3f} | {result['latency_mean_s']:.2f} | "
            f"{result['latency_max_s']:.2f} | {result['full_share']:.2f} | {ours / result['videos_per_s']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
