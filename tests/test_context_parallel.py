"""AdaCache on diffusers context parallelism: 2 CPU processes, gloo, Ulysses degree 2, tiny Wan and LTX-Video.

One spawn of two ranks (the fixture ``ranks``) runs every scenario and the tests read what each rank saw: the cached
CP generation against the cached single-process one (same computed steps, same video), a generation whose two
sequence shards change very differently (per-rank metrics would pick other steps; the summed ones give every rank
the same decisions), the collectives of the full and the skip program (read off the graphs), the per-rank cache
bytes and ``to_onnx``'s refusal. Everything is real: diffusers' ``enable_parallelism`` hooks, torch.distributed
with gloo, two processes.

CPU-only snag: diffusers' ``ModelMixin._resolve_parallel_config`` picks the rank's device as
``rank % torch.accelerator.device_count()``, a ZeroDivisionError on a machine without an accelerator. Each worker
therefore replaces ``torch.accelerator.device_count`` by ``lambda: 1`` in its own process before
``enable_parallelism`` (only when it reports 0); the device chosen is then ``cpu:0``, which is what gloo runs on.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytest.importorskip("diffusers")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from adacache_compile import AdaCacheConfig, AdaCacheError, optimize  # noqa: E402
from adacache_compile.config import GapPolicy, InputPolicy  # noqa: E402
from adacache_compile.parallel import context_parallel_of, reduce_metrics  # noqa: E402
from adacache_compile.schedule import Schedule, StepMetrics  # noqa: E402
from adacache_compile.testbed.tiny_models import tiny_model  # noqa: E402

WORLD = 2
NUM_STEPS = 8
# Threshold 10 is above any metric: rate 3 after the second computed step (steps 1, 2, 5, 7, 8 computed).
SKIPPING = AdaCacheConfig(codebook=((10.0, 3),))
# For the uneven-shards generation: rank 0's own metric (about 0.2) would pick rate 3, rank 1's (about 0.4) rate 2.
GRADED = AdaCacheConfig(codebook=((0.25, 3), (0.5, 2), (100.0, 1)))
FAMILIES = ("wan", "ltx")
# The step policies on the same (order-0) programs: the gap policy reads the fused delta's forecast error, whose
# norms are sums over each rank's shard (reduced with the metrics); the input policy reads the model's input, which
# every rank holds whole.
POLICIES = {
    "gap": AdaCacheConfig(policy=GapPolicy(tolerance=1.0, max_gap=3), forced_steps=(1, -1)),
    "input": AdaCacheConfig(policy=InputPolicy(threshold=1.0, max_skips=2), forced_steps=(1, -1)),
}
# Relative to the output's scale: gloo all-to-alls split the attention's float32 sums differently from one process
# (1e-6 per call), and the loops feed every output back for 8 steps.
ATOL = 1e-4


def _inputs(family: str) -> dict:
    """One call's kwargs; every sequence that a family's ``_cp_plan`` splits has an even length (48 video tokens,
    LTX's 6 text tokens). LTX gets ``encoder_attention_mask=None`` (every text token valid, the same function as an
    all-ones mask): with a mask, diffusers 0.42.1's native backend fails under Ulysses in eager mode already (its
    plan splits the mask with the text, the attention sees every key after the all-to-all: "output with shape
    [1, 1, 48, 6] doesn't match the broadcast shape [1, 2, 48, 6]")."""
    g = torch.Generator().manual_seed(1)
    if family == "wan":
        return dict(
            hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
            return_dict=False,
        )
    return dict(
        hidden_states=torch.randn(1, 48, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 6, 16, generator=g),
        encoder_attention_mask=None,
        num_frames=3,
        height=4,
        width=4,
        return_dict=False,
    )


def _rank1_tokens(family: str, x: torch.Tensor) -> tuple[slice, ...]:
    """An index of latents ``x`` inside the second half of the token sequence (the shard of rank 1)."""
    if family == "wan":  # [B, C, F, H, W]: frame-major tokens, 3 frames x 16; frame 2 is tokens 32..47
        return (slice(None), slice(None), slice(2, None))
    return (slice(None), slice(x.shape[1] // 2, None))  # LTX's packed [B, tokens, C]


def _generate(cached, family: str, uneven: bool = False) -> tuple[list[torch.Tensor], int]:
    """A hand-written sampling loop; returns each step's output and the cache bytes held after the second step.
    ``uneven``: the tokens of rank 0's shard and the timestep stay as they are, rank 1's tokens get fresh noise each
    step, so the two shards' taps change very differently."""
    kwargs = _inputs(family)
    x = kwargs.pop("hidden_states")
    noise = torch.Generator().manual_seed(2)
    outputs, cache_bytes = [], None
    timesteps = torch.linspace(999.0, 1.0, NUM_STEPS).tolist()
    with cached.generation(NUM_STEPS) as session:
        for step, t in enumerate(timesteps, start=1):
            out = cached(hidden_states=x, timestep=torch.tensor([timesteps[0] if uneven else t]), **kwargs)[0]
            outputs.append(out)
            if uneven:
                where = _rank1_tokens(family, x)
                x = x.clone()
                x[where] = torch.randn(x[where].shape, generator=noise)
            else:
                x = x - 0.1 * out
            if step == 2:
                cache_bytes = session.cache_bytes()
    return outputs, cache_bytes


def _collectives(program) -> list[tuple[str, str]]:
    """(op, owning module) of each ``_c10d_functional`` op of a program's graph."""
    found = []
    for node in program.graph.nodes:
        if node.op == "call_function" and "_c10d_functional" in str(node.target):
            paths = [path.split("@")[0] for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
            found.append((str(node.target), paths[-1] if paths else ""))
    return found


class _MetricSpy:
    """Records this rank's own metrics vector of every full-program call (before the CP reduce)."""

    def __init__(self, run_full):
        self.run_full = run_full
        self.vectors: list[list[float]] = []

    def __call__(self, *inputs):
        results = self.run_full(*inputs)
        self.vectors.append(results[-1].tolist())
        return results


def _history(cached) -> dict:
    last = cached.stats["history"][-1]
    return {key: last[key] for key in ("computed_steps", "skipped_steps", "records")}


def _scenarios(rank: int, out_dir: str) -> None:
    from diffusers import ContextParallelConfig

    from adacache_compile.export import to_onnx

    result: dict = {}
    for index, family in enumerate(FAMILIES):
        if index % WORLD == rank:  # the single-process reference (same seed, no parallelism), one family per rank
            reference = optimize(tiny_model(family), SKIPPING)
            outputs, cache_bytes = _generate(reference, family)
            result[f"{family}/single"] = dict(outputs=outputs, cache_bytes=cache_bytes, **_history(reference))
            reference.use_config(GRADED)
            result[f"{family}/single_uneven"] = dict(outputs=_generate(reference, family, uneven=True)[0])
            for name, config in POLICIES.items():
                reference.use_config(config)
                outputs, _ = _generate(reference, family, uneven=True)
                result[f"{family}/single_{name}"] = dict(outputs=outputs, **_history(reference))
    for family in FAMILIES:
        model = tiny_model(family)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        cached = optimize(model, SKIPPING)
        outputs, cache_bytes = _generate(cached, family)
        result[f"{family}/cp"] = dict(outputs=outputs, cache_bytes=cache_bytes, **_history(cached))
        programs = cached.plan.programs
        result[f"{family}/graphs"] = dict(full=_collectives(programs.full), skip=_collectives(programs.skip))
        result[f"{family}/region"] = cached.plan.region

        cached.use_config(GRADED)  # host-side only: same programs
        entry = cached.captures.latest()
        spy = entry.run_full = _MetricSpy(entry.run_full)
        outputs, _ = _generate(cached, family, uneven=True)
        result[f"{family}/uneven"] = dict(outputs=outputs, local_metrics=spy.vectors, **_history(cached))
        entry.run_full = spy.run_full
        for name, config in POLICIES.items():
            cached.use_config(config)
            outputs, _ = _generate(cached, family, uneven=True)
            result[f"{family}/{name}"] = dict(outputs=outputs, **_history(cached))
        if rank == 0 and family == "wan":  # MoReg cannot be measured on sequence shards: refused at capture
            try:
                optimize(model, "fast-30+moreg", example_inputs=dict(_inputs(family), timestep=torch.tensor([999.0])))
            except AdaCacheError as e:
                result["moreg"] = str(e)
        if rank == 0:
            try:
                to_onnx(cached, os.path.join(out_dir, f"{family}-onnx"), verify=False)
            except AdaCacheError as e:
                result[f"{family}/to_onnx"] = str(e)
        if family == "wan":  # the reduce on its own: rank 1 saw a NaN, L2 norms, shares 1x and 2x
            share = torch.tensor([1.0 - rank, 3.0, 4.0, 1.0]) * torch.tensor([1.0, rank + 1, rank + 1, 1.0])
            result["reduced_l2"] = reduce_metrics(share, context_parallel_of(model), norm_ord=2).tolist()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if torch.accelerator.device_count() == 0:  # see the module docstring
        torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _scenarios(rank, out_dir)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("cp"))
    mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _single(ranks: list[dict], family: str, run: str = "single") -> dict:
    """The single-process reference run of ``family`` (made by rank ``FAMILIES.index(family) % WORLD``)."""
    return ranks[FAMILIES.index(family) % WORLD][f"{family}/{run}"]


def _assert_video_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want) == NUM_STEPS
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=ATOL * w.abs().max().item(), msg=f"step {step}")


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_cp_generation_matches_single_process(ranks, family):
    single = _single(ranks, family)
    assert single["computed_steps"] == [1, 2, 5, 7, 8] and single["skipped_steps"] == [3, 4, 6]
    for rank in ranks:
        cp = rank[f"{family}/cp"]
        assert cp["computed_steps"] == single["computed_steps"]
        assert cp["skipped_steps"] == single["skipped_steps"]
        for got, want in zip(cp["records"], single["records"]):
            assert got["rate"] == want["rate"]
            if want["raw_metric"] is not None:  # the summed norms give the global metric
                assert got["raw_metric"] == pytest.approx(want["raw_metric"], rel=1e-4)
        _assert_video_close(cp["outputs"], single["outputs"])


def _local_rates(run: dict) -> list[int]:
    """The rate a schedule fed only this rank's own metrics picks at each of the run's computed steps. Up to the
    first step where two ranks' lists differ both had the same history, so that step is a real disagreement."""
    schedule = Schedule(GRADED, NUM_STEPS)
    for step, vector in zip(run["computed_steps"], run["local_metrics"]):
        schedule.observe(step, StepMetrics(vector[1], vector[2]) if schedule.computed_steps else None)
    return [record.rate for record in schedule.records]


@pytest.mark.parametrize("family", FAMILIES)
def test_uneven_shards_give_every_rank_the_same_decisions(ranks, family):
    runs = [rank[f"{family}/uneven"] for rank in ranks]
    # What each rank measured on its own shard: rank 1's tap changes about twice as much as rank 0's (Wan: 0.40 vs
    # 0.20 at step 2; the global value, 0.30, lies between).
    local_ratios = [[v[1] / v[2] for v in run["local_metrics"][1:]] for run in runs]
    assert all(high > 1.5 * low for low, high in zip(*local_ratios)), local_ratios
    # Per-rank metrics would have made the ranks compute different steps (and hang in mismatched collectives).
    assert _local_rates(runs[0]) != _local_rates(runs[1])
    # The summed ones: identical decisions and metrics on every rank, at every step.
    assert runs[0]["computed_steps"] == runs[1]["computed_steps"]
    assert runs[0]["records"] == runs[1]["records"]
    assert runs[0]["skipped_steps"], "the schedule never skipped: the test would not exercise the skip program"
    _assert_video_close(runs[0]["outputs"], _single(ranks, family, "single_uneven")["outputs"])


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("family", FAMILIES)
def test_the_step_policies_decide_the_same_on_every_rank_with_uneven_shards(ranks, family, policy):
    runs = [rank[f"{family}/{policy}"] for rank in ranks]
    single = _single(ranks, family, f"single_{policy}")
    assert runs[0]["computed_steps"] == runs[1]["computed_steps"] == single["computed_steps"]
    assert runs[0]["records"] == runs[1]["records"]
    assert runs[0]["skipped_steps"], f"{policy}: never skipped; the test would not exercise the skip program"
    if policy == "gap":  # the error the controller read is the global one (summed norms), on every rank
        for got, want in zip(runs[0]["records"], single["records"]):
            assert got["rate"] == want["rate"]
            if want["metric"] is not None:
                assert got["metric"] == pytest.approx(want["metric"], rel=1e-4)
    _assert_video_close(runs[0]["outputs"], single["outputs"])


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_program_holds_no_collective_of_the_region(ranks, family):
    region = set(ranks[0][f"{family}/region"])
    graphs = ranks[0][f"{family}/graphs"]

    def in_region(module: str) -> bool:
        return any(module == block or module.startswith(block + ".") for block in region)

    # The full program communicates inside the blocks (Ulysses all-to-all in attention) ...
    assert any("all_to_all_single" in op and in_region(module) for op, module in graphs["full"])
    # ... the skip program only outside them: the output gather at proj_out.
    assert graphs["skip"], "the skip program should still gather the output sequence"
    assert not [(op, module) for op, module in graphs["skip"] if in_region(module) or "all_to_all" in op]
    assert {module for _, module in graphs["skip"]} == {"proj_out"}


@pytest.mark.parametrize("family", FAMILIES)
def test_per_rank_cache_bytes_are_one_world_th(ranks, family):
    single = _single(ranks, family)["cache_bytes"]
    assert single > 0
    for rank in ranks:
        assert rank[f"{family}/cp"]["cache_bytes"] * WORLD == single


@pytest.mark.parametrize("family", FAMILIES)
def test_to_onnx_refuses_a_context_parallel_model(ranks, family):
    message = ranks[0].get(f"{family}/to_onnx")
    assert message is not None, "to_onnx exported a context-parallel model"
    assert "context parallel" in message and "enable_parallelism" in message


def test_metric_reduce_sums_p_th_powers_and_flags_any_non_finite_rank(ranks):
    # ||.||_2 over both shards: sqrt(3^2 + 6^2), sqrt(4^2 + 8^2), sqrt(1 + 1); finite 0: rank 1 reported non-finite.
    want = [0.0, 45**0.5, 80**0.5, 2**0.5]
    for rank in ranks:
        assert rank["reduced_l2"] == pytest.approx(want, rel=1e-12)


def test_moreg_is_refused_on_a_context_parallel_model(ranks):
    message = ranks[0].get("moreg")
    assert message is not None, "MoReg was accepted on a context-parallel model"
    assert "context parallelism" in message and "AdaCacheConfig.moreg=None" in message


def test_benchmark_script_explains_its_launch_and_shape_requirements(monkeypatch):
    from benchmarks import context_parallel as bench

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match="torchrun --nproc-per-node N"):
        bench.setup_distributed(cpu=True)
    args = bench.parse_args([])
    bench.check_shapes(args, 2)  # the defaults (12 heads, 13 x 30 x 52 tokens) split over 2 ranks
    with pytest.raises(SystemExit, match="--heads 12 must be divisible by the world size 5"):
        bench.check_shapes(args, 5)
    with pytest.raises(SystemExit, match="20280 tokens .* divisible by the world size 16"):
        bench.check_shapes(bench.parse_args(["--heads", "16"]), 16)
