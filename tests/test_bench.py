import importlib
import json
import math
import statistics

import pytest
import torch

from adacache_compile.testbed import CHECKPOINT_DIR, load_testbed
from benchmarks.quality_latency import (
    BenchMethod,
    adacache_methods,
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
    taylorseer = next(m for m in hook_methods() if m.name.startswith("TaylorSeer interval=2"))
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


def test_quality_latency_script_parses_its_options():
    from benchmarks.quality_latency import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("name", ["export_findings", "gpu_check", "ort_speed", "skip_cost", "testbed_label_use"])
def test_benchmark_scripts_import(name):
    assert callable(importlib.import_module(f"benchmarks.{name}").main)


def test_skip_cost_smoke(capsys):
    from benchmarks.skip_cost import main

    main(["--depth", "2", "--dim", "32", "--frames", "2", "--size", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "skip / full = " in out and "full program" in out


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
