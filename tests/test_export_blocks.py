"""Export building blocks: ONNX export + onnxruntime parity, pre-export rewrites, manifest, TensorRT op check."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from adacache_compile.errors import ArtifactError  # noqa: E402
from adacache_compile.export.manifest import (  # noqa: E402
    FORMAT_VERSION,
    Manifest,
    ProgramSpec,
    TensorSpec,
    hash_artifacts,
    library_versions,
    model_fingerprint,
    read_manifest,
    verify_artifacts,
    write_manifest,
)
from adacache_compile.export.onnx_export import (  # noqa: E402
    cast_bool_ops_for_onnxruntime,
    drop_non_unit_squeeze_dims,
    export_program,
    onnx_artifact_files,
)
from adacache_compile.export.ort_backend import OrtProgram  # noqa: E402
from adacache_compile.export.staging import atomic_write_bytes  # noqa: E402
from adacache_compile.export.trt_check import check_onnx_for_tensorrt, format_findings  # noqa: E402

BATCH = torch.export.Dim("batch")


class TinyFullProgram(torch.nn.Module):
    """Shaped like a full program: hidden + tap_prev in; output, delta, tap and a 0-d metric out."""

    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Linear(16, 16)
        self.block = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16), torch.nn.GELU())
        self.proj_out = torch.nn.Linear(16, 8)

    def forward(self, hidden, tap_prev):
        x = self.proj_in(hidden)
        tap = self.block[0](x)
        delta = self.block(x)
        out = self.proj_out(x + delta)
        metric = (tap - tap_prev).abs().mean() / tap_prev.abs().mean()
        return out, delta, tap, metric


def _dynamic_graph_module(module, example_inputs, dynamic_shapes):
    return torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes).module()


@pytest.fixture(scope="module")
def full_onnx(tmp_path_factory):
    torch.manual_seed(0)
    inputs = (torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    program = _dynamic_graph_module(TinyFullProgram().eval(), inputs, ({0: BATCH}, {0: BATCH}))
    path = tmp_path_factory.mktemp("export") / "full.onnx"
    export_program(
        program,
        inputs,
        path,
        input_names=["hidden_states", "tap_prev"],
        output_names=["sample", "delta_0", "tap", "metric_l1"],
        dynamic_axes={"hidden_states": {0: "batch"}, "tap_prev": {0: "batch"}},
    )
    return program, path


def test_export_names_and_dynamic_axes(full_onnx):
    _, path = full_onnx
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["hidden_states", "tap_prev"]
    assert [o.name for o in model.graph.output] == ["sample", "delta_0", "tap", "metric_l1"]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
    assert dims == {"sample": ["batch", 5, 8], "delta_0": ["batch", 5, 16], "tap": ["batch", 5, 16], "metric_l1": []}
    assert not list(path.parent.glob("*.tmp*")), "no temporary left behind"


@pytest.mark.parametrize("batch", [2, 3])
def test_onnxruntime_parity(full_onnx, batch):
    program, path = full_onnx
    ort_program = OrtProgram(path, providers=["CPUExecutionProvider"])
    assert ort_program.input_names == ["hidden_states", "tap_prev"]
    inputs = (torch.randn(batch, 5, 16), torch.randn(batch, 5, 16))
    expected = program(*inputs)
    actual = ort_program(*inputs)
    assert len(actual) == len(expected)
    for name, got, want in zip(ort_program.output_names, actual, expected):
        assert got.shape == want.shape, name
        scale = want.abs().max().clamp_min(1e-12)
        assert ((got - want).abs().max() / scale).item() <= 1e-5, name


def test_polygraphy_run_onnxrt(full_onnx):
    _, path = full_onnx
    polygraphy = Path(sys.executable).parent / "polygraphy"
    if not polygraphy.exists():
        pytest.skip("polygraphy entry point not installed next to the interpreter")
    result = subprocess.run(
        [
            str(polygraphy),
            "run",
            str(path),
            "--onnxrt",
            "--input-shapes",
            "hidden_states:[3,5,16]",
            "tap_prev:[3,5,16]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "PASSED" in result.stdout + result.stderr


class BoolWhere(torch.nn.Module):
    def forward(self, mask, a, b, x):
        return torch.where(mask, a, b), x.squeeze(1)


def test_bool_where_and_squeeze_rewrites(tmp_path):
    inputs = (torch.rand(2, 3, 4) > 0.5, torch.rand(2, 3, 4) > 0.5, torch.rand(2, 3, 4) > 0.5, torch.randn(2, 3, 4))
    program = _dynamic_graph_module(BoolWhere(), inputs, ({0: BATCH},) * 4)

    rewritten = torch.fx.GraphModule(program, copy.deepcopy(program.graph))
    assert cast_bool_ops_for_onnxruntime(rewritten)
    assert drop_non_unit_squeeze_dims(rewritten)
    targets = [n.target for n in rewritten.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten._to_copy.default) == 3  # two operands in, one result back
    assert torch.ops.aten.squeeze.dim not in targets
    for got, want in zip(rewritten(*inputs), program(*inputs)):
        assert torch.equal(got, want)

    path = export_program(
        program,
        inputs,
        tmp_path / "where.onnx",
        input_names=["mask", "a", "b", "x"],
        output_names=["selected", "x_out"],
        dynamic_axes={name: {0: "batch"} for name in ["mask", "a", "b", "x"]},
    )
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Squeeze" not in ops
    ort_program = OrtProgram(path, providers=["CPUExecutionProvider"])  # no bool Where kernel would fail here
    test_inputs = (
        torch.rand(4, 3, 4) > 0.5,
        torch.rand(4, 3, 4) > 0.5,
        torch.rand(4, 3, 4) > 0.5,
        torch.randn(4, 3, 4),
    )
    selected, x_out = ort_program(*test_inputs)
    assert selected.dtype == torch.bool
    assert torch.equal(selected, torch.where(*test_inputs[:3]))
    assert torch.equal(x_out, test_inputs[3])
    # the caller's graph is left alone
    assert any(n.target is torch.ops.aten.where.self for n in program.graph.nodes)


def test_external_data_and_artifact_files(tmp_path):
    inputs = (torch.randn(2, 64), torch.randn(2, 64))
    module = torch.nn.Sequential(torch.nn.Linear(64, 64))
    program = _dynamic_graph_module(_TwoInOneOut(module), inputs, ({0: BATCH}, {0: BATCH}))
    path = export_program(
        program,
        inputs,
        tmp_path / "skip.onnx",
        input_names=["hidden_states", "delta_0"],
        output_names=["sample"],
        dynamic_axes={"hidden_states": {0: "batch"}, "delta_0": {0: "batch"}},
        external_data=True,
    )
    files = onnx_artifact_files(path)
    assert files == [path, tmp_path / "skip.onnx.data"]
    got = OrtProgram(path, providers=["CPUExecutionProvider"])(*inputs)[0]
    # onnxruntime against torch, one small float32 program: kernels sum in another order on any x86 machine (1e-5 of
    # the value; 1e-6 absolute for values near zero, about 10 ulp of the outputs' order-1 scale).
    torch.testing.assert_close(got, program(*inputs)[0], rtol=1e-5, atol=1e-6)


class _TwoInOneOut(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden, delta):
        return (self.inner(hidden) + delta,)


def _manifest(tmp_path) -> Manifest:
    (tmp_path / "full.onnx").write_bytes(b"full program bytes")
    (tmp_path / "full.onnx.data").write_bytes(b"weights")
    (tmp_path / "skip.onnx").write_bytes(b"skip program bytes")
    full = ProgramSpec(
        file="full.onnx",
        inputs=[
            TensorSpec("hidden_states", ["batch", 5, 16], "float32", "model_input"),
            TensorSpec("tap_prev", ["batch", 5, 16], "float32", "tap_prev"),
        ],
        outputs=[
            TensorSpec("sample", ["batch", 5, 8], "float32", "model_output"),
            TensorSpec("delta_0", ["batch", 5, 16], "float32", "delta"),
            TensorSpec("tap", ["batch", 5, 16], "float32", "tap"),
            TensorSpec("metric_l1", [], "float32", "metric"),
        ],
        dynamic_axes={"hidden_states": {0: "batch"}, "tap_prev": {0: "batch"}},
    )
    skip = ProgramSpec(
        file="skip.onnx",
        inputs=[
            TensorSpec("hidden_states", ["batch", 5, 16], "float32", "model_input"),
            TensorSpec("delta_0", ["batch", 5, 16], "float32", "delta"),
        ],
        outputs=[TensorSpec("sample", ["batch", 5, 8], "float32", "model_output")],
        dynamic_axes={"hidden_states": {0: "batch"}, "delta_0": {0: "batch"}},
    )
    return Manifest(
        config={"cache_rates": [1, 2, 3], "codebook": {"0.08": 6}},
        programs={"full": full, "skip": skip},
        moreg_layout={"tokens": 5},
        profile_ranges={"batch": {"min": 1, "opt": 2, "max": 4}},
        files=hash_artifacts(tmp_path, ["full.onnx", "full.onnx.data", "skip.onnx"]),
        model=model_fingerprint(TinyFullProgram()),
        versions=library_versions(),
    )


def test_manifest_round_trip(tmp_path):
    manifest = _manifest(tmp_path)
    write_manifest(tmp_path, manifest)
    loaded = read_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.programs["full"].dynamic_axes == {"hidden_states": {0: "batch"}, "tap_prev": {0: "batch"}}
    assert loaded.programs["full"].names("delta", outputs=True) == ["delta_0"]
    assert {"torch", "onnx", "onnxruntime"} <= set(loaded.versions)
    verify_artifacts(tmp_path, loaded)


def test_model_fingerprint_is_stable_and_weight_sensitive():
    torch.manual_seed(0)
    first = TinyFullProgram()
    second = TinyFullProgram()
    second.load_state_dict(first.state_dict())
    assert model_fingerprint(first) == model_fingerprint(second)
    with torch.no_grad():
        second.proj_out.bias[0] += 1e-3
    changed = model_fingerprint(second)
    assert changed["weights_sha256"] != model_fingerprint(first)["weights_sha256"]
    assert changed["class"].endswith("TinyFullProgram")


@pytest.mark.parametrize("victim", ["full.onnx", "full.onnx.data"])
def test_tampered_artifact_is_refused(tmp_path, victim):
    manifest = _manifest(tmp_path)
    write_manifest(tmp_path, manifest)
    data = bytearray((tmp_path / victim).read_bytes())
    data[0] ^= 1
    (tmp_path / victim).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{victim}: sha256 mismatch: manifest has {manifest.files[victim]}"):
        verify_artifacts(tmp_path, read_manifest(tmp_path))


def test_missing_artifact_and_unknown_format_are_refused(tmp_path):
    manifest = _manifest(tmp_path)
    write_manifest(tmp_path, manifest)
    (tmp_path / "skip.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"skip.onnx: missing"):
        verify_artifacts(tmp_path, manifest)
    text = (
        (tmp_path / "manifest.json").read_text().replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 99')
    )
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError, match="unknown format version 99"):
        read_manifest(tmp_path)


def test_engine_built_by_other_tensorrt_is_refused(tmp_path, monkeypatch):
    (tmp_path / "full.plan").write_bytes(b"engine")
    manifest = Manifest(
        config={}, programs={}, files=hash_artifacts(tmp_path, ["full.plan"]), versions={"tensorrt": "10.0.1"}
    )
    monkeypatch.setattr("adacache_compile.export.manifest.library_versions", lambda: {"tensorrt": "10.3.0"})
    with pytest.raises(ArtifactError, match="built with tensorrt 10.0.1, tensorrt 10.3.0 is installed"):
        verify_artifacts(tmp_path, manifest)


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_bytes(target, b"old contents")

    def interrupted_writer(f):
        f.write(b"half of the new con")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, interrupted_writer)
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    atomic_write_bytes(target, lambda f: f.write(b"new contents"))
    assert target.read_bytes() == b"new contents"


def _hand_built_model(opset: int = 20) -> onnx.ModelProto:
    float_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    axes_in = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"], name="find_nonzero"),
        helper.make_node("BitwiseNot", ["nz"], ["inverted"], name="bitwise_not"),
        helper.make_node("ReduceSum", ["x", "axes"], ["summed"], name="sum_runtime_axes"),
        helper.make_node("Cast", ["x"], ["as_double"], name="to_double", to=TensorProto.DOUBLE),
        helper.make_node("Sqrt", ["as_double"], ["root"], name="sqrt_double"),
    ]
    then_branch = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["uniq"], name="unique_in_branch")],
        "then",
        [],
        [helper.make_tensor_value_info("uniq", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["same"], name="identity_in_branch")],
        "else",
        [],
        [helper.make_tensor_value_info("same", TensorProto.FLOAT, None)],
    )
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    nodes.append(
        helper.make_node(
            "If", ["cond"], ["branch_out"], name="branch", then_branch=then_branch, else_branch=else_branch
        )
    )
    graph = helper.make_graph(
        nodes,
        "hand_built",
        [float_in, axes_in, cond],
        [
            helper.make_tensor_value_info(n, t, None)
            for n, t in [
                ("inverted", TensorProto.INT64),
                ("summed", TensorProto.FLOAT),
                ("root", TensorProto.DOUBLE),
                ("branch_out", TensorProto.FLOAT),
            ]
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_trt_check_finds_unsupported_restricted_and_slow(tmp_path):
    path = tmp_path / "hand_built.onnx"
    onnx.save(_hand_built_model(), str(path))
    findings = check_onnx_for_tensorrt(path)
    by_node = {(f.node, f.kind) for f in findings}
    assert ("find_nonzero", "slow") in by_node
    assert ("bitwise_not", "unsupported") in by_node
    assert ("sum_runtime_axes", "restriction") in by_node
    assert ("sqrt_double", "dtype") in by_node
    assert ("unique_in_branch", "unsupported") in by_node, "If subgraphs are checked"
    assert ("branch", "slow") in by_node
    assert not any(f.node == "identity_in_branch" for f in findings)
    restriction = next(f for f in findings if f.node == "sum_runtime_axes")
    assert "`axes` must be an initializer" in restriction.message
    assert next(f for f in findings if f.node == "unique_in_branch").graph == "main/branch.then_branch"
    # NonZero's FP32 input is within its supported types: flagged as slow, not as a dtype error
    assert not any(f.node == "find_nonzero" and f.severity == "error" for f in findings)

    report = format_findings(findings)
    assert report.splitlines()[0].startswith("ERROR")
    assert "bitwise_not" in report and "find_nonzero" in report
    assert check_onnx_for_tensorrt(_hand_built_model(opset=21))[0].kind == "opset"


def test_trt_check_accepts_constant_axes(full_onnx):
    _, path = full_onnx
    findings = check_onnx_for_tensorrt(path)
    assert not [f for f in findings if f.severity == "error"], format_findings(findings)
