"""Batched serving of a diffusers pipeline (a tiny ``WanPipeline``: CFG in two transformer calls per step, named by
``cache_context``; a multistep UniPC scheduler, copied per request): concurrent generations through
``GenerationService`` with their own configs and N, each equal to its solo run, one session per branch."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import UniPCMultistepScheduler  # noqa: E402
from serving_helpers import assert_video_close  # noqa: E402
from tiny_pipelines import tiny_wan_pipeline  # noqa: E402

import adacache_compile as ac  # noqa: E402
from adacache_compile.config import AdaCacheConfig  # noqa: E402
from adacache_compile.serving import (  # noqa: E402
    BatchedTransformer,
    GenerationService,
    GenerationSpec,
    PipelineGenerator,
    served_configs,
)

# Threshold 10 is above any metric of the tiny model: every computed step after step 1 picks rate 3 (or 2).
SKIP_3 = AdaCacheConfig(codebook=((10.0, 3),))
SKIP_2 = AdaCacheConfig(codebook=((10.0, 2),))
SPECS = [
    (GenerationSpec(steps=8, seeds=(0,), prompt="a cat runs on the beach"), "skip3"),
    (GenerationSpec(steps=6, seeds=(1,), prompt="a dog runs", guidance_scale=3.0), "skip2"),
    (GenerationSpec(steps=5, seeds=(2,), prompt="the beach", negative_prompt="blurry"), "uncached"),
]


@pytest.fixture(scope="module")
def service():
    pipe = tiny_wan_pipeline(UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction"))
    runtime = ac.optimize(pipe.transformer, SKIP_3)
    configs = served_configs(runtime.adacache_config, {"skip3": SKIP_3, "skip2": SKIP_2})
    generator = PipelineGenerator(
        pipe, "tiny-wan", {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 8}
    )
    service = GenerationService(BatchedTransformer(runtime), generator, configs, "skip3", max_concurrent=3)
    yield service
    service.close()


def wait(jobs):
    for job in jobs:
        assert job.done.wait(300)
    return jobs


def test_pipeline_requests_equal_their_solo_runs(service):
    solo = [wait([service.submit(spec, config)])[0] for spec, config in SPECS]
    jobs = []
    threads = [threading.Thread(target=lambda s=s, c=c: jobs.append(service.submit(s, c))) for s, c in SPECS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    together = {job.spec.prompt: job for job in wait(jobs)}
    assert service.batched.stats["batches"]["mean_calls_per_step"] > 1.0
    for alone in solo:
        job = together[alone.spec.prompt]
        assert job.status == alone.status == "done", (job.error, alone.error)
        assert job.computed_steps == alone.computed_steps
        assert set(job.computed_steps) == {"cond", "uncond"}  # one session per CFG branch
        assert_video_close(job.video, alone.video, alone.spec.prompt)
    assert together["a cat runs on the beach"].computed_steps["cond"] == [1, 2, 5, 7, 8]
    assert together["the beach"].computed_steps["uncond"] == [1, 2, 3, 4, 5]
    assert torch.isfinite(together["a dog runs"].video).all()
