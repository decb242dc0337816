"""Reporting: the markdown report, the Pareto plot and the JSON record of a run, each named after its testbed
(``quality_latency_<testbed>.json`` / ``.md`` / ``_pareto.png``)."""

from __future__ import annotations

import json
from pathlib import Path

from .methods import static_group
from .scoring import PEER_ENDS_DB, PEER_FAMILIES

__all__ = ["output_paths", "format_report", "plot_pareto", "write_outputs"]

# Marks of the "computed steps" column for peers, by how the count was obtained (scoring.score's computed_source).
_COMPUTED_MARKS = {"cache-dit record": "†", "last block ran": "‡"}
_COMPUTED_NOTES = {
    "cache-dit record": "† cache-dit's own record: steps on which every layer ran (its first layer, F1, runs on every "
    "step).",
    "last block ran": "‡ counted: steps on which the last block ran (a block-stack hook skips the whole stack).",
}


def output_paths(testbed_name: str, out_dir: Path) -> dict[str, Path]:
    """The record, report and plot of a run on ``testbed_name`` in ``out_dir``."""
    stem = Path(out_dir) / f"quality_latency_{testbed_name}"
    return {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md"), "png": Path(f"{stem}_pareto.png")}


def _fmt(value, spec: str, none: str = "n/a") -> str:
    if value is None:
        return none
    if value == float("inf"):
        return "inf"
    return format(value, spec)


def format_report(results: dict) -> str:
    """Markdown: the testbed, the main table, targets, computed steps by second label, the peers' calibrations and
    what does not apply."""
    n, names = results["num_steps"], results["second_labels"]
    lines = [
        f"Testbed **{results['testbed']}** ({results['transformer']}), {len(results['videos'])} videos, {n} steps, "
        f"{results['threads']} thread(s).",
        "",
        f"| method | computed steps (of {n}) | block compute | wall (s, median) | speedup | speedup / bound "
        "| PSNR (dB) | SSIM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        fraction = _fmt(r["compute_fraction"], ".2f")
        if r["compute_source"] == "linear FLOPs (video 1)":
            fraction += "*"
        computed = _fmt(r["computed_steps"], ".1f", "-") + _COMPUTED_MARKS.get(r.get("computed_source"), "")
        lines.append(
            f"| {r['method']} | {computed} | {fraction} | {r['seconds']:.2f} "
            f"| {r['speedup']:.2f}x | {_fmt(r.get('speedup_over_bound'), '.2f', '-')} | {_fmt(r['psnr'], '.2f')} "
            f"| {_fmt(r['ssim'], '.4f')} |"
        )
    lines.append("")
    lines.append("\\* measured: block nn.Linear multiply-adds on video 1 over the uncached run's.")
    sources = {r.get("computed_source") for r in results["rows"]}
    lines += [note for source, note in _COMPUTED_NOTES.items() if source in sources]
    lines += ["", "### Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    if results["motion"]:
        labels = sorted(next(iter(results["motion"].values())), key=int)
        lines += ["", "### Computed steps by second label (motion; mean per video)", ""]
        lines.append("| method | " + " | ".join(f"{label} {names[int(label)]}" for label in labels) + " |")
        lines.append("|---" * (len(labels) + 1) + "|")
        for name, by_label in results["motion"].items():
            lines.append(f"| {name} | " + " | ".join(f"{by_label[label]:.1f}" for label in labels) + " |")
    if results.get("calibrations"):
        lines += ["", "### Peers' calibrations (untimed, on videos disjoint from the measured ones)", ""]
        for name, record in results["calibrations"].items():
            ratios = " ".join(f"{r:.3f}" for r in record["mag_ratios"])
            videos = ", ".join(f"{v[0]}/{names[int(v[1])]} seed {v[2]}" for v in record["videos"])
            lines.append(f"- **{name}** on {videos}: mag_ratios (mean per step) {ratios}")
    warned = [r for r in results["rows"] if r.get("peer_warnings")]
    if warned:
        lines += ["", "### What the peers' libraries warned (video 1)", ""]
        lines += [f"- **{r['method']}**: {' | '.join(r['peer_warnings'])}" for r in warned]
    if results["not_applicable"]:
        lines += ["", "### Diffusers hooks and cache-dit settings that do not apply", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in results["not_applicable"].items()]
    return "\n".join(lines) + "\n"


_OUR_STYLE = {"AdaCache": ("tab:red", "o"), "static": ("tab:gray", "s")}
_PEER_STYLE = {
    "PAB": ("tab:olive", "s"),
    "FasterCache": ("tab:brown", "D"),
    "TaylorSeer (blocks)": ("tab:blue", "^"),
    "TaylorSeer (attn+ff)": ("tab:cyan", "v"),
    "FirstBlockCache": ("tab:orange", "<"),
    "SeaCache": ("tab:green", ">"),
    "MagCache": ("darkgreen", "h"),
    "cache-dit DBCache F1B0": ("tab:purple", "P"),
    "cache-dit DBCache+TaylorSeer F1B0": ("tab:pink", "X"),
}


def plot_pareto(results: dict, path: Path) -> Path:
    """Speedup against PSNR for every method: ours (AdaCache presets and static strides, one line per family and
    forecast order, red / grey, darker with the order) against the peers (hollow markers, one marker and colour per
    method and setting kind); the title names the testbed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["family"] != "uncached" and r["psnr"] not in (None, float("inf"))]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("group") or r["family"], []).append(r)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for group, members in groups.items():
        members = sorted(members, key=lambda r: r["speedup"])
        xs, ys = [r["speedup"] for r in members], [r["psnr"] for r in members]
        if members[0]["family"] in PEER_FAMILIES:
            colour, marker = _PEER_STYLE.get(group, ("black", "*"))
            ax.scatter(xs, ys, facecolors="none", edgecolors=colour, marker=marker, s=55, label=group, zorder=3)
            ax.plot(xs, ys, color=colour, alpha=0.35, linestyle=":", zorder=2)
        else:
            family = "AdaCache" if members[0]["family"] == "adacache" else "static"
            colour, marker = _OUR_STYLE[family]
            order = members[0].get("forecast_order") or 0
            alpha = (1.0, 0.75, 0.5)[min(order, 2)]
            linestyle = ("-", "--", "-.")[min(order, 2)]
            if group == static_group(order, even=True):
                colour, marker, linestyle = "black", "x", ":"
            ax.plot(xs, ys, color=colour, marker=marker, alpha=alpha, linestyle=linestyle, label=group, zorder=4)
        for r in members:
            ax.annotate(
                r["method"].split(" (")[0].replace("cache-dit ", ""),
                (r["speedup"], r["psnr"]),
                fontsize=6,
                xytext=(4, 3),
                textcoords="offset points",
            )
    for end in PEER_ENDS_DB:
        ax.axhline(end, color="black", alpha=0.15, linewidth=0.8)
    ax.set_xlabel("wall-clock speedup vs uncached")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title(
        f"{results['testbed']} ({results['transformer']}), {len(results['videos'])} videos, "
        f"{results['num_steps']} steps"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(results: dict, out_dir: Path) -> str:
    """Write the run's JSON record, markdown report and Pareto plot (:func:`output_paths`); returns the report."""
    paths = output_paths(results["testbed"], out_dir)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    report = format_report(results)
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["md"].write_text(report)
    plot_pareto(results, paths["png"])
    return report
