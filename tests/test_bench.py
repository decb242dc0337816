import json
import math

import pytest
import torch

from adacache_compile.bench import (
    BenchMethod,
    adacache_methods,
    hook_methods,
    run_bench,
    static_methods,
    write_outputs,
)
from adacache_compile.testbed import CHECKPOINT_DIR, load_testbed

needs_checkpoint = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="testbed checkpoint not shipped in this tree"
)
NUM_STEPS = 8
VIDEOS = [("disc", 0, 3100), ("cross", 3, 3101)]


@needs_checkpoint
def test_bench_end_to_end(tmp_path):
    torch.set_num_threads(1)
    testbed = load_testbed()
    taylorseer = next(m for m in hook_methods(NUM_STEPS) if m.name.startswith("TaylorSeer interval=2"))
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
    assert rows["uncached"]["psnr"] == math.inf and rows["uncached"]["speedup"] == 1.0
    assert len(rows["uncached"]["round_seconds"]) == 2
    for method in methods[1:]:
        row = rows[method.name]
        assert math.isfinite(row["psnr"]) and row["psnr"] > 10, row
        assert 0.0 < row["compute_fraction"] < 1.0, row
    # static k=2 computes 1, 2, then every 2nd step from 2, plus the forced N-1 and N: 1 2 4 6 7 8.
    assert rows["static k=2"]["computed_per_video"] == [6, 6]
    assert rows["static k=2"]["compute_fraction"] == pytest.approx(6 / NUM_STEPS)
    assert rows[methods[1].name]["speedup_over_bound"] > 0
    assert set(results["motion"][methods[1].name]) == {"0", "3"}
    assert "| uncached |" in report and "| inf |" in report
    assert (tmp_path / "quality_latency_pareto.png").stat().st_size > 0
