"""``adacache-compile demo`` (:func:`run_demo`): a bundled testbed model (``--testbed``: latte-shapes, the default,
or ltx-textures), uncached vs AdaCache, with a table, GIFs, a side-by-side PNG and a schedule plot, each named after
the testbed.

Each video is generated on its own (batched CFG inside), so each gets its own adaptive schedule, as in the paper.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import DEFAULT_TESTBED
from .families import FAMILIES
from .timing import timed_runs

__all__ = [
    "run_demo",
    "run_methods",
    "build_cached",
    "generate",
    "summarize",
    "demo_videos",
    "DEMO_VIDEOS",
    "Method",
    "format_table",
]

logger = logging.getLogger(__name__)

DEMO_SEED_BASE = 11


def demo_videos(family) -> list[tuple[str, int, int]]:
    """``(first label, second label index, seed)``: one video per second label of the testbed's family (latte-shapes:
    motion buckets static to fast; ltx-textures: camera motions), first labels in turn, seeds 11, 12, ..."""
    return [
        (family.first_labels[index % len(family.first_labels)], index, DEMO_SEED_BASE + index)
        for index in range(len(family.second_labels))
    ]


# The default testbed's: square static, disc slow, triangle medium, cross fast.
DEMO_VIDEOS = demo_videos(FAMILIES[DEFAULT_TESTBED])


def _recognised_shapes(videos: torch.Tensor, labels) -> list[bool]:
    from .recognise import recognised

    return recognised(videos, [first for first, _, _ in labels])


# Testbeds with a recogniser of their first label: per video [B, C, F, H, W] and its labels, is it recognised?
RECOGNISERS = {"latte-shapes": _recognised_shapes}


@dataclass
class Method:
    name: str
    config: object | None  # AdaCacheConfig, or None for the uncached model
    videos: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0
    schedules: list[dict] = field(default_factory=list)


def default_methods(num_steps: int) -> list[Method]:
    from ..config import PRESETS, AdaCacheConfig

    fast, slow = AdaCacheConfig.preset(f"fast-{num_steps}"), AdaCacheConfig.preset(f"slow-{num_steps}")
    methods = [
        Method("uncached", None),
        Method("AdaCache-fast", fast),
        Method("AdaCache-slow", slow),
        Method("AdaCache-fast+MoReg", AdaCacheConfig.preset(f"fast-{num_steps}+moreg")),
    ]
    # The forecasting presets (ours) where this step count has them.
    for name in ("fast", "slow"):
        forecast = sorted(p for p in PRESETS if p.startswith(f"{name}-{num_steps}+f"))
        methods += [Method(f"AdaCache-{name}+{p.rpartition('+')[2]}", PRESETS[p]) for p in forecast]
    return methods


def build_cached(testbed, methods: list[Method], num_steps: int):
    """One `CachedTransformer` for every AdaCache method of `methods` (built with the MoReg config if any, so its
    programs carry the motion tap), or None when all methods are uncached."""
    from .. import optimize

    moreg = next((m.config for m in methods if m.config is not None and m.config.moreg is not None), None)
    base = next((m.config for m in methods if m.config is not None), None)
    return optimize(testbed.transformer, moreg or base, num_steps=num_steps) if base is not None else None


def generate(testbed, method: Method, videos, num_steps: int, cached=None, progress: bool = True):
    """``(seconds, videos, schedules)`` of one method: each video in its own generation, timed around sampling."""
    from .sample import sample

    module = testbed.transformer if method.config is None else cached
    if method.config is not None:
        cached.use_config(method.config)
    runs = timed_runs(
        lambda video: sample(module, testbed, [video[:2]], [video[2]], num_steps=num_steps, progress=progress),
        videos,
        context=None if method.config is None else lambda: cached.generation(num_steps=num_steps),
        after=None if method.config is None else lambda: cached.stats["history"][-1],
    )
    return runs.total, runs.results, runs.records


def run_methods(testbed, methods: list[Method], videos, num_steps: int, progress: bool = True) -> list[Method]:
    """Generate every video with every method; wall time per method is the sum over its videos (same process)."""
    cached = build_cached(testbed, methods, num_steps)
    generate(testbed, methods[0], videos[:1], num_steps, cached, progress=False)
    for method in methods:
        # Untimed warm-up first (capture and planning happen on the first call, and a config with another forecast
        # order or MoReg strides re-captures): the table times generation, not one-off set-up.
        if method.config is not None:
            generate(testbed, method, videos[:1], num_steps, cached, progress=False)
        seconds, outputs, schedules = generate(testbed, method, videos, num_steps, cached, progress)
        method.seconds += seconds
        method.videos.extend(outputs)
        method.schedules.extend(schedules)
    return methods


def summarize(methods: list[Method], num_steps: int, recognise=None) -> list[dict]:
    """Rows of the table; with ``recognise`` (videos [B, C, F, H, W] -> per video whether it shows its labelled
    shape) each row also says how many of its videos do (``shapes_recognised``)."""
    from .metrics import psnr, ssim

    reference = methods[0]
    rows = []
    for method in methods:
        computed = [len(s["computed_steps"]) for s in method.schedules] or [num_steps] * len(method.videos)
        row = {
            "method": method.name,
            "computed_steps": sum(computed) / len(computed),
            "computed_per_video": computed,
            "seconds": method.seconds,
            "speedup": reference.seconds / method.seconds,
            "psnr": None,
            "ssim": None,
        }
        if recognise is not None:
            row["shapes_recognised"] = sum(recognise(torch.cat(method.videos)))
        if method is not reference:
            video, ref = torch.cat(method.videos), torch.cat(reference.videos)
            row["psnr"], row["ssim"] = psnr(video, ref), ssim(video, ref)
        rows.append(row)
    return rows


def format_table(rows: list[dict], num_steps: int) -> str:
    shapes = all("shapes_recognised" in r for r in rows)
    lines = [
        f"| method | computed steps (of {num_steps}) | wall time (s) | speedup | PSNR (dB) | SSIM |"
        + (" shape recognised |" if shapes else ""),
        "|---|---|---|---|---|---|" + ("---|" if shapes else ""),
    ]
    for r in rows:
        psnr = "-" if r["psnr"] is None else ("inf" if r["psnr"] == float("inf") else f"{r['psnr']:.2f}")
        ssim = "-" if r["ssim"] is None else f"{r['ssim']:.4f}"
        recognised = f" {r['shapes_recognised']}/{len(r['computed_per_video'])} |" if shapes else ""
        lines.append(
            f"| {r['method']} | {r['computed_steps']:.1f} | {r['seconds']:.2f} | {r['speedup']:.2f}x | {psnr} | {ssim} |"
            + recognised
        )
    return "\n".join(lines)


def plot_schedules(methods: list[Method], videos, num_steps: int, path: Path, family) -> Path:
    """Per cached method, the metric at computed steps of each video (labelled with the family's label names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cached = [m for m in methods if m.schedules]
    fig, axes = plt.subplots(len(cached), 1, figsize=(10, 2.6 * len(cached)), sharex=True, squeeze=False)
    for ax, method in zip(axes[:, 0], cached):
        for (first, second, _), schedule in zip(videos, method.schedules):
            steps = [r["step"] for r in schedule["records"] if r["metric"] is not None]
            metric = [r["metric"] for r in schedule["records"] if r["metric"] is not None]
            (line,) = ax.plot(steps, metric, marker="o", ms=3, label=f"{first}, {family.second_labels[second]}")
            ax.scatter(
                schedule["computed_steps"],
                [0] * len(schedule["computed_steps"]),
                marker="|",
                s=80,
                color=line.get_color(),
            )
        ax.set_title(f"{family.name}, {method.name}: metric at computed steps (ticks at 0 = computed steps)")
        ax.set_ylabel("metric c")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel(f"denoising step (1..{num_steps})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(
    out_dir: Path, num_steps: int = 50, progress: bool = True, videos=None, testbed: str = DEFAULT_TESTBED
) -> list[dict]:
    """Uncached vs AdaCache (fast, slow, fast+MoReg and the forecasting presets for ``num_steps``) on ``testbed`` (a
    shipped testbed's name or a checkpoint directory) and ``videos`` ((first label, second label index, seed) each;
    default :func:`demo_videos`): writes to ``out_dir`` a GIF per method and video, ``side_by_side_<testbed>.png``,
    ``schedules_<testbed>.png``, ``demo_<testbed>.json`` and ``demo_<testbed>.md``; returns the table rows. The
    "shape recognised" column is there for testbeds with a recogniser (:data:`RECOGNISERS`: latte-shapes)."""
    from . import load_testbed
    from .sample import save_gif, side_by_side_png

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = load_testbed(testbed)
    family, name = model.family, model.name
    videos = demo_videos(family) if videos is None else videos
    methods = run_methods(model, default_methods(num_steps), videos, num_steps, progress=progress)
    recognise = RECOGNISERS.get(name)
    rows = summarize(methods, num_steps, None if recognise is None else lambda batch: recognise(batch, videos))
    table = format_table(rows, num_steps)
    for method in methods:
        for (first, second, seed), video in zip(videos, method.videos):
            save_gif(video[0], out_dir / f"{name}_{method.name}_{first}_{family.second_labels[second]}_seed{seed}.gif")
    sheet = {}
    for index, (first, second, _) in enumerate(videos):
        for method in methods:
            sheet[f"{method.name} | {first} {family.second_labels[second]}"] = method.videos[index][0]
    side_by_side_png(sheet, out_dir / f"side_by_side_{name}.png")
    plot_schedules(methods, videos, num_steps, out_dir / f"schedules_{name}.png", family)
    record = {"testbed": name, "num_steps": num_steps, "videos": [list(v) for v in videos], "rows": rows}
    (out_dir / f"demo_{name}.json").write_text(json.dumps(record, indent=2))
    heading = f"Testbed {name} ({family.transformer_class}), {len(videos)} videos, {num_steps} steps"
    (out_dir / f"demo_{name}.md").write_text(f"{heading}\n\n{table}\n")
    print(f"{heading}\n\n{table}")
    print(f"\nwrote GIFs, side_by_side_{name}.png, schedules_{name}.png, demo_{name}.json and .md to {out_dir}")
    return rows
