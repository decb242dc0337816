"""Export every tiny model family (and the bundled testbed) to ONNX and report what TensorRT would make of it.

Usage: python benchmarks/export_findings.py [--families tiny-dit,latte,...] [--out-dir DIR] [--threads 2]

For each subject: ``optimize`` → ``to_onnx`` (every axis the capture found dynamic; to_onnx itself falls back to
batch-only where onnxruntime disagrees), then the node counts of ``full.onnx`` / ``skip.onnx``, onnxruntime parity
with the torch programs (max relative error over every output of both programs, computed here from the files) and
``check_onnx_for_tensorrt`` findings. Prints one markdown table and the findings' messages.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from adacache_compile import AdaCacheConfig, optimize
from adacache_compile.export import program_examples, read_export_manifest, to_onnx
from adacache_compile.export.ort_backend import OrtProgram
from adacache_compile.export.trt_check import check_onnx_for_tensorrt
from adacache_compile.testbed.tiny_models import FAMILIES, build

SUBJECTS = [*FAMILIES, "testbed"]


def build_subject(name: str):
    """``(model, kwargs)``: a tiny family from tests/tiny_models.py, or the testbed called the way its sampler does."""
    if name != "testbed":
        model, kwargs = build(name)
        return model, kwargs if name == "tiny-dit" else dict(kwargs, return_dict=False)
    from adacache_compile.testbed import load_testbed

    testbed = load_testbed()
    condition = torch.cat([testbed.make_condition([("disc", 1)]), testbed.cond.null(1)])
    kwargs = dict(
        hidden_states=torch.randn(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0)),
        timestep=torch.full((2,), 500, dtype=torch.long),
        encoder_hidden_states=condition,
        return_dict=False,
    )
    return testbed.transformer, kwargs


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def onnxruntime_parity(cached, out_dir: Path) -> float:
    """Max relative error of the exported full and skip programs against the torch programs, every output."""
    examples, expected = program_examples(cached.plan.programs, cached.plan.example_inputs)
    expected_full, expected_skip = expected["full"], expected["skip"]
    actual_full = OrtProgram(out_dir / "full.onnx")(*examples["full"])
    actual_skip = OrtProgram(out_dir / "skip.onnx")(*examples["skip"])
    pairs = list(zip(actual_full, expected_full)) + list(zip(actual_skip, expected_skip))
    if len(pairs) != len(expected_full) + len(expected_skip):
        raise AssertionError("onnxruntime returned a different number of outputs than torch")
    for actual, expected in pairs:
        if actual.shape != expected.shape:
            raise AssertionError(f"onnxruntime output shape {tuple(actual.shape)} != torch {tuple(expected.shape)}")
    return max(relative_error(actual, expected) for actual, expected in pairs)


def node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _op_summary(findings) -> str:
    counts = Counter(f.op_type for f in findings)
    return ", ".join(f"{op} ×{n}" if n > 1 else op for op, n in sorted(counts.items())) or "-"


def report(name: str, out_dir: Path) -> dict:
    model, kwargs = build_subject(name)
    start = time.perf_counter()
    cached = optimize(model, AdaCacheConfig.preset("fast-50"), example_inputs=kwargs)
    to_onnx(cached, out_dir)
    seconds = time.perf_counter() - start
    manifest = read_export_manifest(out_dir)
    findings = {program: check_onnx_for_tensorrt(out_dir / f"{program}.onnx") for program in ("full", "skip")}
    everything = findings["full"] + findings["skip"]
    return {
        "name": name,
        "axes": ", ".join(sorted(manifest.profile_ranges)) or "static",
        "full_nodes": node_count(out_dir / "full.onnx"),
        "skip_nodes": node_count(out_dir / "skip.onnx"),
        "parity": onnxruntime_parity(cached, out_dir),
        "errors": [f for f in everything if f.severity == "error"],
        "warnings": [f for f in everything if f.severity != "error"],
        "findings": findings,
        "seconds": seconds,
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| family | dynamic axes | full / skip ONNX nodes | ORT parity (max rel err) | TRT errors | TRT warnings "
        "(op types) | export s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "failure" in row:
            lines.append(f"| {row['name']} | - | - | - | export failed: {row['failure']} | - | - |")
            continue
        lines.append(
            f"| {row['name']} | {row['axes']} | {row['full_nodes']} / {row['skip_nodes']} | {row['parity']:.1e} | "
            f"{len(row['errors'])} {_op_summary(row['errors']) if row['errors'] else ''} | "
            f"{len(row['warnings'])}: {_op_summary(row['warnings'])} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines)


def format_messages(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        for program, findings in row.get("findings", {}).items():
            for message in sorted({f"{f.severity} {f.kind} {f.op_type}: {f.message}" for f in findings}):
                lines.append(f"- {row['name']} {program}.onnx: {message}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", default=",".join(SUBJECTS), help="comma-separated subset of " + str(SUBJECTS))
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the exports here (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.families.split(",") if n]
    unknown = set(names) - set(SUBJECTS)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; expected some of {SUBJECTS}")
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out_dir or Path(scratch)
        rows = []
        for name in names:
            print(f"exporting {name} ...", file=sys.stderr, flush=True)
            try:
                rows.append(report(name, root / name))
            except Exception as e:  # one family's failure is a result to report, not a reason to stop
                rows.append({"name": name, "failure": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
            print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_table(rows))
    print()
    print(format_messages(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
