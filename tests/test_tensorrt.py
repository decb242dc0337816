"""TensorRT: profile derivation and memory planning on CPU; engine build + run behind the tensorrt marker."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from adacache_compile.export import tensorrt as trt_export
from adacache_compile.export.manifest import Manifest, ProgramSpec, TensorSpec
from adacache_compile.export.tensorrt import derive_profiles, plan_shared_activation_memory

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def _io_manifest() -> Manifest:
    full = ProgramSpec(
        file="full.onnx",
        inputs=[
            TensorSpec("hidden_states", ["batch", 4, "frames", 16], "float32", "model_input"),
            TensorSpec("timestep", ["batch"], "float32", "model_input"),
            TensorSpec("tap_prev", ["batch", None, 32], "float32", "tap_prev"),
        ],
        outputs=[TensorSpec("sample", ["batch", 4, "frames", 16], "float32", "model_output")],
        dynamic_axes={"tap_prev": {0: "batch", 1: "tokens"}},
    )
    skip = ProgramSpec(
        file="skip.onnx",
        inputs=[
            TensorSpec("hidden_states", ["batch", 4, "frames", 16], "float32", "model_input"),
            TensorSpec("delta_0", ["batch", "tokens", 32], "float32", "delta"),
        ],
        outputs=[TensorSpec("sample", ["batch", 4, "frames", 16], "float32", "model_output")],
    )
    return Manifest(
        config={},
        programs={"full": full, "skip": skip},
        profile_ranges={
            "batch": {"min": 1, "opt": 2, "max": 4},
            "frames": {"min": 2, "opt": 8, "max": 16},
            "tokens": {"min": 64, "opt": 256, "max": 1024},
        },
    )


def test_profiles_from_manifest_ranges():
    profiles = derive_profiles(_io_manifest())
    assert set(profiles) == {"full", "skip"}
    (full,) = profiles["full"]
    assert full["hidden_states"] == ((1, 4, 2, 16), (2, 4, 8, 16), (4, 4, 16, 16))
    assert full["timestep"] == ((1,), (2,), (4,))
    assert full["tap_prev"] == ((1, 64, 32), (2, 256, 32), (4, 1024, 32)), "dynamic_axes names an unnamed dim"
    (skip,) = profiles["skip"]
    # the delta follows the same batch range as the model inputs
    assert [shape[0] for shape in skip["delta_0"]] == [shape[0] for shape in skip["hidden_states"]] == [1, 2, 4]


def test_profile_overrides_per_axis():
    profiles = derive_profiles(_io_manifest(), opt={"batch": 3}, max={"frames": 12})
    low, opt, high = profiles["skip"][0]["hidden_states"]
    assert (low, opt, high) == ((1, 4, 2, 16), (3, 4, 8, 16), (4, 4, 12, 16))


def test_profile_errors_name_the_axis():
    with pytest.raises(ValueError, match=r"'batch'.*1 <= min <= opt <= max.*1/8/4"):
        derive_profiles(_io_manifest(), opt={"batch": 8})
    manifest = _io_manifest()
    del manifest.profile_ranges["frames"]
    with pytest.raises(ValueError, match="'frames' has no min/opt/max"):
        derive_profiles(manifest)
    manifest = _io_manifest()
    manifest.programs["full"].dynamic_axes = {}
    with pytest.raises(ValueError, match="'tap_prev' axis 1 is dynamic but has no axis name"):
        derive_profiles(manifest)


def test_shared_activation_memory_is_the_largest_aligned():
    assert plan_shared_activation_memory({"full": 1000, "skip": 300}) == 1024
    assert plan_shared_activation_memory({"full": 4096, "skip": 4096}) == 4096
    assert plan_shared_activation_memory({}) == 0
    with pytest.raises(ValueError, match="'skip'"):
        plan_shared_activation_memory({"full": 10, "skip": -1})


@pytest.mark.skipif(HAVE_TENSORRT, reason="checks the message shown without TensorRT or a GPU")
def test_missing_tensorrt_or_gpu_says_what_to_install(tmp_path):
    with pytest.raises(RuntimeError, match=r"pip install adacache-compile\[tensorrt\].*CUDA GPU"):
        trt_export.build_engine(tmp_path / "full.onnx", tmp_path / "full.plan", profiles=[{"x": ((1,), (1,), (1,))}])
    with pytest.raises(RuntimeError, match=r"pip install adacache-compile\[tensorrt\]"):
        trt_export.load_trt_programs({"full": tmp_path / "full.plan"})


def test_build_engine_rejects_bad_arguments_before_importing(tmp_path):
    with pytest.raises(ValueError, match="precision 'int4'"):
        trt_export.build_engine(tmp_path / "a.onnx", tmp_path / "a.plan", profiles=[{}], precision="int4")
    with pytest.raises(ValueError, match="at least one optimisation profile"):
        trt_export.build_engine(tmp_path / "a.onnx", tmp_path / "a.plan", profiles=[])


class _Full(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.before = torch.nn.Linear(16, 16)
        self.region = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 16))
        self.after = torch.nn.Linear(16, 16)

    def forward(self, hidden):
        x = self.before(hidden)
        delta = self.region(x)
        return self.after(x + delta), delta


class _Skip(torch.nn.Module):
    def __init__(self, full: _Full):
        super().__init__()
        self.before, self.after = full.before, full.after

    def forward(self, hidden, delta):
        return (self.after(self.before(hidden) + delta),)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TENSORRT, reason="needs the tensorrt package and a CUDA GPU")
def test_full_and_skip_engines_share_memory_and_chain_on_device(tmp_path):
    from adacache_compile.export.onnx_export import export_program

    torch.manual_seed(0)
    full, inputs = _Full().eval(), (torch.randn(2, 8, 16),)
    skip = _Skip(full).eval()
    batch = torch.export.Dim("batch")
    axes = {"hidden": {0: "batch"}, "delta": {0: "batch"}}
    export_program(
        torch.export.export(full, inputs, dynamic_shapes=({0: batch},)).module(),
        inputs,
        tmp_path / "full.onnx",
        input_names=["hidden"],
        output_names=["sample", "delta"],
        dynamic_axes=axes,
    )
    skip_inputs = (inputs[0], torch.randn(2, 8, 16))
    export_program(
        torch.export.export(skip, skip_inputs, dynamic_shapes=({0: batch}, {0: batch})).module(),
        skip_inputs,
        tmp_path / "skip.onnx",
        input_names=["hidden", "delta"],
        output_names=["sample"],
        dynamic_axes=axes,
    )
    ranges = ((1, 8, 16), (2, 8, 16), (4, 8, 16))
    cache = tmp_path / "timing.cache"
    for name, profile in [("full", {"hidden": ranges}), ("skip", {"hidden": ranges, "delta": ranges})]:
        trt_export.build_engine(
            tmp_path / f"{name}.onnx",
            tmp_path / f"{name}.plan",
            profiles=[profile],
            precision="fp32",
            timing_cache=cache,
        )
    assert cache.exists()
    programs = trt_export.load_trt_programs({n: tmp_path / f"{n}.plan" for n in ("full", "skip")})
    assert programs["full"]._device_memory.data_ptr() == programs["skip"]._device_memory.data_ptr()

    for batch_size in (2, 3, 3, 3):  # eager, eager, capture, replay
        hidden = torch.randn(batch_size, 8, 16, device="cuda")
        sample, delta = programs["full"](hidden)
        (skipped,) = programs["skip"](hidden, delta)  # the delta never leaves the device
        with torch.no_grad():
            expected, expected_delta = full.cuda()(hidden)
        torch.testing.assert_close(sample, expected, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(delta, expected_delta, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(skipped, sample, rtol=1e-3, atol=1e-3)
