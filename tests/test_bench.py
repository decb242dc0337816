import dataclasses
import importlib
import json
import math
import statistics

import pytest
import torch

from adacache_compile.testbed import TESTBEDS, load_testbed
from adacache_compile.testbed.families import FAMILIES
from benchmarks.quality.adapters import LatteLayers, layer_stack, noise_levels, raw_vision_callback
from benchmarks.quality.cache_dit_peer import apply_cache_dit, cache_dit_candidates, cache_dit_methods
from benchmarks.quality.diffusers_hooks import hook_candidates, hook_methods
from benchmarks.quality.lineup import default_methods
from benchmarks.quality.methods import (
    BenchMethod,
    adacache_methods,
    forecast_methods,
    has_forecasting,
    static_methods,
)
from benchmarks.quality.report import output_paths, write_outputs
from benchmarks.quality.run import run_bench
from benchmarks.quality.videos import bench_videos, peer_calibration_videos


def _needs(name):
    return pytest.mark.skipif(
        not (TESTBEDS[name] / "model.safetensors").exists(), reason=f"testbed {name} checkpoint not in this tree"
    )


needs_checkpoint = _needs("latte-shapes")
# Both testbeds, each skipped where its checkpoint is not in the tree.
EACH_TESTBED = [pytest.param(name, marks=_needs(name)) for name in TESTBEDS]
NUM_STEPS = 8
VIDEOS = [("disc", 0, 3100), ("cross", 3, 3101)]


@pytest.mark.slow  # a benchmark script's smoke run (30 s on 2 cores): make test-all
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

    paths = output_paths("latte-shapes", tmp_path)
    assert paths["json"].name == "quality_latency_latte-shapes.json"
    record = json.loads(paths["json"].read_text())
    assert record["testbed"] == "latte-shapes"
    rows = {r["method"]: r for r in record["rows"]}
    assert list(rows) == [m.name for m in methods]
    assert {r["testbed"] for r in rows.values()} == {"latte-shapes"}
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
    # A hook's compute is measured, not scheduled: TaylorSeer has no computed-step count.
    assert rows[taylorseer.name]["computed_steps"] is None
    assert rows[taylorseer.name]["compute_source"] == "linear FLOPs (video 1)"
    assert report.startswith("Testbed **latte-shapes** (LatteTransformer3DModel)")
    assert "| uncached |" in report and f"| {row['psnr']:.2f} |" in report
    assert "| method | 0 static | 3 fast |" in report  # computed steps by second label, named
    assert paths["md"].read_text() == report
    assert paths["png"].name == "quality_latency_latte-shapes_pareto.png" and paths["png"].stat().st_size > 0


ONE_VIDEO = [("triangle", 2, 3102)]


def _one_video(testbed):
    """One video of the testbed: its third first label with its third second label (latte-shapes: ONE_VIDEO)."""
    family = testbed.family
    return [(family.first_labels[2], 2, 3102)]


def _uncached(testbed, video=ONE_VIDEO[0], num_steps=NUM_STEPS):
    from adacache_compile.testbed.sample import sample

    return sample(testbed.transformer, testbed, [video[:2]], [video[2]], num_steps, progress=False)


def _module_attributes(testbed):
    return {name: set(vars(module)) for name, module in testbed.transformer.named_modules()}


@pytest.mark.slow  # every peer end to end (40-70 s each on 2 cores): make test-all
@pytest.mark.parametrize("name", EACH_TESTBED)
def test_bench_peers_apply_on_each_testbed(tmp_path, name):
    """The peers of both testbeds run end to end through run_bench on one video: cache-dit with and without its
    calibrator, TaylorSeer, PAB (and FasterCache where it applies), FirstBlockCache; each changes the output relative
    to uncached (so it really applied) and keeps less than all of the block compute. Our forecasting static rows run
    too, and the testbed's model is left as it was."""
    pytest.importorskip("cache_dit")
    torch.set_num_threads(1)
    testbed = load_testbed(name)
    video = _one_video(testbed)
    before = _uncached(testbed, video[0])
    hooks = {m.name: m for m in hook_methods(name)}
    # At 8 steps with warm-up 3 only an aggressive threshold skips anything.
    methods = [
        BenchMethod("uncached", None, family="uncached"),
        *cache_dit_methods(thresholds=(0.5,)),
        hooks["TaylorSeer attn+ff interval=2"],
        next(m for m in hooks.values() if m.group == "PAB"),
        *[m for m in hooks.values() if m.name == "FasterCache s2"],
        hooks["FirstBlockCache r=0.3"],
    ]
    assert ("FasterCache s2" in hooks) == (name == "latte-shapes")  # LTX-Video's output is packed tokens
    if has_forecasting():
        # The forecasting presets' codebooks are calibrated for 50 steps (at 8 they compute every step): the static
        # forecasting rows exercise the same programs here, test_forecast_presets_* their discovery.
        methods += static_methods((2,), forecast_orders=(0, 1, 2))
    assert [m.name for m in methods[1:3]] == ["cache-dit DBCache F1B0 r=0.5", "cache-dit DBCache+TaylorSeer F1B0 r=0.5"]
    results = run_bench(testbed, methods, video, NUM_STEPS, candidates=hook_candidates(name))
    write_outputs(results, tmp_path)
    rows = {r["method"]: r for r in results["rows"]}
    assert {r["testbed"] for r in rows.values()} == {name}
    reference = methods[0].videos[0]
    assert torch.equal(reference, before)
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
        assert row["computed_source"] == "cache-dit record"
    # With the calibrator the cached steps are forecast, not reused: another video at the same decisions.
    assert not torch.equal(methods[1].videos[0], methods[2].videos[0])
    first_block = rows["FirstBlockCache r=0.3"]
    assert first_block["computed_source"] == "last block ran" and first_block["computed_per_video"][0] < NUM_STEPS
    if has_forecasting():
        static0, static1, static2 = (rows[f"static k=2{suffix}"] for suffix in ("", " +f1", " +f2"))
        assert [r["forecast_order"] for r in (static0, static1, static2)] == [0, 1, 2]
        # Same schedule, other skip steps: forecasting really applied. Order 0 keeps the reference's start and forced
        # steps (1, 2, 4, ..., 49, 50), the forecasting orders the regular grid (1, 3, 5, ..., 49, 50).
        assert static1["computed_per_video"] == static2["computed_per_video"] != static0["computed_per_video"]
        assert len({r["psnr"] for r in (static0, static1, static2)}) == 3
    # What does not apply is recorded with its reason: on Latte the block-stack hooks on its own two block lists
    # and cache-dit over them; on LTX-Video FasterCache (packed tokens) and PAB's cross-attention.
    reasons = results["not_applicable"]
    if name == "latte-shapes":
        assert (
            "runs another network"
            in reasons["cache-dit BlockAdapter over transformer_blocks + temporal_transformer_blocks"]
        )
        assert all(
            reasons[hook].startswith(("raises", "runs but")) for hook in ("FirstBlockCache", "MagCache", "SeaCache")
        )
    else:
        assert reasons["FasterCache"].startswith("raises ValueError") and "packed tokens" in reasons["FasterCache"]
        assert "is_cross_attention" in reasons["PAB temporal and cross-attention broadcast"]
    report = output_paths(name, tmp_path)["md"].read_text()
    assert report.startswith(f"Testbed **{name}**") and "| cache-dit DBCache F1B0 r=0.5 |" in report
    assert output_paths(name, tmp_path)["png"].stat().st_size > 0
    assert torch.equal(_uncached(testbed, video[0]), before), "a peer left the model changed"


@pytest.mark.parametrize("name", EACH_TESTBED)
def test_sea_cache_and_mag_cache_skip_steps_on_each_testbed(tmp_path, name):
    """The newest diffusers hooks on both testbeds, through the adapters their documented APIs ask for (SeaCache: the
    latents callback, sigma in cache_context, block metadata; MagCache: ratios calibrated with calibrate=True on a
    calibration video, passed back): each skips steps, its rows say so and carry the testbed name."""
    torch.set_num_threads(1)
    testbed = load_testbed(name)
    video = _one_video(testbed)
    before = _uncached(testbed, video[0])
    calibration_videos = peer_calibration_videos(testbed.family, count=1)
    assert not set(calibration_videos) & set(bench_videos(testbed.family))
    hooks = hook_methods(name, calibration_videos, sea_cache_settings=((0.5, 3),), mag_cache_settings=((0.5, 6),))
    sea, mag = (next(m for m in hooks if m.group == group) for group in ("SeaCache", "MagCache"))
    methods = [BenchMethod("uncached", None, family="uncached"), sea, mag]
    results = run_bench(testbed, methods, video, NUM_STEPS)
    write_outputs(results, tmp_path)
    assert results["testbed"] == name
    rows = {r["method"]: r for r in results["rows"]}
    assert {r["testbed"] for r in rows.values()} == {name}
    for method in (sea, mag):
        row = rows[method.name]
        (computed,) = row["computed_per_video"]
        # Skipped steps, counted (the last block did not run), with the output changed but close to uncached.
        assert 2 <= computed < NUM_STEPS and row["computed_source"] == "last block ran", row
        assert row["peer_warnings"] == [], row  # no fail-open fallback
        assert not torch.equal(method.videos[0], before) and row["psnr"] > 15, row
        assert 0.0 < row["compute_fraction"] < 1.0, row
    calibration = results["calibrations"]["MagCache"]
    assert calibration["videos"] == [list(v) for v in calibration_videos]
    assert len(calibration["mag_ratios"]) == NUM_STEPS and calibration["mag_ratios"][0] == 1.0
    assert all(r > 0 for r in calibration["mag_ratios"])
    assert "### Peers' calibrations" in output_paths(name, tmp_path)["md"].read_text()
    assert torch.equal(_uncached(testbed, video[0]), before)


@pytest.mark.parametrize("name", EACH_TESTBED)
def test_sea_cache_adapter_inputs(name):
    """SeaCache's raw_vision_callback gives the latents being denoised as (C, T, H, W), one per batch entry (LTX:
    unpacked from the packed tokens of the call), and sigma is the sampler's noise level."""
    from adacache_compile.testbed.families import pack_tokens

    testbed = load_testbed(name, random_init=True)
    videos = torch.randn(2, *testbed.video_shape)
    callback = raw_vision_callback(testbed)
    if name == "ltx-textures":
        model = testbed.model_config
        tokens = pack_tokens(videos, model.patch_size_t, model.patch_size)
        grid = {"num_frames": 4, "height": 8, "width": 8}
        latents = callback(testbed.transformer, (), {"hidden_states": tokens, **grid})
    else:
        latents = callback(layer_stack(testbed), (), {"hidden_states": videos})
    assert len(latents) == 2 and all(torch.equal(latent, video) for latent, video in zip(latents, videos))
    sigmas = noise_levels(testbed, NUM_STEPS)
    scheduler = testbed.scheduler(NUM_STEPS)
    assert len(sigmas) == NUM_STEPS and all(0.0 < s <= 1.0 for s in sigmas) and sigmas == sorted(sigmas, reverse=True)
    if name == "ltx-textures":  # flow matching: the scheduler's own sigmas
        assert sigmas == pytest.approx(scheduler.sigmas[:NUM_STEPS].tolist())
    else:  # DDIM: the flow-matching sigma of the same signal-to-noise ratio
        alpha_bar = scheduler.alphas_cumprod[scheduler.timesteps.long()].double()
        snr = [((1 - s) / s) ** 2 for s in sigmas]
        assert snr == pytest.approx((alpha_bar / (1 - alpha_bar)).tolist())


@needs_checkpoint
def test_latte_views_are_latte_and_peers_leave_the_model_as_before():
    """The one-list view of Latte computes exactly Latte's forward; cache-dit on it, and a diffusers block-stack hook
    on it, change the output and leave the transformer as before once removed."""
    pytest.importorskip("cache_dit")
    from adacache_compile.testbed.sample import sample

    torch.set_num_threads(1)
    testbed = load_testbed()
    video = ONE_VIDEO[0]
    before = _uncached(testbed)
    attributes = _module_attributes(testbed)
    view = sample(LatteLayers(testbed.transformer), testbed, [video[:2]], [video[2]], NUM_STEPS, progress=False)
    assert torch.equal(view, before)
    for method in cache_dit_methods(thresholds=(0.5,)):
        cache_config, calibrator_config = method.cache_dit(NUM_STEPS)
        with apply_cache_dit(testbed, cache_config, calibrator_config) as run:
            run.reset()
            output = sample(run.module, testbed, [video[:2]], [video[2]], NUM_STEPS, progress=False)
            assert run.cached_steps(), "cache-dit served no step from cache"
        assert not torch.equal(output, before)
        assert torch.equal(_uncached(testbed), before), f"{method.name} left the model changed"
        assert _module_attributes(testbed) == attributes
    # cache-dit's own way for a model (a BlockAdapter over its block lists) runs another network on Latte; the probe
    # says so, and leaves the model as before too.
    reasons = cache_dit_candidates(testbed, video, NUM_STEPS, before)
    key = "cache-dit BlockAdapter over transformer_blocks + temporal_transformer_blocks"
    assert "runs another network" in reasons[key], reasons[key]
    assert torch.equal(_uncached(testbed), before)
    assert _module_attributes(testbed) == attributes


def test_default_methods_per_testbed():
    """Each testbed's lineup: ours, then every peer that applies there, names unique; the newest hooks on both."""
    for name in TESTBEDS:
        methods = default_methods(name, 50)
        names = [m.name for m in methods]
        assert len(names) == len(set(names)) and names[0] == "uncached"
        groups = {m.group for m in methods if m.peer}
        assert {"SeaCache", "MagCache", "FirstBlockCache", "TaylorSeer (blocks)", "PAB"} <= groups
        assert ("FasterCache" in groups) == (name == "latte-shapes")
        assert all(m.on_layers for m in methods if m.group in ("SeaCache", "MagCache", "FirstBlockCache"))
        # Every MagCache setting shares one calibration, on videos disjoint from the benchmark's.
        (calibration,) = {id(m.calibration): m.calibration for m in methods if m.calibration is not None}.values()
        assert calibration.videos and not set(calibration.videos) & set(bench_videos(FAMILIES[name]))


def test_bench_videos_of_the_first_testbed_are_unchanged():
    from benchmarks.quality_latency import BENCH_VIDEOS

    assert len(BENCH_VIDEOS) == 16 and BENCH_VIDEOS[0] == ("square", 0, 3000) and BENCH_VIDEOS[-1] == ("cross", 3, 3015)
    assert BENCH_VIDEOS[5] == ("disc", 1, 3005)


def test_forecast_presets_are_taken_from_the_library(monkeypatch):
    config = pytest.importorskip("adacache_compile.config")
    if not has_forecasting():
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
    from benchmarks.quality.scoring import project_targets

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
    targets = {t["target"]: t for t in project_targets(rows, 50)}
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


@pytest.mark.slow  # a benchmark script's smoke run (40 s on 2 cores): make test-all
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


@pytest.mark.slow  # a benchmark script's smoke run (30 s on 2 cores): make test-all
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


@pytest.mark.slow  # a benchmark script's smoke run (40 s on 2 cores): make test-all
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


def test_calibrated_targets_against_the_peers_points_the_best_grid_and_the_rules_skip_cost():
    from benchmarks.quality.scoring import calibrated_targets, pareto_front

    def row(method, family, group, psnr, speedup, steps, policy="adacache", order=1, over=1.0):
        return dict(
            method=method,
            family=family,
            group=group,
            psnr=psnr,
            speedup=speedup,
            computed_steps=steps,
            policy=policy,
            forecast_order=order,
            speedup_over_bound=over,
        )

    rows = [
        row("calibrate@0.2 (gap)", "adacache", "calibrate (defaults)", 30.0, 4.5, 10, "gap", over=0.98),
        row("calibrate@0.28 (grid)", "adacache", "calibrate (defaults)", 31.6, 3.5, 14, over=0.99),
        row("static even n=10 +f1", "static", "static even +f1", 29.0, 4.8, 10),
        row("static even n=18 +f2", "static", "static even +f2", 37.0, 2.7, 18, order=2),
        row("static even n=10 +f2", "static", "static even +f2", 27.0, 4.8, 10, order=2),
    ]
    peers = [dict(method="SeaCache a", psnr=28.0, speedup=3.0), dict(method="SeaCache b", psnr=39.0, speedup=1.5)]
    targets = calibrated_targets(rows, pareto_front(peers))

    def find(*words):
        (found,) = [t for t in targets if all(w in t["target"] for w in words)]
        return found

    # At 28 dB the calibrated front (4.5x at 30 dB, 3.5x at 31.6 dB) runs 4.5 / 3.0 = 1.5x: met; at 39 dB no
    # calibrated config.
    assert find("SeaCache a")["met"] and find("SeaCache a")["measured"] == "4.50x: 1.50"
    assert find("SeaCache b")["met"] is False
    # Best grid at 10 steps: +f1's 29.0 (over +f2's 27.0): +1.00 dB, met; at 14 steps: +f2 interpolated between 10
    # and 18 steps is 32.0 dB: -0.40 dB, within the 0.5 dB slack.
    assert find("calibrate@0.2 (", "best fixed grid")["measured"] == "30.00 dB vs static even +f1 29.00 dB (+1.00 dB)"
    grid = find("calibrate@0.28", "best fixed grid")
    assert grid["measured"] == "31.60 dB vs static even +f2 32.00 dB (-0.40 dB)" and grid["met"]
    # The gap policy's skip cost against the rule's configs of order 1 (the +f1 grid and the calibrated grid: 1.0 and
    # 0.99); the calibrated grid is the rule's own, so it has no such target.
    cost = find("within 3%")
    assert cost["measured"] == "0.980 vs 0.995 (mean of 2): 0.985" and cost["met"]
