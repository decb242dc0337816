"""to_onnx on small hand-written models (no diffusers): an input whose size is a derived symbolic dim, and the
onnxruntime check that must not be skipped silently."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_models import TinyVideoDiT, build

pytest.importorskip("onnx")

from adacache_compile import AdaCacheConfig, optimize  # noqa: E402
from adacache_compile.export import load, read_export_manifest, to_onnx  # noqa: E402

NUM_STEPS = 6
# Threshold 10 is above any metric: the generation skips, so both exported programs run.
SKIPPING = AdaCacheConfig(codebook=((10.0, 3),))


class FrameScaledDiT(TinyVideoDiT):
    """The tiny DiT with a per-frame scale given as two values per frame: ``frame_scale`` has ``2 * frames``
    entries, so torch.export records its size as the derived dim ``2*s<frames>``, not a symbol of its own."""

    def forward(self, hidden_states, timestep, frame_scale):
        b, c, f, h, w = hidden_states.shape
        scale = frame_scale.reshape(f, 2).mean(-1).reshape(1, 1, f, 1, 1)
        return super().forward(hidden_states * scale, timestep)


@pytest.fixture(scope="module")
def frame_scaled(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = FrameScaledDiT().eval()
    _, kwargs = build("tiny-dit", batch=2)
    kwargs = dict(kwargs, frame_scale=torch.linspace(0.5, 1.5, 2 * kwargs["hidden_states"].shape[2]))
    cached = optimize(model, SKIPPING, example_inputs=kwargs)
    return cached, kwargs, to_onnx(cached, tmp_path_factory.mktemp("export") / "frame-scaled")


def test_derived_input_dim_is_captured_as_a_formula(frame_scaled):
    cached, _, _ = frame_scaled
    placeholders = [n for n in cached.plan.programs.full.graph.nodes if n.op == "placeholder"]
    size = next(n for n in placeholders if n.name == "frame_scale").meta["val"].shape[0]
    assert isinstance(size, torch.SymInt) and not size.node.expr.is_Symbol, "the model must give a derived dim"


def test_input_with_a_derived_dim_exports_with_its_range(frame_scaled):
    _, kwargs, out_dir = frame_scaled
    manifest = read_export_manifest(out_dir)
    frames = kwargs["hidden_states"].shape[2]
    inputs = {t.name: t.shape for t in manifest.programs["full"].inputs}
    frames_axis, axis = inputs["hidden_states"][2], inputs["frame_scale"][0]
    assert isinstance(frames_axis, str) and isinstance(axis, str), "both stay dynamic (no batch-only retry)"
    frames_range = manifest.profile_ranges[frames_axis]
    assert frames_range["opt"] == frames
    assert manifest.profile_ranges[axis] == {k: 2 * v for k, v in frames_range.items()}


def test_derived_dim_of_static_axes_is_static(frame_scaled, tmp_path):
    cached, kwargs, _ = frame_scaled
    out_dir = to_onnx(cached, tmp_path / "batch-only", dynamic=["batch"])  # verified against torch by to_onnx
    manifest = read_export_manifest(out_dir)
    inputs = {t.name: t.shape for t in manifest.programs["full"].inputs}
    assert inputs["hidden_states"] == ["batch", *kwargs["hidden_states"].shape[1:]]
    assert inputs["frame_scale"] == [2 * kwargs["hidden_states"].shape[2]]
    assert set(manifest.profile_ranges) == {"batch"}


def test_loaded_runtime_with_a_derived_dim_matches_torch(frame_scaled):
    cached, kwargs, out_dir = frame_scaled
    runtime = load(out_dir, "onnxruntime", providers=["CPUExecutionProvider"])
    outputs = {}
    for name, module in (("torch", cached), ("onnx", runtime)):
        outputs[name] = []
        with module.generation(NUM_STEPS):
            for step in range(NUM_STEPS):
                call = dict(kwargs, hidden_states=kwargs["hidden_states"] + 0.05 * step)
                outputs[name].append(module(**call)[0])
        outputs[name + " stats"] = module.stats["history"][-1]
    assert outputs["onnx stats"]["computed_steps"] == outputs["torch stats"]["computed_steps"]
    assert outputs["onnx stats"]["skipped_steps"], "the codebook must make the generation skip"
    for actual, expected in zip(outputs["onnx"], outputs["torch"]):
        assert float((actual - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


def test_verify_without_onnxruntime_refuses_with_the_install_hint(tmp_path, monkeypatch):
    model, kwargs = build("tiny-dit", batch=2)
    cached = optimize(model, SKIPPING, example_inputs=kwargs)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'adacache-compile\[onnx\]'"):
        to_onnx(cached, tmp_path / "unchecked")
    assert not (tmp_path / "unchecked").exists(), "refused before writing anything"
