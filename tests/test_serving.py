"""Batched serving (adacache_compile.serving.BatchedTransformer) on the trained testbed: concurrent requests with
their own presets, N, forecast orders and policies, joining at different steps, CFG in one call and in two, each
equal to its solo run through the same engine; a NaN request handled alone; refusals; union decisions."""

from __future__ import annotations

import threading

import pytest
import torch
from serving_helpers import Job, assert_same_as_solo, ddim, run_together

import adacache_compile as ac
from adacache_compile.config import AdaCacheConfig, GapPolicy, InputPolicy, policy_config
from adacache_compile.errors import AdaCacheError
from adacache_compile.serving import BatchedTransformer
from adacache_compile.testbed import CHECKPOINT_DIR

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="testbed checkpoint not shipped in this tree"
)

UNCACHED = AdaCacheConfig.preset("fast-50").replace(enabled=False)


@pytest.fixture(scope="module")
def testbed():
    from adacache_compile.testbed import load_testbed

    return load_testbed()


@pytest.fixture(scope="module")
def runtime(testbed):
    # Programs of forecast order 0 (as `serve` builds them): every request forecasts at its own order on the host.
    runtime = ac.optimize(testbed.transformer, AdaCacheConfig.preset("fast-50"))
    ddim(runtime, testbed, Job(None, 1, ((0, 1),), (0,)))  # captures the testbed's call (batch dynamic)
    return runtime


@pytest.fixture()
def batched(runtime):
    engine = BatchedTransformer(runtime)
    yield engine
    engine.close()


def solo(batched, testbed, job: Job):
    return run_together(batched, testbed, [Job(**{**vars(job), "join_after": None})])[0]


def test_mixed_requests_equal_their_solo_runs(batched, testbed):
    jobs = [
        Job("fast-50+f2", 12, ((1, 3),), (1,)),
        Job("slow-50+f2", 14, ((0, 2),), (2,), join_after=(0, 3)),  # joins at the first one's step 3
        Job("fast-50", 10, ((2, 0),), (3,), two_calls=True),
        Job(UNCACHED, 8, ((3, 1),), (4,), two_calls=True, join_after=(0, 5)),
        Job(policy_config(GapPolicy(tolerance=0.05), forecast_order=1), 11, ((1, 1), (2, 2)), (5, 6)),
        Job(policy_config(InputPolicy(threshold=0.3)), 9, ((0, 0),), (7,)),
    ]
    together = run_together(batched, testbed, jobs)
    batches = batched.stats["batches"]
    for index, job in enumerate(jobs):
        assert_same_as_solo(together[index], solo(batched, testbed, job), f"job {index}")
    assert together[2].computed.keys() == {"cond", "uncond"}
    assert together[3].computed == {"cond": list(range(1, 9)), "uncond": list(range(1, 9))}
    # They really ran together: more than one request's call per batched step, some program calls shared.
    assert batches["mean_calls_per_step"] > 1.5
    assert batches["calls"]["full"] > batches["program_calls"]["full"]
    assert batches["calls"]["skip"] > batches["program_calls"]["skip"]
    # Memory: the cache holds only the rows of requests in flight, and nothing once they are all done.
    for outcome in together:
        own, engine = outcome.cache_bytes_mid_way
        assert 0 < own <= engine
    stats = batched.stats
    assert stats["cache_bytes"] == 0 and stats["requests"] == {}
    assert {entry["request"] for entry in stats["finished"]} >= {f"job{i}" for i in range(len(jobs))}


def test_the_batched_schedule_is_the_plain_runtimes(runtime, batched, testbed):
    # The engine's per-row metrics decide as the programs' own do in a plain generation on the same runtime (the
    # host-side forecast against the programs' own: tests/test_serving_export.py).
    job = Job("fast-50", 12, ((1, 3),), (1,))
    with runtime.generation(job.steps):
        expected = ddim(runtime, testbed, job)
    outcome = solo(batched, testbed, job)
    assert outcome.computed == {"default": runtime.stats["history"][-1]["computed_steps"]}
    torch.testing.assert_close(outcome.video, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_a_nan_request_is_recomputed_alone(batched, testbed):
    jobs = [
        Job("fast-50+f2", 10, ((1, 3),), (1,), corrupt_at=4),
        Job("slow-50+f2", 10, ((0, 2),), (2,)),
        Job("fast-50", 10, ((2, 0),), (3,), two_calls=True),
    ]
    together = run_together(batched, testbed, jobs)
    bad = together[0]
    assert bad.error is None and not bool(torch.isfinite(bad.video).all())
    # Its first computed step from 4 on saw the NaN; each non-finite step dropped its cache and forced the next, so
    # from there on it computed every step.
    first = bad.nonfinite["default"][0]
    assert 4 <= first and set(range(first, 11)) <= set(bad.computed["default"])
    for index in (1, 2):
        assert_same_as_solo(together[index], solo(batched, testbed, jobs[index]), f"job {index}")


def test_a_failing_request_fails_alone(batched, testbed):
    # A third request's loop makes a call the engine refuses (an input that needs gradients) at its third step and
    # leaves mid-generation: only it fails, the others go on as if it had never been there.
    jobs = [Job("fast-50+f2", 8, ((1, 3),), (1,)), Job("slow-50+f2", 8, ((0, 2),), (2,))]
    failures = []

    def broken():
        with batched.request(num_steps=8, config="fast-50", name="broken") as request:
            ddim(batched, testbed, Job("fast-50", 2, ((0, 0),), (9,)))
            call = dict(
                hidden_states=torch.zeros(2, 3, 8, 16, 16, requires_grad=True),
                timestep=torch.tensor([500, 500]),
                encoder_hidden_states=testbed.make_condition([(0, 0), (1, 1)]),
                return_dict=False,
            )
            try:
                batched(**call)
            except AdaCacheError as e:
                failures.append((str(e), request.progress["step"]))
                raise

    thread = threading.Thread(target=lambda: pytest.raises(AdaCacheError, broken))
    thread.start()
    together = run_together(batched, testbed, jobs)
    thread.join()
    assert failures and "'broken'" in failures[0][0] and "requires grad" in failures[0][0]
    assert failures[0][1] == 2
    for index in (0, 1):
        assert_same_as_solo(together[index], solo(batched, testbed, jobs[index]), f"job {index}")


def test_union_decisions_run_every_row_when_one_computes(runtime, testbed):
    engine = BatchedTransformer(runtime, union=True)
    try:
        jobs = [Job("fast-50+f2", 8, ((1, 3),), (1,)), Job("slow-50+f2", 8, ((0, 2),), (2,))]
        together = run_together(engine, testbed, jobs)
        batches = engine.stats["batches"]
    finally:
        engine.close()
    assert batches["union_promoted"] > 0
    # Each request's own schedule still decides its state; its skipped steps just ran in full when another computed.
    plain = BatchedTransformer(runtime)
    try:
        for index, job in enumerate(jobs):
            assert together[index].computed == solo(plain, testbed, job).computed
    finally:
        plain.close()


def test_refusals_explain(batched, testbed):
    with pytest.raises(AdaCacheError, match="MoReg"):
        with batched.request(num_steps=10, config="fast-50+moreg"):
            pass
    with pytest.raises(AdaCacheError, match="region"):
        with batched.request(num_steps=10, config=AdaCacheConfig.preset("fast-50").replace(region=(0, 2))):
            pass
    with pytest.raises(ValueError, match="num_steps"):
        with batched.request(num_steps=0):
            pass
    with pytest.raises(AdaCacheError, match="outside a request"):
        ddim(batched, testbed, Job(None, 1, ((0, 1),), (0,)))
    with batched.request(num_steps=2, name="outer"):
        with pytest.raises(AdaCacheError, match="already runs request 'outer'"):
            with batched.request(num_steps=2):
                pass
    with pytest.raises(TypeError, match="optimize"):
        BatchedTransformer(testbed.transformer)
