"""Quality against latency on the testbed for AdaCache, static strides and the diffusers cache hooks, with a JSON
record, a markdown report and a Pareto plot.

    python benchmarks/quality_latency.py [--out bench_out] [--steps 50] [--repeats 3] [--threads 1]

Every method generates the same videos (4 shapes x 4 motion buckets, fixed seeds), one video per generation.
Wall time is measured in rounds: each round runs every method still due a repeat, so slow drift of a shared machine
hits all methods alike; a method's time is the median of its rounds, and speedups are ratios within this run.

Diffusers hooks are driven through :class:`HookedDenoiser`, a wrapper that records the timestep of the current call
(PyramidAttentionBroadcast and FasterCache read it through ``current_timestep_callback``), enters the cache context
that FirstBlockCache, MagCache and SeaCache require, and can put the unconditional half of the batch first, the order
FasterCache assumes. Hooks that raise on this model, or run and change nothing, are reported as not applicable.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adacache_compile.testbed.demo import Method, build_cached, generate, summarize
from adacache_compile.testbed.timing import timed_runs

__all__ = [
    "BENCH_VIDEOS",
    "BenchMethod",
    "HookCandidate",
    "HookedDenoiser",
    "adacache_methods",
    "hook_candidates",
    "hook_methods",
    "default_methods",
    "run_bench",
    "format_report",
    "plot_pareto",
    "write_outputs",
    "main",
]

logger = logging.getLogger(__name__)

# Seeds 3000-3015: disjoint from calibration (1000-1040) and the demo (11-14). One video per (shape, motion bucket).
BENCH_SEED_BASE = 3000
BENCH_SHAPES = ("square", "disc", "triangle", "cross")
MOTION_BUCKET_INDICES = (0, 1, 2, 3)  # the testbed's motion labels (indices into data.MOTION_BUCKET_SPEEDS)
BENCH_VIDEOS = [
    (shape, motion, BENCH_SEED_BASE + 4 * shape_index + motion)
    for shape_index, shape in enumerate(BENCH_SHAPES)
    for motion in MOTION_BUCKET_INDICES
]
STATIC_STRIDES = (2, 3, 4)
# Main knob of each applicable hook, swept from mild to aggressive.
PAB_SKIP_RANGES = ((2, 3, 4), (3, 4, 6), (4, 6, 8))  # (spatial, temporal, cross) attention block skip ranges
FASTER_CACHE_SKIP_RANGES = (2, 3, 4)  # spatial (and temporal) attention block skip range
TAYLORSEER_INTERVALS = (2, 3, 4, 6)  # cache_interval
# TaylorSeer's default patterns (`re.fullmatch("^transformer_blocks.*attn", name)`) match no module of Latte, whose
# attention layers are `attn1`/`attn2`; it is pointed at whole blocks instead, the unit our caching skips.
TAYLORSEER_LATTE_BLOCKS = [r"(temporal_)?transformer_blocks\.\d+"]
DEFAULT_REPEATS = 3


@dataclass
class BenchMethod(Method):
    """A :class:`Method` with what the bench needs on top.

    ``family``: "uncached", "adacache", "static" or "hook". ``hook``: for a diffusers hook, a factory of its config
    given the denoiser (for the timestep callback); ``uncond_first`` puts the unconditional half first for it.
    ``repeats``: timed rounds. ``compute_fraction`` / ``compute_source``: fraction of block compute and how it was
    obtained ("schedule" for ours, "linear FLOPs" measured for hooks).
    """

    family: str = "adacache"
    hook: Callable[[HookedDenoiser], object] | None = None
    uncond_first: bool = False
    repeats: int = 1
    round_seconds: list[float] = field(default_factory=list)
    compute_fraction: float | None = None
    compute_source: str = "n/a"


@dataclass(frozen=True)
class HookCandidate:
    """A diffusers cache hook tried on the model at its defaults before the sweep; ``needs`` says what it requires."""

    name: str
    make: Callable[[HookedDenoiser], object]
    needs: str


class HookedDenoiser(torch.nn.Module):
    """The transformer called the way the sampler calls it, plus what the diffusers cache hooks need from a pipeline.

    ``current_timestep`` is the timestep of the call in progress; ``step_index`` counts calls since :meth:`reset`.
    Each call runs inside ``transformer.cache_context("cfg", step_index=..., sigma=..., num_inference_steps=...)``;
    sigma is the DDPM timestep fraction t / T (the hooks that read it were written for flow matching).
    """

    def __init__(self, transformer: torch.nn.Module, num_steps: int, num_train_timesteps: int = 1000):
        super().__init__()
        self.transformer = transformer
        self.num_steps = num_steps
        self.num_train_timesteps = num_train_timesteps
        self.uncond_first = False
        self.current_timestep: int | None = None
        self.step_index = 0

    def reset(self) -> None:
        """Start a new generation: step counter and every stateful hook back to their initial state."""
        self.step_index = 0
        self.current_timestep = None
        self.transformer._reset_stateful_cache()

    def forward(self, hidden_states, timestep, encoder_hidden_states, **kwargs):
        self.current_timestep = int(timestep.flatten()[0])
        if self.uncond_first:
            hidden_states, timestep, encoder_hidden_states = map(
                _swap_halves, (hidden_states, timestep, encoder_hidden_states)
            )
        context = self.transformer.cache_context(
            "cfg",
            step_index=self.step_index,
            sigma=self.current_timestep / self.num_train_timesteps,
            num_inference_steps=self.num_steps,
        )
        with context:
            output = self.transformer(
                hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states, **kwargs
            )
        self.step_index += 1
        if self.uncond_first:
            output = (_swap_halves(output[0]), *output[1:])
        return output


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


class _LinearFlops:
    """Counts multiply-adds of the nn.Linear layers inside the transformer blocks while active (context manager).

    A hook that skips a block, an attention layer or a batch half skips its linears, so the count of a hooked run
    over the count of the uncached run estimates the fraction of block compute it kept (attention score matmuls are
    not counted)."""

    def __init__(self, transformer: torch.nn.Module):
        self.linears = [
            module
            for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name
        ]
        self.total = 0
        self._handles = []

    def _count(self, module, args):
        self.total += args[0].numel() // module.in_features * module.in_features * module.out_features

    def __enter__(self):
        self.total = 0
        self._handles = [linear.register_forward_pre_hook(self._count) for linear in self.linears]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False


# --- methods ---------------------------------------------------------------------------------------------------------
def _preset(name: str, num_steps: int):
    """The preset calibrated for `num_steps` ("fast-50"), else the 30-step reference one with a warning."""
    from adacache_compile.config import AdaCacheConfig

    variant, _, suffix = name.partition("+")
    wanted = f"{variant}-{num_steps}" + (f"+{suffix}" if suffix else "")
    try:
        return wanted, AdaCacheConfig.preset(wanted)
    except ValueError:
        fallback = f"{variant}-30" + (f"+{suffix}" if suffix else "")
        logger.warning("no preset %r; using %r", wanted, fallback)
        return fallback, AdaCacheConfig.preset(fallback)


def adacache_methods(num_steps: int, repeats: int = DEFAULT_REPEATS) -> list[BenchMethod]:
    """AdaCache fast/slow, each with and without MoReg, from the presets for `num_steps`."""
    methods = []
    for name in ("fast", "fast+moreg", "slow", "slow+moreg"):
        preset, config = _preset(name, num_steps)
        label = "AdaCache-" + name.replace("+moreg", "+MoReg")
        methods.append(BenchMethod(f"{label} ({preset})", config, family="adacache", repeats=repeats))
    return methods


def static_methods(strides=STATIC_STRIDES) -> list[BenchMethod]:
    """Compute every k-th step (plus the forced steps) through our own programs: a one-entry codebook."""
    from adacache_compile.config import AdaCacheConfig

    return [BenchMethod(f"static k={k}", AdaCacheConfig(codebook=((1e9, k),)), family="static") for k in strides]


def hook_methods() -> list[BenchMethod]:
    """The diffusers hooks that apply to Latte, each at a sweep of its main knob."""
    from diffusers.hooks import FasterCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    methods = []
    for spatial, temporal, cross in PAB_SKIP_RANGES:

        def make_pab(denoiser, spatial=spatial, temporal=temporal, cross=cross):
            return PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=spatial,
                temporal_attention_block_skip_range=temporal,
                cross_attention_block_skip_range=cross,
                current_timestep_callback=lambda: denoiser.current_timestep,
            )

        methods.append(BenchMethod(f"PAB s{spatial}/t{temporal}/c{cross}", None, family="hook", hook=make_pab))
    for skip in FASTER_CACHE_SKIP_RANGES:

        def make_faster(denoiser, skip=skip):
            return FasterCacheConfig(
                spatial_attention_block_skip_range=skip,
                temporal_attention_block_skip_range=skip,
                current_timestep_callback=lambda: denoiser.current_timestep,
                tensor_format="BCFHW",
            )

        methods.append(BenchMethod(f"FasterCache s{skip}", None, family="hook", hook=make_faster, uncond_first=True))
    for interval in TAYLORSEER_INTERVALS:

        def make_taylor(denoiser, interval=interval):
            return TaylorSeerCacheConfig(
                cache_interval=interval,
                taylor_factors_dtype=torch.float32,
                cache_identifiers=TAYLORSEER_LATTE_BLOCKS,
            )

        methods.append(BenchMethod(f"TaylorSeer interval={interval}", None, family="hook", hook=make_taylor))
    return methods


def hook_candidates(num_steps: int) -> list[HookCandidate]:
    """The other diffusers cache hooks, at their defaults, to find out whether they apply to Latte."""
    from diffusers import hooks

    return [
        HookCandidate(
            "FirstBlockCache", lambda d: hooks.FirstBlockCacheConfig(), "one residual from first block to last block"
        ),
        HookCandidate(
            "MagCache",
            lambda d: hooks.MagCacheConfig(calibrate=True, num_inference_steps=num_steps),
            "one residual from first block to last block (calibration run)",
        ),
        HookCandidate(
            "SeaCache",
            lambda d: hooks.SeaCacheConfig(),
            "a raw_vision_callback for the model (Cosmos 3 / Wan built in)",
        ),
        HookCandidate("TextKVCache", lambda d: hooks.TextKVCacheConfig(), "NucleusMoEImageTransformerBlock blocks"),
    ]


def default_methods(num_steps: int, repeats: int = DEFAULT_REPEATS) -> list[BenchMethod]:
    return [
        BenchMethod("uncached", None, family="uncached", repeats=repeats),
        *adacache_methods(num_steps, repeats),
        *static_methods(),
        *hook_methods(),
    ]


# --- running ---------------------------------------------------------------------------------------------------------
def _generate_hooked(testbed, method: BenchMethod, denoiser: HookedDenoiser, videos, num_steps: int, progress: bool):
    from adacache_compile.testbed.sample import sample

    transformer = testbed.transformer
    transformer.enable_cache(method.hook(denoiser))
    denoiser.uncond_first = method.uncond_first
    try:
        runs = timed_runs(
            lambda video: sample(denoiser, testbed, [video[:2]], [video[2]], num_steps=num_steps, progress=progress),
            videos,
            before=denoiser.reset,
        )
        return runs.total, runs.results
    finally:
        denoiser.uncond_first = False
        transformer.disable_cache()


def _hook_compute(testbed, make, uncond_first, denoiser, video, num_steps, reference_flops, reference_video):
    """``(fraction of block linear FLOPs, None)`` of a hook on one video, or ``(None, reason)`` when it does not
    apply: it raises, or it runs and changes neither compute nor output."""
    probe = BenchMethod("probe", None, family="hook", hook=make, uncond_first=uncond_first)
    counter = _LinearFlops(testbed.transformer)
    try:
        with counter:
            _, (output,) = _generate_hooked(testbed, probe, denoiser, [video], num_steps, progress=False)
    except Exception as e:  # noqa: BLE001 - any failure of a foreign hook means "does not apply"; the message says why
        return None, f"raises {type(e).__name__}: {str(e).splitlines()[0]}"
    fraction = counter.total / reference_flops
    if fraction == 1.0 and torch.equal(output, reference_video):
        return None, "runs but hooks nothing / skips nothing (output identical to uncached)"
    return fraction, None


def run_bench(
    testbed,
    methods: list[BenchMethod],
    videos=BENCH_VIDEOS,
    num_steps: int = 50,
    candidates: list[HookCandidate] | None = None,
    progress: bool = False,
) -> dict:
    """Run every method on every video; the first method must be the uncached reference.

    Returns ``{"rows": [...], "not_applicable": {hook: reason}, "motion": {...}, ...}`` (see :func:`format_report`).
    """
    from adacache_compile.testbed.sample import sample

    if methods[0].family != "uncached":
        raise ValueError("run_bench: the first method must be the uncached reference")
    denoiser = HookedDenoiser(testbed.transformer, num_steps, testbed.meta["scheduler"]["num_train_timesteps"])
    not_applicable = {}
    if any(m.hook is not None for m in methods) or candidates:
        shape, motion, seed = videos[0]
        counter = _LinearFlops(testbed.transformer)
        with counter:
            reference_video = sample(testbed.transformer, testbed, [(shape, motion)], [seed], num_steps, progress=False)
        for candidate in candidates or []:
            _, reason = _hook_compute(
                testbed, candidate.make, False, denoiser, videos[0], num_steps, counter.total, reference_video
            )
            if reason is not None:
                not_applicable[candidate.name] = f"{reason} (needs {candidate.needs})"
            else:
                logger.warning("%s applies to this model but has no sweep in the bench", candidate.name)
        for method in [m for m in methods if m.hook is not None]:
            fraction, reason = _hook_compute(
                testbed,
                method.hook,
                method.uncond_first,
                denoiser,
                videos[0],
                num_steps,
                counter.total,
                reference_video,
            )
            if reason is not None:
                raise RuntimeError(f"bench: hook method {method.name!r} does not apply: {reason}")
            method.compute_fraction, method.compute_source = fraction, "linear FLOPs (video 1)"

    cached = build_cached(testbed, methods, num_steps)
    for round_index in range(max(m.repeats for m in methods)):
        for method in methods:
            if round_index >= method.repeats:
                continue
            logger.info("round %d: %s", round_index + 1, method.name)
            if method.hook is not None:
                seconds, outputs = _generate_hooked(testbed, method, denoiser, videos, num_steps, progress)
                schedules = []
            else:
                # Untimed first: switching to a config with other MoReg strides re-captures the programs lazily.
                generate(testbed, method, videos[:1], num_steps, cached, progress=False)
                seconds, outputs, schedules = generate(testbed, method, videos, num_steps, cached, progress)
            method.round_seconds.append(seconds)
            if round_index == 0:
                method.videos, method.schedules = outputs, schedules
    for method in methods:
        method.seconds = statistics.median(method.round_seconds)
    return _results(methods, videos, num_steps, not_applicable)


def _results(methods: list[BenchMethod], videos, num_steps: int, not_applicable: dict) -> dict:
    from adacache_compile.testbed.metrics import psnr, ssim

    rows = summarize(methods, num_steps)
    reference = methods[0]
    rows[0]["psnr"] = psnr(torch.cat(reference.videos), torch.cat(reference.videos))
    rows[0]["ssim"] = ssim(torch.cat(reference.videos), torch.cat(reference.videos))
    for row, method in zip(rows, methods):
        row["family"] = method.family
        row["round_seconds"] = method.round_seconds
        if method.schedules:
            row["compute_fraction"] = 1.0 - statistics.mean(s["block_compute_saved"] for s in method.schedules)
            row["compute_source"] = "schedule"
            row["step_bound"] = num_steps / row["computed_steps"]
            row["speedup_over_bound"] = row["speedup"] / row["step_bound"]
        elif method.family == "uncached":
            row["compute_fraction"], row["compute_source"] = 1.0, "all"
        else:
            row["computed_steps"] = None
            row["computed_per_video"] = None
            row["compute_fraction"], row["compute_source"] = method.compute_fraction, method.compute_source
    motion = {
        method.name: {
            str(bucket): statistics.mean(
                len(s["computed_steps"]) for (_, m, _), s in zip(videos, method.schedules) if m == bucket
            )
            for bucket in sorted({m for _, m, _ in videos})
        }
        for method in methods
        if method.family == "adacache"
    }
    return {
        "num_steps": num_steps,
        "videos": [list(v) for v in videos],
        "threads": torch.get_num_threads(),
        "rows": rows,
        "motion": motion,
        "not_applicable": not_applicable,
        "targets": _targets(rows, num_steps),
    }


# --- targets and report ----------------------------------------------------------------------------------------------
def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
    return None


def _targets(rows: list[dict], num_steps: int) -> list[dict]:
    """The project's targets, each with the measured numbers and whether it was met."""
    adacache = {r["method"].split(" (")[0]: r for r in rows if r["family"] == "adacache"}
    hooks = [r for r in rows if r["family"] == "hook"]
    static = [(r["computed_steps"], r["psnr"]) for r in rows if r["family"] == "static"]
    targets = []
    for name, speed, quality in (("AdaCache-fast", 3.0, 25.0), ("AdaCache-slow", 1.8, 30.0)):
        row = adacache.get(name)
        if row is not None:
            targets.append(
                {
                    "target": f"{name} >= {speed}x at PSNR >= {quality} dB",
                    "measured": f"{row['speedup']:.2f}x at {row['psnr']:.2f} dB",
                    "met": row["speedup"] >= speed and row["psnr"] >= quality,
                }
            )
    for name, row in adacache.items():
        better = [h for h in hooks if h["psnr"] >= row["psnr"]]
        if better:
            best = max(better, key=lambda h: h["speedup"])
            ratio = row["speedup"] / best["speedup"]
            measured = (
                f"{row['speedup']:.2f}x vs {best['method']} {best['speedup']:.2f}x ({best['psnr']:.2f} dB): {ratio:.2f}"
            )
            met = ratio >= 1.25
        else:
            measured, met = f"no hook reaches {row['psnr']:.2f} dB; {row['speedup']:.2f}x", None
        targets.append({"target": f"{name}: >= 1.25x the best hook at >= its PSNR", "measured": measured, "met": met})
        static_psnr = _interpolate(static, row["computed_steps"])
        if static_psnr is None:
            measured, met = f"{row['computed_steps']:.1f} steps lies outside the strides' range", None
        else:
            measured = f"{row['psnr']:.2f} dB vs static {static_psnr:.2f} dB at {row['computed_steps']:.1f} steps"
            met = row["psnr"] > static_psnr
        targets.append({"target": f"{name}: beats static strides at equal compute", "measured": measured, "met": met})
    for row in rows:
        if "speedup_over_bound" in row:
            targets.append(
                {
                    "target": f"{row['method']}: speedup / step bound >= 0.95",
                    "measured": f"{row['speedup']:.2f}x / {row['step_bound']:.2f}x = {row['speedup_over_bound']:.2f}",
                    "met": row["speedup_over_bound"] >= 0.95,
                }
            )
    return targets


def _fmt(value, spec: str, none: str = "n/a") -> str:
    if value is None:
        return none
    if value == float("inf"):
        return "inf"
    return format(value, spec)


def format_report(results: dict) -> str:
    """Markdown: the main table, targets, computed steps by motion bucket and the hooks that do not apply."""
    n = results["num_steps"]
    lines = [
        f"| method | computed steps (of {n}) | block compute | wall (s, median) | speedup | speedup / bound "
        "| PSNR (dB) | SSIM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        fraction = _fmt(r["compute_fraction"], ".2f")
        if r["compute_source"] == "linear FLOPs (video 1)":
            fraction += "*"
        lines.append(
            f"| {r['method']} | {_fmt(r['computed_steps'], '.1f', '-')} | {fraction} | {r['seconds']:.2f} "
            f"| {r['speedup']:.2f}x | {_fmt(r.get('speedup_over_bound'), '.2f', '-')} | {_fmt(r['psnr'], '.2f')} "
            f"| {_fmt(r['ssim'], '.4f')} |"
        )
    lines.append("")
    lines.append("\\* measured: block nn.Linear multiply-adds on video 1 over the uncached run's.")
    lines += ["", "### Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    if results["motion"]:
        buckets = sorted(next(iter(results["motion"].values())))
        lines += ["", "### Computed steps by motion bucket (mean per video)", ""]
        lines.append("| method | " + " | ".join(f"motion {b}" for b in buckets) + " |")
        lines.append("|---" * (len(buckets) + 1) + "|")
        for name, by_bucket in results["motion"].items():
            lines.append(f"| {name} | " + " | ".join(f"{by_bucket[b]:.1f}" for b in buckets) + " |")
    if results["not_applicable"]:
        lines += ["", "### Diffusers hooks that do not apply", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in results["not_applicable"].items()]
    return "\n".join(lines) + "\n"


def plot_pareto(results: dict, path: Path) -> Path:
    """Speedup against PSNR, one marker per method, coloured by family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"adacache": "tab:red", "static": "tab:gray", "hook": "tab:blue"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for family, colour in colours.items():
        rows = [r for r in results["rows"] if r["family"] == family]
        ax.scatter([r["speedup"] for r in rows], [r["psnr"] for r in rows], color=colour, label=family, zorder=3)
        for r in rows:
            ax.annotate(
                r["method"].split(" (")[0],
                (r["speedup"], r["psnr"]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("wall-clock speedup vs uncached")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title(f"testbed, {len(results['videos'])} videos, {results['num_steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(results: dict, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = format_report(results)
    (out_dir / "quality_latency.json").write_text(json.dumps(results, indent=2))
    (out_dir / "quality_latency.md").write_text(report)
    plot_pareto(results, out_dir / "quality_latency_pareto.png")
    return report


# --- command line ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory (default: bench_out)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS, help="timed rounds of uncached and AdaCache (default: 3)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, 0 = leave as is (default: 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from adacache_compile.testbed import load_testbed

    if args.threads:
        torch.set_num_threads(args.threads)
    testbed = load_testbed()
    methods = default_methods(args.steps, args.repeats)
    results = run_bench(testbed, methods, BENCH_VIDEOS, args.steps, candidates=hook_candidates(args.steps))
    print(write_outputs(results, args.out))
    print(f"wrote quality_latency.json, .md and _pareto.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
