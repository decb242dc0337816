"""Bad input, bad state and misuse fail loudly or run safely; none gives a plausible but wrong video.

Inputs the capture cannot serve, a batch change mid-generation, NaN/Inf in the cache, cache memory against depth,
engines from another GPU or TensorRT, truncated ONNX files, and training mode / autograd inputs.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from tiny_models import TinyVideoDiT, build

from adacache_compile import AdaCacheConfig, optimize
from adacache_compile.errors import ArtifactError, CaptureError, InputMismatchError
from adacache_compile.export.manifest import check_engine_environment, gpu_versions

NUM_STEPS = 8
# Threshold 10 is above any metric: after steps 1 and 2, two of every three steps are skipped (computed 1, 2, 5, 7, 8).
SKIPPING = AdaCacheConfig(codebook=((10.0, 3),))
SKIPPED_STEP = 4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    actual, expected = actual.detach(), expected.detach()
    scale = float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= rtol * max(scale, 1e-6)


@pytest.fixture
def dit():
    model, kwargs = build("tiny-dit", batch=2)
    return model, kwargs, optimize(model, SKIPPING, example_inputs=kwargs)


def adacache_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("adacache_compile")]


# --- inputs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (lambda x: x[0], r"expected rank 5, got shape \[4, 3, 8, 8\]"),
        (lambda x: x.double(), "expected dtype torch.float32, got torch.float64"),
        (lambda x: x.to("meta"), "expected device cpu, got meta"),
    ],
    ids=["rank", "dtype", "device"],
)
def test_bad_input_is_named_with_its_expected_shape_before_any_program_runs(dit, monkeypatch, bad, why):
    _, kwargs, cached = dit
    entry = cached.captures.latest()
    ran = []
    monkeypatch.setattr(entry, "run_full", lambda *a: ran.append("full"))
    monkeypatch.setattr(entry, "run_skip", lambda *a: ran.append("skip"))
    with pytest.raises(InputMismatchError, match=rf"input 'hidden_states': {why}.*float32 \[\*, 4, \*, \*, \*\]") as e:
        cached(**dict(kwargs, hidden_states=bad(kwargs["hidden_states"])))
    assert isinstance(e.value.__cause__, CaptureError), "the failed re-capture is chained"
    assert not ran
    assert cached.captures.entries == [entry], "a failed re-capture leaves no entry behind"


def test_a_legitimately_new_signature_is_captured(dit):
    model, kwargs, cached = dit
    float_timestep = dict(kwargs, timestep=kwargs["timestep"].float())  # export specialised the int64 dtype
    with torch.no_grad():
        expected = model(**float_timestep)[0]
    assert_close(cached(**float_timestep)[0], expected)
    assert len(cached.captures.entries) == 2


def test_batch_change_on_a_skip_step_recomputes_instead_of_adding_a_foreign_delta(dit):
    model, kwargs, cached = dit
    one = {k: v[:1] for k, v in kwargs.items()}
    with cached.generation(num_steps=NUM_STEPS) as session:
        for _ in range(SKIPPED_STEP - 1):
            cached(**kwargs)
        output = cached(**one)[0]
        stats = session.stats()
    with torch.no_grad():
        expected = model(**one)[0]
    assert output.shape == expected.shape
    assert_close(output, expected)
    assert SKIPPED_STEP in stats["computed_steps"] and SKIPPED_STEP not in stats["skipped_steps"]
    assert any(f"step {SKIPPED_STEP}: input signature changed" in event for event in stats["events"])


# --- bad numbers -----------------------------------------------------------------------------------------------------
def _poison_parameter(model, kwargs):
    """Inf in a bias inside the cached region: the programs share the model's parameter tensors."""
    bias = model.blocks[1].mlp[2].bias
    saved = bias.detach().clone()

    def call_kwargs(poisoned: bool) -> dict:
        with torch.no_grad():
            bias.copy_(torch.full_like(saved, float("inf")) if poisoned else saved)
        return kwargs

    return call_kwargs


def _poison_input(model, kwargs):
    """NaN in one latent element."""
    bad = dict(kwargs, hidden_states=kwargs["hidden_states"].clone())
    bad["hidden_states"][0, 0, 0, 0, 0] = float("nan")
    return lambda poisoned: bad if poisoned else kwargs


@pytest.mark.parametrize("source", [_poison_parameter, _poison_input], ids=["parameter", "input"])
def test_nonfinite_cache_is_never_reused(dit, caplog, source):
    model, kwargs, cached = dit
    poisoned_steps, num_steps = (2, 4), 12  # long enough to skip again after the second recovery
    call_kwargs = source(model, kwargs)
    outputs = {}
    with caplog.at_level(logging.WARNING), cached.generation(num_steps=num_steps) as session:
        for step in range(1, num_steps + 1):
            outputs[step] = cached(**call_kwargs(step in poisoned_steps))[0]
        call_kwargs(False)
        stats = session.stats()
    assert stats["nonfinite_steps"] == list(poisoned_steps)
    assert sum("NaN/Inf" in event for event in stats["events"]) == len(poisoned_steps)
    for step in poisoned_steps:
        assert step + 1 in stats["computed_steps"], f"step {step + 1} follows a non-finite step and must be computed"
    with torch.no_grad():
        expected = model(**kwargs)[0]
    for step in range(poisoned_steps[0] + 1, num_steps + 1):
        if step not in poisoned_steps:
            assert torch.isfinite(outputs[step]).all(), f"step {step} reused a NaN/Inf cache"
    for step in stats["computed_steps"]:
        if step not in poisoned_steps:
            assert_close(outputs[step], expected)
    assert stats["skipped_steps"], "the schedule still skips once the cache is finite again"
    assert len(adacache_warnings(caplog)) == 1, [r.getMessage() for r in adacache_warnings(caplog)]


# --- memory ----------------------------------------------------------------------------------------------------------
def _cache_stats(depth: int) -> tuple[dict, int]:
    torch.manual_seed(0)
    model = TinyVideoDiT(depth=depth).eval()
    _, kwargs = build("tiny-dit", batch=2)
    cached = optimize(model, SKIPPING, example_inputs=kwargs)
    with cached.generation(num_steps=NUM_STEPS) as session:
        for _ in range(3):
            cached(**kwargs)
        return session.stats(), len(cached.programs.delta_names)


def test_cache_memory_does_not_grow_with_depth():
    shallow, shallow_deltas = _cache_stats(2)
    deep, deep_deltas = _cache_stats(6)
    assert shallow_deltas == deep_deltas == 1, "one fused delta per residual stream"
    assert shallow["cached_tensors"] == deep["cached_tensors"] == shallow_deltas + 1, "the deltas plus the tap"
    assert shallow["cache_bytes"] == deep["cache_bytes"] > 0


# --- artifacts -------------------------------------------------------------------------------------------------------
BUILT = {"tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_engine_environment_matches():
    check_engine_environment(BUILT, dict(BUILT, torch="2.9.0"), "export")


@pytest.mark.parametrize(
    ("key", "here"),
    [("tensorrt", "10.0.1"), ("gpu", "NVIDIA H200"), ("compute_capability", "8.9")],
)
def test_engines_for_another_gpu_or_tensorrt_are_refused_naming_both(key, here):
    with pytest.raises(ArtifactError, match=rf"built for {key} '{BUILT[key]}', this machine has {key} '{here}'"):
        check_engine_environment(BUILT, dict(BUILT, **{key: here}), "export")


def test_engines_without_a_gpu_here_are_refused():
    current = {"tensorrt": BUILT["tensorrt"]}
    with pytest.raises(ArtifactError, match="built for gpu 'NVIDIA H100 80GB HBM3'.*no CUDA GPU is visible"):
        check_engine_environment(BUILT, current, "export")


def test_manifest_without_gpu_record_is_checked_for_what_it_records(caplog):
    with caplog.at_level(logging.WARNING):
        check_engine_environment({"tensorrt": "10.3.0"}, BUILT, "export")
    assert "does not record the gpu" in caplog.text
    with pytest.raises(ArtifactError, match="tensorrt"):
        check_engine_environment({"tensorrt": "9.0"}, BUILT, "export")


def test_engine_environment_recorded_here_round_trips_and_is_refused_elsewhere(tmp_path, caplog):
    from adacache_compile.export.manifest import (
        ENGINE_ENVIRONMENT,
        Manifest,
        library_versions,
        read_manifest,
        write_manifest,
    )

    here = {**library_versions(), **gpu_versions()}  # what build_engines records and load compares with
    assert all(isinstance(v, str) for v in here.values())
    if not torch.cuda.is_available():
        assert not set(gpu_versions()), "no CUDA GPU: a manifest written here must not claim one"
    write_manifest(tmp_path, Manifest(config={}, programs={}, versions=here))
    recorded = read_manifest(tmp_path).versions
    with caplog.at_level(logging.WARNING):
        check_engine_environment(recorded, here, "here")  # the machine that built the engines runs them
    unchecked = {key for key in ENGINE_ENVIRONMENT if f"the {key} the engines" in caplog.text}
    assert unchecked == set(ENGINE_ENVIRONMENT) - set(here), "only what this machine lacks goes unchecked"
    for key in ENGINE_ENVIRONMENT:
        with pytest.raises(ArtifactError, match=f"built for {key} 'elsewhere'"):
            check_engine_environment({**recorded, key: "elsewhere"}, here, "here")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from adacache_compile.export import to_onnx

    model, kwargs = build("tiny-dit", batch=2)
    cached = optimize(model, SKIPPING, example_inputs=kwargs)
    return to_onnx(cached, tmp_path_factory.mktemp("export") / "tiny-dit")


def _copy_with(exported, tmp_path, edit_manifest=None):
    out_dir = tmp_path / "copy"
    shutil.copytree(exported, out_dir)
    if edit_manifest is not None:
        path = out_dir / "manifest.json"
        manifest = json.loads(path.read_text())
        edit_manifest(out_dir, manifest)
        path.write_text(json.dumps(manifest))
    return out_dir


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_onnx_is_refused(exported, tmp_path):
    from adacache_compile.export import load

    out_dir = _copy_with(exported, tmp_path)
    _truncate(out_dir / "full.onnx")
    with pytest.raises(ArtifactError, match=r"full\.onnx: sha256 mismatch"):
        load(out_dir)


def test_truncated_onnx_with_a_matching_hash_is_refused(exported, tmp_path):
    from adacache_compile.export import load
    from adacache_compile.export.manifest import sha256_file

    def truncate_and_rehash(out_dir, manifest):  # as if truncated before the manifest was written
        _truncate(out_dir / "full.onnx")
        manifest["files"]["full.onnx"] = sha256_file(out_dir / "full.onnx")

    out_dir = _copy_with(exported, tmp_path, truncate_and_rehash)
    with pytest.raises(ArtifactError, match=r"full\.onnx: not a readable ONNX model.*truncated or corrupt"):
        load(out_dir)


def _move_out(out_dir, manifest, name: str) -> str:
    """Move ``full.onnx`` next to the export directory and point the manifest at it by ``name``'s spelling."""
    outside = out_dir.parent / "x.onnx"
    shutil.move(out_dir / "full.onnx", outside)
    target = "../x.onnx" if name == "dotdot" else str(outside.resolve())
    manifest["programs"]["full"]["file"] = target
    manifest["files"][target] = manifest["files"].pop("full.onnx")
    return target


@pytest.mark.parametrize("spelling", ["dotdot", "absolute"])
def test_a_manifest_naming_a_file_outside_the_directory_is_refused(exported, tmp_path, spelling):
    from adacache_compile.export import load

    out_dir = _copy_with(exported, tmp_path, lambda d, m: _move_out(d, m, spelling))
    with pytest.raises(ArtifactError, match=r"must be named relative to the directory, without '\.\.'"):
        load(out_dir)


def test_a_symlink_out_of_the_directory_is_refused(exported, tmp_path):
    from adacache_compile.export import load

    def link_out(out_dir, manifest):
        shutil.move(out_dir / "full.onnx", out_dir.parent / "x.onnx")
        (out_dir / "full.onnx").symlink_to(out_dir.parent / "x.onnx")

    out_dir = _copy_with(exported, tmp_path, link_out)
    with pytest.raises(ArtifactError, match=r"outside .* \(a symbolic link out of the export directory\)"):
        load(out_dir)


def _externalise_one_initializer(out_dir, manifest, location: str, list_it: bool):
    """Rewrite full.onnx so that its largest initializer is read from ``location`` (relative to the file)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    from adacache_compile.export.manifest import sha256_file

    model = onnx.load(str(out_dir / "full.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = out_dir / location
    data.write_bytes(tensor.raw_data)
    set_external_data(tensor, location=location, offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    (out_dir / "full.onnx").write_bytes(model.SerializeToString())
    manifest["files"]["full.onnx"] = sha256_file(out_dir / "full.onnx")
    if list_it:
        manifest["files"][location] = sha256_file(data)


def test_onnx_external_data_outside_the_directory_is_refused(exported, tmp_path):
    from adacache_compile.export import load

    out_dir = _copy_with(exported, tmp_path, lambda d, m: _externalise_one_initializer(d, m, "../w.data", False))
    with pytest.raises(ArtifactError, match=r"external-data location '\.\./w\.data'.*without '\.\.'"):
        load(out_dir)


def test_onnx_external_data_not_hashed_in_the_manifest_is_refused_and_loads_when_listed(exported, tmp_path):
    from adacache_compile.export import load

    out_dir = _copy_with(exported, tmp_path, lambda d, m: _externalise_one_initializer(d, m, "w.data", False))
    with pytest.raises(ArtifactError, match=r"external data 'w\.data' has no sha256 in manifest\.json"):
        load(out_dir)
    listed = _copy_with(exported, tmp_path / "listed", lambda d, m: _externalise_one_initializer(d, m, "w.data", True))
    assert load(listed) is not None  # the same layout, listed and hashed: a valid export directory


@pytest.mark.parametrize(
    ("built", "why"),
    [
        ({"tensorrt": "0.0.1"}, "built with tensorrt 0.0.1, tensorrt 10.3.0 is installed; rebuild them"),
        ({"gpu": "Imaginary GPU"}, "built for gpu 'Imaginary GPU', this machine has gpu 'NVIDIA H100'.*rebuild"),
        ({"compute_capability": "1.0"}, "built for compute_capability '1.0', this machine has .* '9.0'.*rebuild"),
    ],
)
def test_tensorrt_load_refuses_engines_built_elsewhere(exported, tmp_path, monkeypatch, built, why):
    from adacache_compile.export import load, loader, manifest
    from adacache_compile.export import tensorrt as trt_export
    from adacache_compile.export.manifest import sha256_file

    here = {"tensorrt": "10.3.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"}

    def fake_engines(out_dir, manifest):
        for name in ("full", "skip"):
            (out_dir / f"{name}.plan").write_bytes(b"not an engine")
            manifest["files"][f"{name}.plan"] = sha256_file(out_dir / f"{name}.plan")
        manifest["runtime"]["engines"] = {"full": "full.plan", "skip": "skip.plan"}
        manifest["versions"].update(here, **built)

    out_dir = _copy_with(exported, tmp_path, fake_engines)
    # This machine, as load sees it: TensorRT 10.3.0 on an H100 (whatever this test runs on).
    for module in (loader, manifest):
        monkeypatch.setattr(module, "library_versions", lambda: {"tensorrt": here["tensorrt"]})
    monkeypatch.setattr(loader, "gpu_versions", lambda: {k: here[k] for k in ("gpu", "compute_capability")})
    loaded = []
    monkeypatch.setattr(trt_export, "load_trt_programs", lambda *a, **k: loaded.append(a))
    with pytest.raises(ArtifactError, match=why):
        load(out_dir, backend="tensorrt")
    assert not loaded, "refused before any engine is deserialised"


# --- misuse ----------------------------------------------------------------------------------------------------------
def test_training_mode_runs_the_original_uncached_with_one_warning(dit, caplog):
    model, kwargs, cached = dit
    cached.train()
    try:
        with caplog.at_level(logging.WARNING), cached.generation(num_steps=NUM_STEPS) as session:
            for _ in range(3):
                output = cached(**kwargs)[0]
        assert session.step == 0 and not cached.stats["history"], "nothing ran through the programs"
        with torch.no_grad():
            expected = model(**kwargs)[0]
        assert_close(output, expected)
        warnings = adacache_warnings(caplog)
        assert len(warnings) == 1 and "training mode" in warnings[0].getMessage()
    finally:
        cached.eval()
    with cached.generation(num_steps=NUM_STEPS) as session:
        cached(**kwargs)
    assert session.step == 1, "back in eval mode the cache runs again"


def test_inputs_that_require_grad_get_gradients_from_the_original(dit, caplog):
    _, kwargs, cached = dit
    latents = kwargs["hidden_states"].clone().requires_grad_(True)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            output = cached(**dict(kwargs, hidden_states=latents))[0]
    output.sum().backward()
    assert latents.grad is not None and torch.isfinite(latents.grad).all()
    assert sum("requires grad" in r.getMessage() for r in adacache_warnings(caplog)) == 1
    with torch.no_grad():
        cached(**dict(kwargs, hidden_states=latents))  # under no_grad the cache serves it
    assert cached.stats["default"]["steps_run"] == 1
