"""Paths a deployment meets that once gave a different video than the model would, with no error (issue 23, items 1,
4, 5 and 6): video-to-video pipelines, config assignment, two calls per step without a context, and a long-running
process's state."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import FlowMatchEulerDiscreteScheduler, WanVideoToVideoPipeline  # noqa: E402
from tiny_pipelines import tiny_wan_pipeline  # noqa: E402

import adacache_compile as ac  # noqa: E402
from adacache_compile import AdaCacheConfig, AdaCacheError  # noqa: E402
from adacache_compile.sessions import HISTORY_LIMIT  # noqa: E402
from adacache_compile.testbed.tiny_models import TinyVideoDiT  # noqa: E402

# Rate 3 after the second computed step: with the reference's forced N-1 and N, a 5-step generation computes
# 1, 2, 4, 5 and skips 3.
RATE_3 = AdaCacheConfig(codebook=((10.0, 3),))


@pytest.fixture(scope="module")
def video_to_video(tmp_path_factory):
    """A real WanVideoToVideoPipeline from tiny components, saved and loaded back with save_pretrained."""
    base = tiny_wan_pipeline(FlowMatchEulerDiscreteScheduler(shift=3.0))
    components = {name: module for name, module in base.components.items() if name != "transformer_2"}
    pipe = WanVideoToVideoPipeline(**components)
    path = tmp_path_factory.mktemp("wan_v2v")
    pipe.save_pretrained(path)
    pipe = WanVideoToVideoPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _v2v(pipe, **kwargs):
    # WanVideoToVideoPipeline cleans prompts with ftfy, which the test extra does not install: embeddings instead.
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 8, 16, generator=generator)
    video = torch.rand(5, 3, 32, 32, generator=generator)  # [frames, channels, height, width] in [0, 1]
    return pipe(
        video=list(video),
        prompt_embeds=embeds,
        negative_prompt_embeds=-embeds,
        height=32,
        width=32,
        num_inference_steps=10,
        strength=0.5,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
        **kwargs,
    ).frames


def test_a_video_to_video_pipeline_computes_the_forced_last_steps_of_the_tail_it_runs(video_to_video):
    pipe = video_to_video
    ac.apply(pipe, RATE_3)
    cached = pipe.transformer
    try:
        _v2v(pipe)
        history = cached.stats["history"]
    finally:
        ac.remove(pipe)
    # strength 0.5 of 10 steps: the loop runs the last 5, calling the model once per CFG branch without a
    # cache_context; the announced schedule has each timestep once, so the second call at a timestep is the second
    # branch of that step.
    branches = {entry["branch"]: entry for entry in history[-2:]}
    assert set(branches) == {"default", "default#2"}
    for entry in branches.values():
        assert entry["num_steps"] == 5 and entry["steps_run"] == 5
        assert entry["computed_steps"] == [1, 2, 4, 5] and entry["skipped_steps"] == [3]


def test_assigning_adacache_config_switches_the_programs_as_use_config_does():
    torch.manual_seed(0)
    model = TinyVideoDiT().eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 4, 8, 8), timestep=torch.tensor([500.0]))
    assigned = ac.optimize(model, "fast-30", example_inputs=inputs)
    assigned.adacache_config = ac.AdaCacheConfig.preset("fast-50+f2")
    fresh = ac.optimize(model, "fast-50+f2", example_inputs=inputs)

    def run(module):
        latents = inputs["hidden_states"]
        with module.generation(12):
            for i in range(12):
                latents = latents - module(hidden_states=latents, timestep=torch.tensor([1000.0 - 80 * i]))[0] / 12
        return latents, module.stats["history"][-1]["computed_steps"]

    (got, got_steps), (want, want_steps) = run(assigned), run(fresh)
    assert assigned.programs.forecast_order == fresh.programs.forecast_order == 2
    assert got_steps == want_steps and len(got_steps) < 12
    # Same programs, same inputs, same schedule: the two modules run the same float32 ops.
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="expected an AdaCacheConfig, got str"):
        assigned.adacache_config = "fast-50"


def test_two_calls_per_step_without_a_context_are_refused():
    torch.manual_seed(0)
    cached = ac.optimize(TinyVideoDiT().eval(), RATE_3)
    latents = torch.randn(2, 4, 4, 8, 8)
    t = torch.tensor([900.0, 900.0])
    cached(hidden_states=latents, timestep=t)
    with pytest.raises(AdaCacheError, match=r"second call at timestep 900 without a cache_context\(\) or generation"):
        cached(hidden_states=latents, timestep=t)
    # The ways out the error names work: one session per branch, or batched CFG in one call per step.
    cached.reset()
    with cached.cache_context("cond"):
        cached(hidden_states=latents, timestep=t)
    with cached.cache_context("uncond"):
        cached(hidden_states=latents, timestep=t)
    assert {"cond", "uncond"} <= set(cached.stats)


def test_finished_generations_are_kept_bounded():
    torch.manual_seed(0)
    model = TinyVideoDiT(depth=2).eval()
    cached = ac.optimize(model, RATE_3)
    latents = torch.randn(1, 4, 1, 4, 4)
    runs = HISTORY_LIMIT + 40
    for _ in range(runs):
        with cached.generation(2):
            for t in (900.0, 400.0):
                cached(hidden_states=latents, timestep=torch.tensor([t]))
    history = cached.stats["history"]
    assert len(history) == HISTORY_LIMIT and cached.generations_finished == runs
    assert [entry["generation"] for entry in history] == list(range(runs - HISTORY_LIMIT + 1, runs + 1))
    assert len(cached.history_since(runs - 3)) == 3
    with pytest.raises(ValueError, match="have left the history"):
        cached.history_since(0)
