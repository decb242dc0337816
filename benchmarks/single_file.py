"""What the one-file export costs against the two programs, in onnxruntime, per step.

Usage: python benchmarks/single_file.py [--depth 12] [--dim 256] [--repeats 50] [--threads 0] [--out-dir DIR]

Exports a small DiT where the blocks dominate (as ``skip_cost.py``) both ways, ``to_onnx`` (``full.onnx`` +
``skip.onnx``) and ``to_onnx(single_file=True)`` (``cached.onnx``, an ONNX ``If``), and times in onnxruntime (CPU
provider, ``--threads`` intra-op threads, 0 = onnxruntime's default) the median of ``--repeats`` calls (after one
untimed call) of:

- a skipped step: ``cached.onnx`` with ``compute`` false against ``skip.onnx`` (target <= 1.2x: the ``If`` must not
  evaluate the full branch);
- a computed step: ``cached.onnx`` with ``compute`` true against ``full.onnx``.

Each program gets the inputs a step of the runtime gives it (the cached deltas of a computed step, the previous
tap). Timings mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from adacache_compile.export import to_onnx
from adacache_compile.export.ort_backend import OrtProgram
from adacache_compile.testbed.timing import timed_runs

try:
    from benchmarks.skip_cost import add_model_arguments, cached_model
except ImportError:  # run as a script: benchmarks/ is the script's directory
    from skip_cost import add_model_arguments, cached_model

SKIP_TARGET = 1.2


def median_ms(program, inputs, repeats: int) -> float:
    """Median wall milliseconds of ``repeats`` calls of ``program(*inputs)`` after one untimed call."""
    return timed_runs(lambda _: program(*inputs), range(repeats), warmup=1).median * 1e3


def graph_sizes(two: Path, one: Path) -> dict[str, int]:
    """Node counts of ``skip.onnx`` / ``full.onnx`` and of the ``If``'s else / then branch of ``cached.onnx``."""
    import onnx

    def count(path: Path) -> int:
        return len(onnx.load(str(path), load_external_data=False).graph.node)

    if_node = next(
        n for n in onnx.load(str(one / "cached.onnx"), load_external_data=False).graph.node if n.op_type == "If"
    )
    branches = {a.name: len(a.g.node) for a in if_node.attribute}
    return {
        "skip.onnx nodes": count(two / "skip.onnx"),
        "else_branch nodes": branches["else_branch"],
        "full.onnx nodes": count(two / "full.onnx"),
        "then_branch nodes": branches["then_branch"],
    }


def _session_options(threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return options


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the exports here (default: a temp dir)")
    args = parser.parse_args(argv)
    _, _, cached, inputs = cached_model(args)
    programs = cached.programs
    with torch.no_grad():
        tap_prev = torch.randn(programs.tap_shape(*inputs))
        deltas = list(programs.decode_full(programs.full(*inputs, tap_prev)).deltas)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out_dir or Path(tmp)
        two = to_onnx(cached, root / "two")
        one = to_onnx(cached, root / "one", single_file=True)
        options = _session_options(args.threads)
        load = lambda path: OrtProgram(path, providers=["CPUExecutionProvider"], session_options=options)  # noqa: E731
        full, skip, cond = load(two / "full.onnx"), load(two / "skip.onnx"), load(one / "cached.onnx")
        times = {
            "skip.onnx": median_ms(skip, [*inputs, *deltas], args.repeats),
            "cached.onnx skipped": median_ms(cond, [*inputs, torch.tensor(False), *deltas, tap_prev], args.repeats),
            "full.onnx": median_ms(full, [*inputs, tap_prev], args.repeats),
            "cached.onnx computed": median_ms(cond, [*inputs, torch.tensor(True), *deltas, tap_prev], args.repeats),
        }
        sizes = graph_sizes(two, one)
        # What a skipped step of the one file returns besides the model outputs and the metrics (the deltas and the
        # tap: empty, the runtime keeps its cached ones), against the cached values a skip reads.
        skipped = cond(*inputs, torch.tensor(False), *deltas, tap_prev)[programs.num_outputs : -1]
    passed_through = sum(t.numel() * t.element_size() for t in skipped)
    cached_bytes = sum(t.numel() * t.element_size() for t in (*deltas, tap_prev))
    skip_ratio = times["cached.onnx skipped"] / times["skip.onnx"]
    full_ratio = times["cached.onnx computed"] / times["full.onnx"]
    print(f"model: TinyVideoDiT depth={args.depth} dim={args.dim}, tokens={args.frames * (args.size // 2) ** 2}")
    print(f"onnxruntime CPU, intra-op threads={args.threads or 'default'}, repeats={args.repeats} (median)")
    print(" | ".join(f"{name} {ms:.3f} ms" for name, ms in times.items()))
    print(" | ".join(f"{name} {count}" for name, count in sizes.items()))
    print(
        f"a skipped step of cached.onnx returns {passed_through} bytes of deltas and tap (the cached deltas and "
        f"tap_prev it does not pass through: {cached_bytes} bytes)"
    )
    print(f"skipped step: cached.onnx / skip.onnx = {skip_ratio:.3f} (target <= {SKIP_TARGET})")
    print(f"computed step: cached.onnx / full.onnx = {full_ratio:.3f}")
    return {
        **times,
        **sizes,
        "passed_through_bytes": passed_through,
        "cached_bytes": cached_bytes,
        "skip_ratio": skip_ratio,
        "full_ratio": full_ratio,
    }


if __name__ == "__main__":
    main()
