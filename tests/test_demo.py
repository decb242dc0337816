"""The testbed demo (``adacache-compile demo``) and the timed loop it shares with the benchmarks."""

from __future__ import annotations

import json

import pytest
import torch

from adacache_compile.testbed import TESTBEDS
from adacache_compile.testbed.timing import timed_runs


def _needs(name):
    return pytest.mark.skipif(
        not (TESTBEDS[name] / "model.safetensors").exists(), reason=f"testbed {name} checkpoint not in this tree"
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


def test_demo_videos_one_per_second_label():
    from adacache_compile.testbed.demo import DEMO_VIDEOS, demo_videos
    from adacache_compile.testbed.families import FAMILIES

    assert DEMO_VIDEOS == [("square", 0, 11), ("disc", 1, 12), ("triangle", 2, 13), ("cross", 3, 14)]
    ltx = demo_videos(FAMILIES["ltx-textures"])
    assert [second for _, second, _ in ltx] == [0, 1, 2, 3]  # static, pan, rotate, zoom
    assert [first for first, _, _ in ltx] == ["stripes", "checker", "rings", "dots"]


@pytest.mark.parametrize(
    "name, video, gif",
    [
        pytest.param("latte-shapes", ("disc", 1, 12), "disc_slow_seed12", marks=_needs("latte-shapes")),
        # The second testbed's demo (35 s on 2 cores) runs in make test-all; make test runs the default testbed's.
        pytest.param(
            "ltx-textures", ("rings", 2, 13), "rings_rotate_seed13", marks=[_needs("ltx-textures"), pytest.mark.slow]
        ),
    ],
)
def test_run_demo_writes_its_table_and_files(tmp_path, capsys, name, video, gif):
    from adacache_compile.testbed.demo import run_demo

    torch.set_num_threads(1)
    num_steps = 30
    rows = run_demo(tmp_path, num_steps=num_steps, progress=False, videos=[video], testbed=name)

    methods = ["uncached", "AdaCache-fast", "AdaCache-slow", "AdaCache-fast+MoReg"]
    assert [row["method"] for row in rows] == methods
    record = json.loads((tmp_path / f"demo_{name}.json").read_text())
    assert record == {"testbed": name, "num_steps": num_steps, "videos": [list(video)], "rows": rows}
    heading, blank, *table = (tmp_path / f"demo_{name}.md").read_text().splitlines()
    assert heading.startswith(f"Testbed {name} (") and blank == ""
    assert len(table) == 2 + len(methods) and all(f"| {method} |" in "\n".join(table) for method in methods)
    # The "shape recognised" column only where the testbed has a recogniser of its first label.
    assert ("shape recognised" in table[0]) == (name == "latte-shapes")
    for method in methods:
        assert (tmp_path / f"{name}_{method}_{gif}.gif").stat().st_size > 0
    for file in (f"side_by_side_{name}.png", f"schedules_{name}.png"):
        assert (tmp_path / file).stat().st_size > 0

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
    if name == "latte-shapes":
        assert rows[1]["shapes_recognised"] in (0, 1)
    else:
        assert all("shapes_recognised" not in row for row in rows)
    assert "| AdaCache-fast |" in capsys.readouterr().out
