"""GPU check: a mid-size random-init Wan DiT in bf16 on one CUDA GPU.

Measures full and skip program times (eager and CUDA graphs), then a 50-step generation uncached vs AdaCache (fixed
seed; the schedule is printed), and reports speedup / bound, where bound = N / computed steps. Writes JSON to $OUT
(or --out) when set. Meant to finish in under 8 minutes on one H100.

    python benchmarks/gpu_check.py            # defaults: Wan 1.3B-like config, 2 x 16 x 13 x 60 x 104 latent
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import adacache_compile as ac
from adacache_compile.calibration import RECORD_CONFIG, calibrate_config, metrics_from_stats
from adacache_compile.capture_cache import CompiledEntry
from adacache_compile.config import AdaCacheConfig
from adacache_compile.testbed.timing import timed_runs


def median_ms(fn, repeats: int) -> float:
    """Median wall milliseconds of ``repeats`` calls of ``fn()`` after one untimed call, CUDA synchronised."""
    return timed_runs(lambda _: fn(), range(repeats), warmup=1).median * 1e3


def generate(module, latents, timesteps, kwargs, session_factory=None):
    """A plain flow-matching Euler loop (batched CFG already in the batch); returns latents and wall seconds."""

    def euler(_):
        x = latents.clone()
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                velocity = module(hidden_states=x, timestep=t.expand(x.shape[0]), return_dict=False, **kwargs)[0]
                dt = (timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros_like(t)) - t
                x = x + dt / 1000.0 * velocity
        return x

    runs = timed_runs(euler, [None], context=session_factory)
    return runs.results[0], runs.seconds[0]


WAN_TEXT_DIM = 4096


def add_wan_arguments(parser: argparse.ArgumentParser) -> None:
    """The Wan-shaped model's and latent's sizes (defaults: the Wan 2.1 1.3B shape, a 480p-like latent)."""
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=8960)
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--height", type=int, default=60)
    parser.add_argument("--width", type=int, default=104)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--text-len", type=int, default=512)


def wan_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, freq_dim: int = 256):
    """A random-init ``WanTransformer3DModel`` of ``args``' sizes (seed 0), cast as ``from_pretrained(torch_dtype)``
    does: the modules the model asks for stay float32 (mixed precision)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=WAN_TEXT_DIM,
        freq_dim=freq_dim,
        ffn_dim=args.ffn,
        num_layers=args.layers,
    ).eval()
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    model.to(device, dtype)
    for name, module in model.named_modules():
        if any(part in keep for part in name.split(".")):
            module.to(torch.float32)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_wan_arguments(parser)
    parser.add_argument("--preset", default="fast-30")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--calibrate", default="fast", help="codebook from a rate-1 recording: fast|slow|'' (use --preset as is)"
    )
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--cpu-dry-run", action="store_true", help="run the same code on CPU in float32 (tiny sizes)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        raise SystemExit("gpu_check needs a CUDA GPU (or --cpu-dry-run)")
    if args.cpu_dry_run:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    model = wan_model(args, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator(device).manual_seed(0)
    latents = torch.randn(2, 16, args.frames, args.height, args.width, generator=gen, device=device, dtype=dtype)
    text = torch.randn(2, args.text_len, WAN_TEXT_DIM, generator=gen, device=device, dtype=dtype)
    kwargs = dict(encoder_hidden_states=text)
    timesteps = torch.linspace(1000, 1000 / args.steps, args.steps, device=device)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "params": params,
        "latent": list(latents.shape),
        "tokens": tokens,
        "dtype": str(dtype),
        "steps": args.steps,
        "preset": args.preset,
    }
    print(
        f"{report['device']}: Wan-like DiT {params / 1e9:.2f} B params, latent {list(latents.shape)}, {tokens} tokens"
    )

    config = AdaCacheConfig.preset(args.preset)
    call = dict(hidden_states=latents, timestep=timesteps[:1].expand(2), return_dict=False, **kwargs)
    t0 = time.perf_counter()
    eager = ac.optimize(model, config, example_inputs=call, num_steps=args.steps)
    report["capture_s"] = time.perf_counter() - t0
    # The CUDA-graph runtime reuses the same capture and programs; only the runners differ.
    graphs = ac.optimize(model, config, num_steps=args.steps, cuda_graphs=device.type == "cuda")
    first = eager.captures.latest()
    graphs.captures.entries.append(CompiledEntry(first.captured, first.plan, *graphs.captures.runners(first.programs)))
    print(f"capture + passes: {report['capture_s']:.1f} s")

    programs = eager.programs
    inputs = first.captured.flatten((), call)
    with torch.no_grad():
        tap_prev = programs.zero_tap(inputs)
        deltas = programs.decode_full(programs.full(*inputs, tap_prev)).deltas
        entry = graphs.captures.latest()
        times = {
            "model_eager_ms": median_ms(lambda: model(**call), args.repeats),
            "full_eager_ms": median_ms(lambda: programs.full(*inputs, tap_prev), args.repeats),
            "skip_eager_ms": median_ms(lambda: programs.skip(*inputs, *deltas), args.repeats),
            "full_cudagraph_ms": median_ms(lambda: entry.run_full(*inputs, tap_prev), args.repeats),
            "skip_cudagraph_ms": median_ms(lambda: entry.run_skip(*inputs, *deltas), args.repeats),
        }
    report.update(times)
    for k, v in times.items():
        print(f"  {k:20s} {v:9.2f}")

    reference, uncached_s = generate(model, latents, timesteps, kwargs)
    report["uncached_s"] = uncached_s
    print(f"uncached {args.steps} steps: {uncached_s:.2f} s")
    if args.calibrate:
        # A random-init model has no learned trajectory, so a published codebook says little about it: record its
        # per-step metrics with a rate-1 run (the calibration tool's method) and place the thresholds on them.
        recorder = ac.optimize(model, RECORD_CONFIG.replace(moreg=None), num_steps=args.steps)
        recorder.captures.entries.append(first)
        generate(recorder, latents, timesteps, kwargs, lambda: recorder.generation(args.steps))
        metrics = metrics_from_stats(recorder.stats["history"][-1])
        config = calibrate_config([metrics], args.steps, args.calibrate)
        for module in (eager, graphs):
            module.adacache_config = config
        report["calibrated_codebook"] = [list(p) for p in config.codebook]
        report["recorded_metrics"] = metrics
        print(f"calibrated ({args.calibrate}) codebook: {[(round(t, 4), r) for t, r in config.codebook]}")
    for name, module in (("adacache_eager", eager), ("adacache_cudagraphs", graphs)):
        module.reset()
        out, seconds = generate(module, latents, timesteps, kwargs, lambda m=module: m.generation(args.steps))
        stats = module.stats["history"][-1]
        computed = len(stats["computed_steps"])
        bound = args.steps / computed
        speedup = uncached_s / seconds
        err = (out.float() - reference.float()).abs().max().item()
        rel = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
        report[name] = {
            "seconds": seconds,
            "computed_steps": stats["computed_steps"],
            "rates": [r["rate"] for r in stats["records"]],
            "speedup": speedup,
            "bound": bound,
            "speedup_over_bound": speedup / bound,
            "max_abs_diff_vs_uncached": err,
            "rel_l2_vs_uncached": rel,
        }
        print(
            f"{name}: {seconds:.2f} s, computed {computed}/{args.steps} steps {stats['computed_steps']}, "
            f"speedup {speedup:.2f}x, bound {bound:.2f}x, speedup/bound {speedup / bound:.3f}, rel L2 {rel:.3f}"
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
