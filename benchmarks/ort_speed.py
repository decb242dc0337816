"""The same AdaCache schedule through the torch runtime and through the onnxruntime runtime of its export.

Usage: python benchmarks/ort_speed.py [--steps 50] [--repeats 3] [--threads 1] [--preset fast-50] [--out-dir DIR]

On the bundled testbed: one 50-step generation (``testbed.sample.sample``) per repeat, cached (``--preset``, default
``fast-50``; a forecasting preset exports its forecasting skip program) and uncached (the same config with a codebook whose only rate is 1, so every step runs the full program; the loaded
runtime switches to it with ``use_config``), on each backend. Prints the median seconds, each backend's speedup
(uncached / cached), the ratio of the onnxruntime speedup to the torch speedup (target >= 0.95), whether both
backends computed the same steps and the max abs difference of their final videos (target <= 1e-4).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from adacache_compile import AdaCacheConfig, optimize
from adacache_compile.export import load, to_onnx
from adacache_compile.testbed import load_testbed
from adacache_compile.testbed.sample import sample
from adacache_compile.testbed.timing import timed_runs

LABELS = [("disc", 2)]
SEEDS = [7]


def measure(module, testbed, config: AdaCacheConfig, num_steps: int, repeats: int) -> dict:
    """``repeats`` generations of one video with ``config``: median seconds, the last video and its computed steps."""
    module.use_config(config)
    runs = timed_runs(
        lambda _: sample(module, testbed, LABELS, SEEDS, num_steps=num_steps, progress=False),
        range(repeats),
        context=lambda: module.generation(num_steps=num_steps),
        after=lambda: list(module.stats["history"][-1]["computed_steps"]),
    )
    return {"seconds": runs.median, "video": runs.results[-1], "computed": runs.records[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--preset", default=None, help="AdaCache preset to run (default fast-<steps>)")
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the export here (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1

    testbed = load_testbed()
    preset = args.preset or f"fast-{args.steps}"
    cached_config = AdaCacheConfig.preset(preset)
    uncached_config = dataclasses.replace(cached_config, codebook=((1e9, 1),))
    module = optimize(testbed.transformer, cached_config)
    # One generation captures the programs with the sampler's own call (batch 2: conditional + unconditional).
    measure(module, testbed, cached_config, args.steps, repeats=1)
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = to_onnx(module, (args.out_dir or Path(scratch)) / "testbed")
        exported = load(out_dir, "onnxruntime", providers=["CPUExecutionProvider"], session_options=options)
        results = {}
        for backend, runtime in (("torch", module), ("onnxruntime", exported)):
            for name, config in (("cached", cached_config), ("uncached", uncached_config)):
                print(f"{backend} {name} ...", file=sys.stderr, flush=True)
                results[backend, name] = measure(runtime, testbed, config, args.steps, args.repeats)

    speedup = {b: results[b, "uncached"]["seconds"] / results[b, "cached"]["seconds"] for b in ("torch", "onnxruntime")}
    print(f"testbed, {args.steps} steps, preset {preset}, threads={args.threads}, median of {args.repeats}")
    print()
    print("| backend | uncached s | cached s | computed steps | speedup |")
    print("|---|---|---|---|---|")
    for backend in ("torch", "onnxruntime"):
        cached, uncached = results[backend, "cached"], results[backend, "uncached"]
        print(
            f"| {backend} | {uncached['seconds']:.2f} | {cached['seconds']:.2f} | "
            f"{len(cached['computed'])}/{args.steps} | {speedup[backend]:.2f}x |"
        )
    print()
    same_steps = results["torch", "cached"]["computed"] == results["onnxruntime", "cached"]["computed"]
    video_diff = {
        name: float((results["torch", name]["video"] - results["onnxruntime", name]["video"]).abs().max())
        for name in ("cached", "uncached")
    }
    print(f"onnxruntime speedup / torch speedup = {speedup['onnxruntime'] / speedup['torch']:.3f} (target >= 0.95)")
    print(f"computed steps identical: {same_steps} ({results['torch', 'cached']['computed']})")
    print(
        f"final video max abs diff torch vs onnxruntime: cached {video_diff['cached']:.2e}, "
        f"uncached {video_diff['uncached']:.2e} (target <= 1e-4)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
