"""Export the bundled testbed's full and skip programs to ONNX, check them for TensorRT, and run a generation through
onnxruntime with the same AdaCache schedule as in PyTorch."""

import sys
import tempfile

import adacache_compile as ac
from adacache_compile.export import to_onnx
from adacache_compile.export.trt_check import check_onnx_for_tensorrt, format_findings
from adacache_compile.testbed import load_testbed
from adacache_compile.testbed.sample import sample


def main(out_dir=None):
    out_dir = out_dir or tempfile.mkdtemp(prefix="adacache_onnx_")
    testbed = load_testbed()
    cached = ac.optimize(testbed.transformer, "fast-50", num_steps=50)
    with cached.generation(num_steps=50):
        reference = sample(cached, testbed, [("disc", 2)], [7], num_steps=50, progress=False)
    to_onnx(cached, out_dir)
    for name in ("full.onnx", "skip.onnx"):
        print(name, format_findings(check_onnx_for_tensorrt(f"{out_dir}/{name}")).splitlines()[-1])
    runtime = ac.load(out_dir, backend="onnxruntime")
    with runtime.generation(num_steps=50):
        video = sample(runtime, testbed, [("disc", 2)], [7], num_steps=50, progress=False)
    print(f"exported to {out_dir}; onnxruntime vs torch max abs diff {(video - reference).abs().max().item():.2e}")
    print(f"computed steps: torch {cached.stats['history'][-1]['computed_steps']}")
    print(f"                onnxruntime {runtime.stats['history'][-1]['computed_steps']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
