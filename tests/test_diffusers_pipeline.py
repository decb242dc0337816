"""A real WanPipeline end to end on CPU with tiny random components, through adacache_compile.apply / remove.

Nothing is downloaded: the transformer, VAE and UMT5 text encoder come from tiny configs and the tokenizer is a
word-level one built here with the ``tokenizers`` library.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler  # noqa: E402
from tiny_pipelines import tiny_wan_pipeline  # noqa: E402

import adacache_compile  # noqa: E402
from adacache_compile import AdaCacheConfig, CachedTransformer  # noqa: E402
from adacache_compile.diffusers_integration import is_applied  # noqa: E402
from adacache_compile.testbed.tiny_models import tiny_model  # noqa: E402

NUM_STEPS = 8
# Threshold 10 is above any metric: every computed step after step 1 picks rate 3.
SKIPPING = AdaCacheConfig(codebook=((10.0, 3),))
EXPECTED_COMPUTED = [1, 2, 5, 7, 8]
EXPECTED_SKIPPED = [3, 4, 6]


def generate(pipe, prompt: str = "a cat runs on the beach") -> torch.Tensor:
    return pipe(
        prompt=prompt,
        negative_prompt="blurry low quality",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=NUM_STEPS,
        guidance_scale=5.0,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).frames


@pytest.fixture(scope="module")
def pipe():
    return tiny_wan_pipeline(UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction"))


@pytest.fixture(scope="module")
def original_video(pipe):
    return generate(pipe)


@pytest.fixture(scope="module")
def cached_run(pipe, original_video):
    """Two identical pipeline calls with a skipping config and the stats after each; the pipeline is then restored."""
    adacache_compile.apply(pipe, SKIPPING)
    cached = pipe.transformer
    record = vars(pipe)["_adacache_applied"]
    try:
        first = generate(pipe)
        stats_first = cached.stats
        second = generate(pipe)
        stats_second = cached.stats
    finally:
        adacache_compile.remove(pipe)
    return {"cached": cached, "videos": (first, second), "stats": (stats_first, stats_second), "record": record}


def test_pipeline_output_is_a_video(original_video):
    # [batch, frames, channels, height, width] from the VAE, all finite.
    assert original_video.shape == (1, 5, 3, 32, 32)
    assert torch.isfinite(original_video).all()


def test_cond_and_uncond_have_separate_schedules(cached_run):
    stats_first, _ = cached_run["stats"]
    # The pipeline's maybe_free_model_hooks() calls _reset_stateful_cache(): both branches are retired to history.
    assert set(stats_first) == {"history"}
    history = stats_first["history"]
    assert sorted(entry["branch"] for entry in history) == ["cond", "uncond"]
    for entry in history:
        assert entry["num_steps"] == NUM_STEPS
        assert entry["steps_run"] == NUM_STEPS
        assert entry["computed_steps"] == EXPECTED_COMPUTED
        assert entry["skipped_steps"] == EXPECTED_SKIPPED
        assert entry["records"][0]["step"] == 1


def test_second_call_starts_clean_and_repeats_the_first(cached_run):
    first, second = cached_run["videos"]
    _, stats_second = cached_run["stats"]
    new = stats_second["history"][2:]
    assert sorted(entry["branch"] for entry in new) == ["cond", "uncond"]
    for entry in new:
        assert entry["steps_run"] == NUM_STEPS
        assert entry["computed_steps"][0] == 1
        assert entry["computed_steps"] == EXPECTED_COMPUTED
    assert torch.equal(first, second)
    # The scheduler hook told the cached module N on each call.
    assert cached_run["record"].calls == [NUM_STEPS, NUM_STEPS]


def test_caching_changes_the_output(cached_run, original_video):
    first, _ = cached_run["videos"]
    assert not torch.equal(first, original_video)
    # Skipping 3 of 8 steps on a random tiny model stays in the same range of values.
    assert (first - original_video).abs().max() < 0.5


def test_all_steps_computed_equals_original(pipe, original_video, cached_run):
    cached = cached_run["cached"]
    # Reuse the captured programs with a codebook whose only rate is 1: every step runs the full program. The
    # pipeline's cache_context tells N, so the module works without apply()'s scheduler hook.
    saved_config, transformer = cached.adacache_config, pipe.transformer
    cached.adacache_config = AdaCacheConfig(codebook=((10.0, 1),))
    object.__setattr__(pipe, "transformer", cached)
    try:
        video = generate(pipe)
        history = cached.stats["history"][-2:]
    finally:
        cached.adacache_config = saved_config
        object.__setattr__(pipe, "transformer", transformer)
    assert [entry["computed_steps"] for entry in history] == [list(range(1, NUM_STEPS + 1))] * 2
    # Not bitwise: the full program writes each region output as input + fused delta (docs/algorithm.md), about one
    # float32 ulp from the eager model per residual add; over 8 steps of two branches and the VAE decode that grows to
    # about 1e-6 of the video's [0, 1] range (1.19e-6 measured on one machine, less on another: summation order
    # differs between CPUs). 1e-5 bounds it on any x86 machine and is still 100x below one skipped step's change.
    torch.testing.assert_close(video, original_video, rtol=0, atol=1e-5)


def test_disabled_config_equals_original_exactly(pipe, original_video):
    adacache_compile.apply(pipe, SKIPPING.replace(enabled=False))
    try:
        assert isinstance(pipe.transformer, CachedTransformer)
        video = generate(pipe)
    finally:
        adacache_compile.remove(pipe)
    assert torch.equal(video, original_video)


def test_apply_remove_round_trip_restores_originals():
    pipe = tiny_wan_pipeline(FlowMatchEulerDiscreteScheduler(shift=3.0))
    transformer, scheduler = pipe.transformer, pipe.scheduler
    config_before = dict(pipe.config)

    with pytest.raises(RuntimeError, match="not applied"):
        adacache_compile.remove(pipe)

    assert adacache_compile.apply(pipe, "fast-30") is pipe
    assert is_applied(pipe)
    assert isinstance(pipe.transformer, CachedTransformer)
    assert pipe.transformer._orig_mod is transformer
    assert pipe.transformer_2 is None  # Wan 2.1 has no second transformer: left alone
    assert "set_timesteps" in vars(scheduler)
    # The pipeline config still names the original class, so save_pretrained keeps working.
    assert dict(pipe.config) == config_before
    # Drop-in: attributes the pipeline reads are forwarded to the original module.
    assert pipe.transformer.config is transformer.config and pipe.transformer.dtype == transformer.dtype

    with pytest.raises(RuntimeError, match="already applied"):
        adacache_compile.apply(pipe)

    scheduler.set_timesteps(5)
    assert pipe.transformer.num_steps == 5

    assert adacache_compile.remove(pipe) is pipe
    assert not is_applied(pipe)
    assert pipe.transformer is transformer
    assert pipe.scheduler is scheduler
    assert "set_timesteps" not in vars(scheduler)
    assert scheduler.set_timesteps.__func__ is type(scheduler).set_timesteps
    assert dict(pipe.config) == config_before

    with pytest.raises(RuntimeError, match="not applied"):
        adacache_compile.remove(pipe)


def test_apply_covers_transformer_2_and_keeps_an_own_set_timesteps():
    pipe = tiny_wan_pipeline(FlowMatchEulerDiscreteScheduler(shift=3.0))
    second = tiny_model("wan", seed=1)
    object.__setattr__(pipe, "transformer_2", second)
    scheduler = pipe.scheduler
    calls = []

    def own_set_timesteps(*args, **kwargs):
        calls.append(args)
        return type(scheduler).set_timesteps(scheduler, *args, **kwargs)

    scheduler.set_timesteps = own_set_timesteps
    adacache_compile.apply(pipe)
    try:
        assert isinstance(pipe.transformer_2, CachedTransformer) and pipe.transformer_2._orig_mod is second
        scheduler.set_timesteps(6)
        assert calls == [(6,)]
        assert pipe.transformer.num_steps == pipe.transformer_2.num_steps == 6
    finally:
        adacache_compile.remove(pipe)
    assert pipe.transformer_2 is second
    assert scheduler.set_timesteps is own_set_timesteps


def test_apply_explains_a_pipeline_without_transformer():
    class UNetPipeline:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no transformer to cache"):
        adacache_compile.apply(UNetPipeline())


def test_exported_onnxruntime_runtime_runs_inside_the_pipeline(tmp_path):
    """Export the transformer as the pipeline calls it, load it with onnxruntime and put it in the pipeline: the video
    equals the torch cached pipeline's (same schedule) within 1e-4."""
    from adacache_compile.export import load, to_onnx

    pipe = tiny_wan_pipeline(UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction"))
    adacache_compile.apply(pipe, SKIPPING)
    try:
        torch_video = generate(pipe)  # also captures the pipeline's own transformer call
        torch_stats = pipe.transformer.stats["history"]
        to_onnx(pipe.transformer, tmp_path / "wan")
    finally:
        adacache_compile.remove(pipe)
    runtime = load(tmp_path / "wan", "onnxruntime")
    assert runtime.dtype == torch.float32 and runtime.device == torch.device("cpu")
    adacache_compile.apply(pipe, runtime=runtime)
    try:
        assert pipe.transformer is runtime
        ort_video = generate(pipe)
    finally:
        adacache_compile.remove(pipe)
    ort_stats = runtime.stats["history"]
    assert [h["computed_steps"] for h in ort_stats] == [h["computed_steps"] for h in torch_stats]
    assert {h["branch"] for h in ort_stats} == {"cond", "uncond"}, "one session per CFG branch, as in torch"
    assert float((ort_video - torch_video).abs().max()) <= 1e-4
    with pytest.raises(ValueError, match=r"runtimes were given for \['transformer', 'transformer_2'\]"):
        adacache_compile.apply(pipe, runtime={"transformer": runtime, "transformer_2": runtime})
