import dataclasses
import importlib
import json
import math
import statistics

import pytest
import torch

from adacache_compile.testbed import CHECKPOINT_DIR, load_testbed
from benchmarks.quality_latency import (
    BenchMethod,
    CacheDiTLatte,
    _has_forecasting,
    adacache_methods,
    apply_cache_dit,
    cache_dit_candidates,
    cache_dit_methods,
    forecast_methods,
    hook_methods,
    run_bench,
    static_methods,
    write_outputs,
)

needs_checkpoint = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="testbed checkpoint not shipped in this tree"
)
NUM_STEPS = 8
VIDEOS = [("disc", 0, 3100), ("cross", 3, 3101)]


@needs_checkpoint
def test_bench_end_to_end(tmp_path):
    torch.set_num_threads(1)
    testbed = load_testbed()
    taylorseer = next(m for m in hook_methods() if m.name == "TaylorSeer blocks interval=2")
    methods = [
        BenchMethod("uncached", None, family="uncached", repeats=2),
        adacache_methods(NUM_STEPS, repeats=2)[0],
        static_methods((2,))[0],
        taylorseer,
    ]
    results = run_bench(testbed, methods, VIDEOS, NUM_STEPS)
    report = write_outputs(results, tmp_path)

    rows = {r["method"]: r for r in json.loads((tmp_path / "quality_latency.json").read_text())["rows"]}
    assert list(rows) == [m.name for m in methods]
    assert rows["uncached"]["speedup"] == 1.0
    assert len(rows["uncached"]["round_seconds"]) == 2
    for method in methods[1:]:
        row = rows[method.name]
        assert math.isfinite(row["psnr"]) and row["psnr"] > 10, row
        assert 0.0 < row["compute_fraction"] < 1.0, row
    # Every time is the median of its own rounds, and every speedup the uncached time of this run over that time.
    for method in methods:
        row = rows[method.name]
        assert len(row["round_seconds"]) == method.repeats
        assert row["seconds"] == pytest.approx(statistics.median(row["round_seconds"]))
        assert row["speedup"] == pytest.approx(rows["uncached"]["seconds"] / row["seconds"])
    # A cached method's row counts the steps its schedules computed, video by video, and its compute fraction is
    # what those schedules saved.
    adacache = methods[1]
    row = rows[adacache.name]
    per_video = [len(schedule["computed_steps"]) for schedule in adacache.schedules]
    assert len(per_video) == len(VIDEOS) and all(1 <= n <= NUM_STEPS for n in per_video)
    assert row["computed_per_video"] == per_video
    assert row["computed_steps"] == pytest.approx(statistics.mean(per_video))
    assert row["step_bound"] == pytest.approx(NUM_STEPS / row["computed_steps"])
    saved = statistics.mean(schedule["block_compute_saved"] for schedule in adacache.schedules)
    assert row["compute_fraction"] == pytest.approx(1.0 - saved)
    assert results["motion"][adacache.name] == {"0": per_video[0], "3": per_video[1]}
    # static k=2 computes 1, 2, then every 2nd step from 2, plus the forced N-1 and N: 1 2 4 6 7 8.
    assert rows["static k=2"]["computed_per_video"] == [6, 6]
    assert rows["static k=2"]["compute_fraction"] == pytest.approx(6 / NUM_STEPS)
    assert rows[adacache.name]["speedup_over_bound"] > 0
    # A hook's compute is measured, not scheduled: it has no computed-step count.
    assert rows[taylorseer.name]["computed_steps"] is None
    assert rows[taylorseer.name]["compute_source"] == "linear FLOPs (video 1)"
    assert "| uncached |" in report and f"| {row['psnr']:.2f} |" in report
    assert (tmp_path / "quality_latency_pareto.png").stat().st_size > 0


ONE_VIDEO = [("triangle", 2, 3102)]


def _uncached(testbed, video=ONE_VIDEO[0], num_steps=NUM_STEPS):
    from adacache_compile.testbed.sample import sample

    return sample(testbed.transformer, testbed, [video[:2]], [video[2]], num_steps, progress=False)


@needs_checkpoint
def test_bench_new_method_kinds_apply(tmp_path):
    """Every new kind of method runs end to end through run_bench on one video, changes the output relative to
    uncached (so it really applied) and keeps less than all of the block compute."""
    pytest.importorskip("cache_dit")
    torch.set_num_threads(1)
    testbed = load_testbed()
    # At 8 steps with warm-up 3 only an aggressive threshold skips anything.
    methods = [
        BenchMethod("uncached", None, family="uncached"),
        *cache_dit_methods(thresholds=(0.5,)),
        next(m for m in hook_methods() if m.name == "TaylorSeer attn+ff interval=2"),
    ]
    if _has_forecasting():
        # The forecasting presets' codebooks are calibrated for 50 steps (at 8 they compute every step): the static
        # forecasting rows exercise the same programs here, test_forecast_presets_* their discovery.
        methods += static_methods((2,), forecast_orders=(0, 1, 2))
    assert [m.name for m in methods[1:3]] == ["cache-dit DBCache F1B0 r=0.5", "cache-dit DBCache+TaylorSeer F1B0 r=0.5"]
    results = run_bench(testbed, methods, ONE_VIDEO, NUM_STEPS)
    write_outputs(results, tmp_path)
    rows = {r["method"]: r for r in results["rows"]}
    reference = methods[0].videos[0]
    for method in methods[1:]:
        row = rows[method.name]
        assert not torch.equal(method.videos[0], reference), f"{method.name} did not change the output"
        assert math.isfinite(row["psnr"]) and row["psnr"] > 10, row
        assert 0.0 < row["compute_fraction"] < 1.0, row
    for method in methods[1:3]:
        row = rows[method.name]
        assert row["family"] == "cache-dit" and row["compute_source"] == "linear FLOPs (video 1)"
        # cache-dit's own record: it computed every layer on fewer than all steps, and at least the 3 warm-up steps.
        assert len(row["computed_per_video"]) == 1 and 3 <= row["computed_per_video"][0] < NUM_STEPS, row
    # With the calibrator the cached steps are forecast, not reused: another video at the same decisions.
    assert not torch.equal(methods[1].videos[0], methods[2].videos[0])
    if _has_forecasting():
        static0, static1, static2 = (rows[f"static k=2{suffix}"] for suffix in ("", " +f1", " +f2"))
        assert [r["forecast_order"] for r in (static0, static1, static2)] == [0, 1, 2]
        # Same schedule, other skip steps: forecasting really applied. Order 0 keeps the reference's start and forced
        # steps (1, 2, 4, ..., 49, 50), the forecasting orders the regular grid (1, 3, 5, ..., 49, 50).
        assert static1["computed_per_video"] == static2["computed_per_video"] != static0["computed_per_video"]
        assert len({r["psnr"] for r in (static0, static1, static2)}) == 3
    assert "| cache-dit DBCache F1B0 r=0.5 |" in (tmp_path / "quality_latency.md").read_text()
    assert (tmp_path / "quality_latency_pareto.png").stat().st_size > 0


@needs_checkpoint
def test_cache_dit_view_is_latte_and_removal_leaves_the_model_as_before():
    pytest.importorskip("cache_dit")
    from adacache_compile.testbed.sample import sample

    torch.set_num_threads(1)
    testbed = load_testbed()
    video = ONE_VIDEO[0]
    before = _uncached(testbed)
    attributes = {name: set(vars(module)) for name, module in testbed.transformer.named_modules()}
    # The one-list view cache-dit runs on computes exactly Latte's forward.
    view = sample(CacheDiTLatte(testbed.transformer), testbed, [video[:2]], [video[2]], NUM_STEPS, progress=False)
    assert torch.equal(view, before)
    for method in cache_dit_methods(thresholds=(0.5,)):
        cache_config, calibrator_config = method.cache_dit(NUM_STEPS)
        with apply_cache_dit(testbed.transformer, cache_config, calibrator_config) as (cached, reset):
            reset()
            output = sample(cached, testbed, [video[:2]], [video[2]], NUM_STEPS, progress=False)
            assert cached.cached_steps(), "cache-dit served no step from cache"
        assert not torch.equal(output, before)
        assert torch.equal(_uncached(testbed), before), f"{method.name} left the model changed"
        assert {name: set(vars(module)) for name, module in testbed.transformer.named_modules()} == attributes
    # cache-dit's own way for a model (a BlockAdapter over its block lists) runs another network on Latte; the probe
    # says so, and leaves the model as before too.
    reasons = cache_dit_candidates(testbed, video, NUM_STEPS, before)
    key = "cache-dit BlockAdapter over transformer_blocks + temporal_transformer_blocks"
    assert "runs another network" in reasons[key], reasons[key]
    assert torch.equal(_uncached(testbed), before)
    assert {name: set(vars(module)) for name, module in testbed.transformer.named_modules()} == attributes


def test_forecast_presets_are_taken_from_the_library(monkeypatch):
    config = pytest.importorskip("adacache_compile.config")
    if not _has_forecasting():
        pytest.skip("AdaCacheConfig has no forecast_order yet")
    base = config.AdaCacheConfig.preset("fast-50")
    presets = {name: preset for name, preset in config.PRESETS.items() if "+f" not in name}
    presets["fast-50+f1"] = dataclasses.replace(base, forecast_order=1)
    presets["slow-30+f2"] = dataclasses.replace(base, forecast_order=2)
    monkeypatch.setattr(config, "PRESETS", presets)
    methods = forecast_methods(50)
    assert [(m.name, m.group) for m in methods] == [("AdaCache-fast+f1 (fast-50+f1)", "AdaCache +f1")]
    assert methods[0].config.forecast_order == 1


def _row(method, family, speedup, psnr, computed=None, order=None, bound=None, group=None):
    row = {"method": method, "family": family, "speedup": speedup, "psnr": psnr, "computed_steps": computed}
    row["forecast_order"] = order
    row["group"] = group or (f"static +f{order}" if order else "static") if family == "static" else family
    if bound is not None:
        row["step_bound"] = 50 / computed
        row["speedup_over_bound"] = bound
    return row


def test_targets_compare_forecast_presets_with_the_peers_front_and_static_strides():
    from benchmarks.quality_latency import _targets

    rows = [
        _row("uncached", "uncached", 1.0, float("inf")),
        _row("AdaCache-fast (fast-50)", "adacache", 3.0, 28.0, 12.0, 0, 0.72),
        _row("AdaCache-fast+f1 (fast-50+f1)", "adacache", 4.0, 30.0, 12.0, 1, 0.70),
        _row("AdaCache-slow+f1 (slow-50+f1)", "adacache", 2.2, 38.0, 20.0, 1, 0.90),
        _row("static k=3 +f1", "static", 2.0, 34.0, 19.0, 1),
        _row("static k=4 +f1", "static", 2.5, 31.0, 15.0, 1),
        _row("static k=2 +f1", "static", 1.6, 42.0, 27.0, 1),
        # Evenly spaced fixed schedules: their own comparison, never mixed into the strides'.
        _row("static even n=11 +f1", "static", 4.1, 31.0, 11.0, 1, group="static even +f1"),
        _row("static even n=13 +f1", "static", 3.7, 35.0, 13.0, 1, group="static even +f1"),
        # Peers: one hook dominated by a cache-dit point, the front is (26 dB, 4x), (32 dB, 3x), (40 dB, 1.5x).
        _row("TaylorSeer blocks interval=6", "hook", 4.0, 26.0),
        _row("PAB s2/t3/c4", "hook", 1.2, 31.0),
        _row("cache-dit DBCache F1B0 r=0.1", "cache-dit", 3.0, 32.0),
        _row("cache-dit DBCache F1B0 r=0.05", "cache-dit", 1.5, 40.0),
    ]
    targets = {t["target"]: t for t in _targets(rows, 50)}
    fast = targets["AdaCache-fast+f1: >= 1.25x the best peer at >= its PSNR (around 28 dB)"]
    # Front at 30 dB: 4 + (3 - 4) * (30 - 26) / (32 - 26) = 3.33x; 4 / 3.33 = 1.20 < 1.25.
    assert "3.33x between TaylorSeer blocks interval=6" in fast["measured"] and fast["met"] is False
    slow = targets["AdaCache-slow+f1: >= 1.25x the best peer at >= its PSNR (around 36 dB)"]
    # Front at 38 dB: 3 + (1.5 - 3) * 6 / 8 = 1.875x; 2.2 / 1.875 = 1.17.
    assert "1.88x between" in slow["measured"] and ": 1.17" in slow["measured"] and slow["met"] is False
    end28 = targets["around 28 dB: the fastest forecast preset at >= 28 dB >= 1.25x the peers' front"]
    # Fastest forecast preset at >= 28 dB: fast+f1 (4x); front at 28 dB: 4 - 2 / 6 = 3.67x.
    assert ": 1.09" in end28["measured"] and end28["met"] is False
    # Adaptivity pays: static +f1 at 12 steps lies outside the strides' range (15..27); at 20 steps 34 + 1/4 * ...
    assert targets["AdaCache-fast+f1: >= 1 dB over static strides +f1 at equal computed steps"]["met"] is None
    adaptivity = targets["AdaCache-slow+f1: >= 1 dB over static strides +f1 at equal computed steps"]
    # static +f1 at 20 steps: 34 + (42 - 34) * (20 - 19) / (27 - 19) = 35 dB; 38 - 35 = +3 dB.
    assert "35.00 dB" in adaptivity["measured"] and adaptivity["met"] is True
    even = targets["AdaCache-fast+f1: >= 1 dB over evenly spaced fixed schedules +f1 at equal computed steps"]
    # even grids at 12 steps: (31 + 35) / 2 = 33 dB; 30 - 33 = -3 dB.
    assert "33.00 dB" in even["measured"] and "(-3.00 dB)" in even["measured"] and even["met"] is False
    even_slow = targets["AdaCache-slow+f1: >= 1 dB over evenly spaced fixed schedules +f1 at equal computed steps"]
    assert even_slow["met"] is None and "outside the range" in even_slow["measured"]
    cheap = targets["AdaCache-fast+f1: speedup / step bound >= 0.97x that of fast-50"]
    assert "0.700 vs 0.720: 0.972" in cheap["measured"] and cheap["met"] is True
    assert targets["AdaCache-slow+f1: speedup / step bound >= 0.97x that of slow-50"]["met"] is None


def test_quality_latency_script_parses_its_options():
    from benchmarks.quality_latency import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize(
    "name",
    [
        "context_parallel",
        "export_findings",
        "gpu_check",
        "ort_speed",
        "schedule_search",
        "single_file",
        "skip_cost",
        "testbed_label_use",
    ],
)
def test_benchmark_scripts_import(name):
    assert callable(importlib.import_module(f"benchmarks.{name}").main)


def test_skip_cost_smoke(capsys):
    from benchmarks.skip_cost import main

    main(["--depth", "2", "--dim", "32", "--frames", "2", "--size", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "skip / full = " in out and "full program" in out


def test_single_file_benchmark_smoke(capsys):
    pytest.importorskip("onnxruntime")
    from benchmarks.single_file import main

    result = main(["--depth", "2", "--dim", "32", "--frames", "2", "--size", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "cached.onnx / skip.onnx = " in out and "cached.onnx / full.onnx = " in out
    # The If's else branch is the skip program (plus empty deltas and tap): far smaller than its then branch, and a
    # skipped step returns no copy of the cached values.
    assert result["else_branch nodes"] < result["then_branch nodes"] / 2
    assert result["passed_through_bytes"] == 0 < result["cached_bytes"]


def test_gpu_check_cpu_dry_run(tmp_path):
    pytest.importorskip("diffusers")
    from benchmarks.gpu_check import main

    tiny = ["--layers", "2", "--heads", "2", "--head-dim", "8", "--ffn", "32", "--frames", "2", "--height", "4"]
    tiny += ["--width", "4", "--text-len", "4", "--steps", "6", "--repeats", "1", "--out", str(tmp_path)]
    report = main([*tiny, "--cpu-dry-run"])
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"] == 6
    for name in ("adacache_eager", "adacache_cudagraphs"):
        computed = report[name]["computed_steps"]
        assert computed[0] == 1 and computed[-1] == 6 and len(computed) <= 6, computed
    assert report["adacache_eager"]["computed_steps"] == report["adacache_cudagraphs"]["computed_steps"]
    assert report["full_eager_ms"] > 0 and report["skip_eager_ms"] > 0


@needs_checkpoint
def test_schedule_search_smoke(tmp_path):
    from benchmarks.schedule_search import grid, main

    assert grid(3, 10) == [1, 4, 7, 10] and grid(4, 10) == [1, 5, 9, 10]
    out = tmp_path / "search.json"
    report = main(
        ["--steps", "10", "--strides", "3", "--videos", "1", "--passes", "1", "--per-video", "1", "--out", str(out)]
    )
    (row,) = report["rows"]
    assert json.loads(out.read_text()) == report
    # The search keeps the first and last steps and the number of computed steps, and never scores below its start.
    assert row["found"][0] == 1 and row["found"][-1] == 10 and len(row["found"]) == len(row["grid"]) == 4
    assert row["found_calibration"] >= row["grid_calibration"]
    (item,) = row["per_video"]
    assert item["found"] >= item["grid"] and len(item["schedule"]) == 4
