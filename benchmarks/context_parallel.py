"""Context parallelism on 2+ GPUs: a random-init Wan-shaped DiT, uncached CP vs AdaCache on CP, per-rank memory.

Launch one process per GPU with torchrun (diffusers' Ulysses attention, degree = the number of processes):

    torchrun --nproc-per-node 2 benchmarks/context_parallel.py                 # Wan 1.3B-like, 480p-like latent
    torchrun --nproc-per-node 4 benchmarks/context_parallel.py --frames 21     # the sequence must split evenly
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --cpu-dry-run   # the same code on CPU, gloo, tiny

What it does, on every rank: builds the same model (same seed), ``enable_parallelism(config=ContextParallelConfig(
ulysses_degree=WORLD))``, runs a 50-step flow-matching Euler loop uncached, records the per-step metric with a rate-1
AdaCache run (a random-init model has no learned trajectory, so a published codebook says little about it; as
``gpu_check.py`` does, the ``fast`` codebook is placed on the recording with
``adacache_compile.calibration.calibrate_config``), then runs AdaCache with it. Reports wall seconds (the slowest
rank), speedup, computed steps (checked identical on every rank), per-rank peak memory of each run and the per-rank
cache bytes, and the relative L2 of the cached result against the uncached one. Rank 0 prints and writes
``context_parallel.json`` to ``$OUT`` (or ``--out``).

Requirements: ``--heads`` divisible by the world size (Ulysses splits heads), the token count
``frames * (height / 2) * (width / 2)`` divisible by it (diffusers' equipartition sharder), the native or another
CP-capable attention backend (diffusers refuses others in ``enable_parallelism``). Ring attention (``--ring``) needs
an attention backend that returns the log-sum-exp (flash / cuDNN / ``_native_cudnn``; ``--backend``), so it runs on
GPUs only.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

try:
    from benchmarks.gpu_check import WAN_TEXT_DIM, add_wan_arguments, generate, wan_model
except ImportError:  # run as a script (torchrun benchmarks/context_parallel.py): benchmarks/ is sys.path[0]
    from gpu_check import WAN_TEXT_DIM, add_wan_arguments, generate, wan_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_wan_arguments(parser)
    parser.add_argument("--batch", type=int, default=2, help="2: batched CFG")
    parser.add_argument("--calibrate", default="fast", help="codebook target from a rate-1 recording: fast|slow")
    parser.add_argument("--ring", action="store_true", help="ring attention instead of Ulysses (GPU, LSE backend)")
    parser.add_argument("--backend", default=None, help="diffusers attention backend (model.set_attention_backend)")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--cpu-dry-run", action="store_true", help="CPU, gloo, float32, tiny sizes: a plumbing run")
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        args.layers, args.heads, args.head_dim, args.ffn = 2, 2, 8, 32
        args.frames, args.height, args.width, args.text_len, args.steps = 3, 8, 8, 8, 8
    return args


def check_shapes(args: argparse.Namespace, world: int) -> None:
    """Refuse sizes that diffusers' Ulysses sharding cannot split over ``world`` ranks, naming the flag to change."""
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    if not args.ring and args.heads % world:
        raise SystemExit(f"--heads {args.heads} must be divisible by the world size {world} (Ulysses splits heads)")
    if tokens % world:
        raise SystemExit(
            f"{tokens} tokens (--frames {args.frames} x --height/2 {args.height // 2} x --width/2 {args.width // 2}) "
            f"must be divisible by the world size {world} (diffusers shards the sequence evenly)"
        )


def setup_distributed(cpu: bool) -> tuple[int, int, torch.device]:
    """torchrun's environment -> (rank, world size, device); the process group on NCCL (GPU) or gloo (CPU)."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit(
            "context_parallel.py runs one process per GPU: launch it with torchrun --nproc-per-node N "
            "benchmarks/context_parallel.py"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world < 2:
        raise SystemExit("context parallelism needs 2 or more processes (torchrun --nproc-per-node 2 or more)")
    if cpu:
        if torch.accelerator.device_count() == 0:
            # diffusers' _resolve_parallel_config does rank % torch.accelerator.device_count(): 0 on a CPU machine.
            torch.accelerator.device_count = lambda: 1
        dist.init_process_group("gloo")
        return rank, world, torch.device("cpu")
    if not torch.cuda.is_available() or torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        raise SystemExit("context_parallel.py needs one CUDA GPU per process (or --cpu-dry-run)")
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    return rank, world, torch.device("cuda", local)


def timed(fn, device: torch.device) -> tuple[object, float, int | None]:
    """``fn()``'s result, the slowest rank's wall seconds and this rank's peak allocated CUDA bytes during it (None
    on CPU)."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return result, float(seconds.item()), peak


def gathered(value) -> list:
    """``value`` from every rank (a list indexed by rank)."""
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.cpu_dry_run)
    check_shapes(args, world)
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    import adacache_compile as ac
    from adacache_compile.calibration import RECORD_CONFIG, calibrate_config, metrics_from_stats

    dtype = torch.float32 if args.cpu_dry_run else torch.bfloat16
    model = wan_model(args, device, dtype, freq_dim=16 if args.cpu_dry_run else 256)
    if args.backend:
        model.set_attention_backend(args.backend)
    degrees = dict(ring_degree=world) if args.ring else dict(ulysses_degree=world)
    model.enable_parallelism(config=ContextParallelConfig(**degrees))
    gen = torch.Generator("cpu").manual_seed(0)  # every rank draws the same inputs
    shape = (args.batch, 16, args.frames, args.height, args.width)
    latents = torch.randn(shape, generator=gen).to(device, dtype)
    text = torch.randn(args.batch, args.text_len, WAN_TEXT_DIM, generator=gen).to(device, dtype)
    kwargs = dict(encoder_hidden_states=text)
    timesteps = torch.linspace(1000, 1000 / args.steps, args.steps, device=device)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world,
        "attention": "ring" if args.ring else "ulysses",
        "torch": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "latent": list(shape),
        "tokens": tokens,
        "dtype": str(dtype),
        "steps": args.steps,
    }
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{world} x {report['device']}: Wan-like DiT {report['params'] / 1e9:.2f} B params, {tokens} tokens")

    generate(model, latents, timesteps[:2], kwargs)  # warm-up (NCCL communicators, kernels)
    reference, uncached_s, uncached_peak = timed(lambda: generate(model, latents, timesteps, kwargs)[0], device)
    say(f"uncached CP, {args.steps} steps: {uncached_s:.2f} s")

    cached = ac.optimize(model, RECORD_CONFIG.replace(moreg=None), num_steps=args.steps)
    call = dict(hidden_states=latents, timestep=timesteps[:1].expand(args.batch), return_dict=False, **kwargs)
    t0 = time.perf_counter()
    cached.capture((), call)
    report["capture_s"] = time.perf_counter() - t0
    generate(cached, latents, timesteps, kwargs, lambda: cached.generation(args.steps))  # rate 1: the recording
    recorded = metrics_from_stats(cached.stats["history"][-1])
    config = calibrate_config([recorded], args.steps, args.calibrate)
    cached.use_config(config)
    report["calibrated_codebook"] = [list(p) for p in config.codebook]

    with cached.generation(args.steps) as session:  # one computed step, then the cache holds its deltas and tap
        cached(**call)
        cache_bytes = session.cache_bytes()
    session_factory = lambda: cached.generation(args.steps)  # noqa: E731
    out, cached_s, cached_peak = timed(lambda: generate(cached, latents, timesteps, kwargs, session_factory)[0], device)
    stats = cached.stats["history"][-1]
    computed = stats["computed_steps"]
    decisions = gathered(computed)
    if any(d != decisions[0] for d in decisions):
        raise SystemExit(f"ranks decided differently: {decisions}")
    rel = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
    report.update(
        uncached_s=uncached_s,
        cached_s=cached_s,
        speedup=uncached_s / cached_s,
        computed_steps=computed,
        bound=args.steps / len(computed),
        rel_l2_vs_uncached=rel,
        peak_bytes_per_rank={"uncached": gathered(uncached_peak), "cached": gathered(cached_peak)},
        cache_bytes_per_rank=gathered(cache_bytes),
    )
    say(
        f"AdaCache CP: {cached_s:.2f} s, computed {len(computed)}/{args.steps} steps {computed} (same on every rank), "
        f"speedup {report['speedup']:.2f}x (bound {report['bound']:.2f}x), rel L2 {rel:.4f}"
    )
    say(f"peak memory per rank (bytes): {report['peak_bytes_per_rank']}")
    say(f"cache bytes per rank: {report['cache_bytes_per_rank']}")
    if rank == 0 and args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "context_parallel.json"), "w") as f:
            json.dump(report, f, indent=2)
    dist.destroy_process_group()
    return report if rank == 0 else None


if __name__ == "__main__":
    main()
