"""Batched serving of the second testbed, ltx-textures (LTX-Video: packed tokens, an attention mask per row and the
grid as int arguments, which every call of a batch must share), through GenerationService: concurrent requests
equal to their solo runs."""

from __future__ import annotations

import pytest
from serving_helpers import assert_video_close

import adacache_compile as ac
from adacache_compile.config import AdaCacheConfig
from adacache_compile.serving import (
    BatchedTransformer,
    GenerationService,
    GenerationSpec,
    TestbedGenerator,
    served_configs,
)
from adacache_compile.testbed import TESTBEDS

pytestmark = pytest.mark.skipif(
    not (TESTBEDS["ltx-textures"] / "model.safetensors").exists(), reason="ltx-textures checkpoint not in this tree"
)

SPECS = [
    (GenerationSpec(steps=8, seeds=(1,), prompt="stripes pan"), "fast-50+f2"),
    (GenerationSpec(steps=10, seeds=(2,), labels=(("rings", "zoom"),)), "slow-50+f2"),
    (GenerationSpec(steps=6, seeds=(3,), labels=((0, 1), (3, 2))), "uncached"),
]


@pytest.fixture(scope="module")
def service():
    from adacache_compile.testbed import load_testbed

    testbed = load_testbed("ltx-textures")
    runtime = ac.optimize(testbed.transformer, AdaCacheConfig.preset("fast-50"))
    service = GenerationService(
        BatchedTransformer(runtime), TestbedGenerator(testbed), served_configs(runtime.adacache_config), "fast-50"
    )
    yield service
    service.close()


def test_ltx_requests_equal_their_solo_runs(service):
    solo = []
    for spec, config in SPECS:
        job = service.submit(spec, config)
        assert job.done.wait(300)
        solo.append(job)
    jobs = [service.submit(spec, config) for spec, config in SPECS]
    for job, alone in zip(jobs, solo):
        assert job.done.wait(300)
        assert job.status == alone.status == "done", (job.error, alone.error)
        assert job.computed_steps == alone.computed_steps
        assert_video_close(job.video, alone.video, str(alone.spec))
    assert solo[2].video.shape[0] == 2 and solo[2].computed_steps == {"default": [1, 2, 3, 4, 5, 6]}
    assert service.batched.stats["batches"]["largest_rows"] > 2  # requests shared program calls
