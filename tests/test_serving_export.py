"""Batched serving of the exported onnxruntime programs (``adacache_compile.load(dir, "onnxruntime")``): the testbed
exported with a batch profile up to 16 rows and forecast order 2, mixed requests equal to their solo runs, the
host-side forecast equal to the programs' own, and batches larger than the profile split."""

from __future__ import annotations

import pytest
import torch
from serving_helpers import Job, assert_same_as_solo, ddim, run_together

import adacache_compile as ac
from adacache_compile.config import AdaCacheConfig
from adacache_compile.serving import BatchedTransformer
from adacache_compile.testbed import CHECKPOINT_DIR

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="testbed checkpoint not shipped in this tree"
)

MAX_BATCH = 16


@pytest.fixture(scope="module")
def testbed():
    from adacache_compile.testbed import load_testbed

    return load_testbed()


@pytest.fixture(scope="module")
def exported(testbed, tmp_path_factory):
    from adacache_compile.export import to_onnx

    cached = ac.optimize(testbed.transformer, AdaCacheConfig.preset("fast-50+f2"))
    ddim(cached, testbed, Job(None, 1, ((0, 1),), (0,)))  # captures the testbed's call
    # Latte's fully dynamic export is redone with the batch only (tests/test_export_integration.py): ask for that.
    return to_onnx(cached, tmp_path_factory.mktemp("serving") / "testbed", dynamic=["batch"], max_sizes={"batch": 16})


@pytest.fixture()
def runtime(exported):
    from adacache_compile.export import load

    return load(exported, "onnxruntime", providers=["CPUExecutionProvider"])


def solo(batched, testbed, job: Job):
    return run_together(batched, testbed, [Job(**{**vars(job), "join_after": None})])[0]


def test_exported_runtime_batches_mixed_requests(runtime, testbed):
    jobs = [
        Job("fast-50+f2", 10, ((1, 3),), (1,)),
        Job("slow-50+f2", 12, ((0, 2),), (2,), join_after=(0, 2)),
        Job("fast-50", 8, ((2, 0),), (3,), two_calls=True),
        Job(AdaCacheConfig.preset("fast-50+f2").replace(enabled=False), 6, ((3, 1),), (4,)),
    ]
    with BatchedTransformer(runtime) as batched:
        assert batched.max_rows == MAX_BATCH  # the exported batch profile
        together = run_together(batched, testbed, jobs)
        batches = batched.stats["batches"]
        for index, job in enumerate(jobs):
            assert_same_as_solo(together[index], solo(batched, testbed, job), f"job {index}")
    assert batches["mean_calls_per_step"] > 1.5 and batches["calls"]["full"] > batches["program_calls"]["full"]


def test_host_forecast_equals_the_programs_own(runtime, testbed):
    # A plain generation feeds the order-2 skip program its three deltas and weights; the engine feeds it the
    # combination it made on the host, with weights (1, 0, 0): same schedule, same video.
    job = Job("slow-50+f2", 12, ((0, 2),), (2,))
    runtime.use_config(AdaCacheConfig.preset(job.config))
    with runtime.generation(job.steps):
        expected = ddim(runtime, testbed, job)
    with BatchedTransformer(runtime) as batched:
        outcome = solo(batched, testbed, job)
    assert outcome.computed == {"default": runtime.stats["history"][-1]["computed_steps"]}
    torch.testing.assert_close(outcome.video, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_batches_beyond_the_profile_are_split(runtime, testbed):
    # Three requests of three videos each: 18 rows per step with CFG, more than the profile's 16.
    jobs = [Job("fast-50+f2", 6, ((i, 1), (i, 2), (i, 3)), (10 * i, 10 * i + 1, 10 * i + 2)) for i in range(3)]
    with BatchedTransformer(runtime) as batched:
        together = run_together(batched, testbed, jobs)
        assert 6 < batched.stats["batches"]["largest_rows"] <= MAX_BATCH
        for index, job in enumerate(jobs):
            assert_same_as_solo(together[index], solo(batched, testbed, job), f"job {index}")
