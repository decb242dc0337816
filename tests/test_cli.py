"""The ``adacache-compile`` command line, run in-process through ``cli.main``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from adacache_compile import AdaCacheConfig
from adacache_compile.cli import COMMANDS, build_model, main
from adacache_compile.testbed import CHECKPOINT_DIR

SUBCOMMANDS = ["inspect", "demo", "calibrate", "export", "check-trt", "build-engines", "serve"]
needs_checkpoint = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="testbed checkpoint not shipped in this tree"
)


def test_help_lists_every_subcommand(capsys):
    assert [command.name for command in COMMANDS] == SUBCOMMANDS
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"    {name} " in printed or f"    {name}\n" in printed, (name, printed)


def test_help_imports_neither_the_testbed_nor_the_exporter():
    # A fresh interpreter: what building the parser (all of --help) imports.
    code = (
        "import sys; from adacache_compile.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.startswith(('adacache_compile.testbed', 'adacache_compile.export'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_unknown_model_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--model", "nope-tiny"])
    assert exit_info.value.code == 2
    assert "unknown model 'nope-tiny'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out_dir = tmp_path_factory.mktemp("cli") / "tiny-dit"
    assert main(["export", str(out_dir), "--model", "tiny-dit-tiny", "--config", "fast-30"]) == 0
    return out_dir


def test_export_writes_a_loadable_directory(exported, capsys):
    import adacache_compile

    assert {"manifest.json", "full.onnx", "skip.onnx"} <= {p.name for p in exported.iterdir()}
    runtime = adacache_compile.load(exported, "onnxruntime")
    model, inputs = build_model("tiny-dit-tiny")
    with torch.no_grad():
        (expected,) = model(**inputs)
        (actual,) = runtime(**inputs)  # the first call of a generation computes: the full program's output
    assert actual.shape == expected.shape
    assert float((actual - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


@pytest.mark.slow  # 25 s on 2 cores; single-file exports load and hold parity in test_export_families.py: make test-all
def test_export_single_file_writes_one_conditional_program_that_loads(tmp_path):
    pytest.importorskip("onnxruntime")
    import adacache_compile

    out_dir = tmp_path / "one"
    assert main(["export", str(out_dir), "--model", "tiny-dit-tiny", "--config", "fast-30", "--single-file"]) == 0
    assert {"manifest.json", "cached.onnx"} <= {p.name for p in out_dir.iterdir()}
    assert not {"full.onnx", "skip.onnx"} & {p.name for p in out_dir.iterdir()}
    assert json.loads((out_dir / "manifest.json").read_text())["layout"] == "single_file"
    runtime = adacache_compile.load(out_dir, "onnxruntime")
    model, inputs = build_model("tiny-dit-tiny")
    with torch.no_grad():
        (expected,) = model(**inputs)
        (actual,) = runtime(**inputs)  # the first call of a generation takes the If's computing branch
    assert float((actual - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


def test_build_engines_without_tensorrt_fails_naming_it(exported, capsys):
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: build-engines would build")
    assert main(["build-engines", str(exported)]) != 0
    err = capsys.readouterr().err
    assert "TensorRT" in err and "adacache-compile[tensorrt]" in err


def test_build_engines_refuses_an_unknown_precision(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["build-engines", str(tmp_path), "--precision", "int3"])
    assert exit_info.value.code == 2
    assert "unknown precision 'int3'" in capsys.readouterr().err


@needs_checkpoint
def test_calibrate_writes_configs_loadable_by_from_json(tmp_path, capsys):
    out = tmp_path / "calibration.json"
    argv = ["calibrate", "--steps", "6", "--videos", "1", "--target", "fast", "0.7", "--out", str(out)]
    pins = ["--forecast-order", "0", "--policy", "adacache", "grid", "--max-candidates", "2", "--max-evaluations", "2"]
    assert main([*argv, *pins, "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["num_steps"] == 6 and len(report["videos"]) == 1
    assert [len(run["metrics"]) for run in report["recorded"]] == [5]  # steps 2..6 of the one video
    assert report["search"]["forecast_orders"] == [0] and report["search"]["policies"] == ["adacache", "grid"]
    assert set(report["targets"]) == {"fast", "0.7"}
    for target in report["targets"].values():
        config = AdaCacheConfig.from_json(json.dumps(target["config"]))
        assert config.to_dict() == target["config"] and config.forecast_order == 0 and config.policy is None
    # "fast" is the named target 0.28; of 6 steps the grids and the rule compute at least 1 and 6 (2 / 6).
    assert report["targets"]["fast"]["target"] == 0.28
    assert "[latte-shapes] 0.7:" in capsys.readouterr().out


def test_calibrate_refuses_more_videos_than_it_has(capsys):
    assert main(["calibrate", "--videos", "99"]) == 2
    assert "--videos 99" in capsys.readouterr().err


def test_a_missing_optional_dependency_fails_its_subcommand_with_the_extra_named(tmp_path, monkeypatch, capsys):
    # As if safetensors (a testbed extra) were not installed: demo fails with a message, --help still works.
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "30", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "adacache-compile demo needs the 'safetensors' package" in err and "adacache-compile[testbed]" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_a_preset_name_target_is_kept_as_a_name_for_calibrate():
    from adacache_compile.cli import _parse_target

    # A preset name is measured by the calibration (its own computed fraction), not parsed as a number.
    assert _parse_target("fast-50") == "fast-50" and _parse_target("slow") == "slow"
    assert _parse_target("0.3") == 0.3
