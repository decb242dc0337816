"""The testbed demo (``adacache-compile demo``) and the timed loop it shares with the benchmarks."""

from __future__ import annotations

import json

import pytest
import torch

from adacache_compile.testbed import CHECKPOINT_DIR
from adacache_compile.testbed.timing import timed_runs

needs_checkpoint = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="testbed checkpoint not shipped in this tree"
)


def test_timed_runs_times_each_item_inside_its_own_context():
    events = []

    class Context:
        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")
            return False

    def run(item):
        events.append(f"run {item}")
        return item * 10

    timed = timed_runs(
        run,
        [1, 2],
        context=Context,
        before=lambda: events.append("before"),
        after=lambda: events.append("after") or len(events),
        warmup=1,
    )
    warmup = ["before", "enter", "run 1", "exit"]
    first = ["before", "enter", "run 1", "exit", "after"]
    second = ["before", "enter", "run 2", "exit", "after"]
    assert events == warmup + first + second
    assert timed.results == [10, 20]  # the warm-up run is not recorded
    assert timed.records == [len(warmup + first), len(warmup + first + second)]
    assert len(timed.seconds) == 2 and all(s >= 0 for s in timed.seconds)
    assert timed.total == pytest.approx(sum(timed.seconds))
    assert timed.median == pytest.approx(sum(timed.seconds) / 2)


def test_timed_runs_without_context_or_after():
    timed = timed_runs(lambda item: item + 1, range(3))
    assert timed.results == [1, 2, 3] and timed.records == [] and len(timed.seconds) == 3
    assert timed_runs(lambda item: item, [], warmup=2).results == []


@needs_checkpoint
def test_run_demo_writes_its_table_and_files(tmp_path, capsys):
    from adacache_compile.testbed.demo import run_demo

    torch.set_num_threads(1)
    num_steps, videos = 30, [("disc", 1, 12)]
    rows = run_demo(tmp_path, num_steps=num_steps, progress=False, videos=videos)

    methods = ["uncached", "AdaCache-fast", "AdaCache-slow", "AdaCache-fast+MoReg"]
    assert [row["method"] for row in rows] == methods
    assert json.loads((tmp_path / "demo.json").read_text()) == {"num_steps": num_steps, "rows": rows}
    table = (tmp_path / "demo.md").read_text().splitlines()
    assert len(table) == 2 + len(methods) and all(f"| {name} |" in "\n".join(table) for name in methods)
    for name in methods:
        assert (tmp_path / f"{name}_disc_motion1_seed12.gif").stat().st_size > 0
    for name in ("side_by_side.png", "schedules.png"):
        assert (tmp_path / name).stat().st_size > 0

    uncached, *cached = rows
    assert uncached["computed_per_video"] == [num_steps] and uncached["psnr"] is None
    assert uncached["speedup"] == 1.0
    for row in cached:
        (computed,) = row["computed_per_video"]
        # Steps 1, 2 and the forced 29 and 30 are always computed; a cached method skips some of the rest.
        assert 4 <= computed < num_steps, row
        assert row["computed_steps"] == computed
        assert row["psnr"] > 15 and 0 < row["ssim"] <= 1, row
        assert row["speedup"] == pytest.approx(uncached["seconds"] / row["seconds"])
    assert rows[1]["computed_steps"] <= rows[2]["computed_steps"]  # fast computes no more than slow
    assert rows[1]["shapes_recognised"] in (0, 1)
    assert "| AdaCache-fast |" in capsys.readouterr().out
