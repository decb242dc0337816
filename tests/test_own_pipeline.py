"""Your own model end to end, on real diffusers pipelines built from tiny configs and saved with save_pretrained:
``adacache-compile calibrate --pipeline`` writes a config whose computed fraction on new prompts is near its target,
``inspect`` / ``export`` take the same directory, and the exported onnxruntime runtime runs inside the pipeline with
the torch cached pipeline's video (within 1e-4)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from diffusers import DiffusionPipeline, UniPCMultistepScheduler  # noqa: E402
from tiny_pipelines import tiny_cogvideox_pipeline, tiny_wan_pipeline  # noqa: E402

import adacache_compile as ac  # noqa: E402
from adacache_compile.cli import main  # noqa: E402

STEPS = 12
TARGET = 0.5
CALIBRATION_PROMPTS = ["a cat runs on the beach", "a dog on the beach"]
NEW_PROMPTS = ["the dog runs", "a cat on the low beach"]
PIPELINES = {
    "wan": (
        lambda: tiny_wan_pipeline(UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction")),
        {"height": 32, "width": 32, "num_frames": 5, "guidance_scale": 5.0, "max_sequence_length": 8},
    ),
    "cogvideox": (
        tiny_cogvideox_pipeline,
        {"height": 16, "width": 16, "num_frames": 9, "guidance_scale": 6.0, "max_sequence_length": 8},
    ),
}


def _size_flags(call: dict) -> list[str]:
    flags = ["--height", str(call["height"]), "--width", str(call["width"]), "--num-frames", str(call["num_frames"])]
    return [*flags, "--pipeline-arg", f"max_sequence_length={call['max_sequence_length']}"]


# CogVideoX's run (35 s on 2 cores) is in make test-all; make test runs Wan's.
@pytest.fixture(
    scope="module",
    params=[pytest.param(n, marks=pytest.mark.slow) if n == "cogvideox" else n for n in sorted(PIPELINES)],
)
def saved(request, tmp_path_factory):
    build, call = PIPELINES[request.param]
    path = tmp_path_factory.mktemp(request.param) / "pipeline"
    build().save_pretrained(path)
    return path, call


def _load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt: str, call: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return pipe(prompt=prompt, num_inference_steps=STEPS, generator=generator, output_type="pt", **call).frames


def test_calibrate_inspect_export_and_run_the_export_in_the_pipeline(saved, tmp_path, capsys):
    path, call = saved
    config_path = tmp_path / "cfg.json"
    calibrate = ["calibrate", "--pipeline", str(path), "--steps", str(STEPS), "--target", str(TARGET)]
    # The flow, not the search (tests/test_calibrate.py searches): 4 measured candidates instead of 12.
    calibrate += ["--max-candidates", "4", "--max-evaluations", "4"]
    prompts = [flag for prompt in CALIBRATION_PROMPTS for flag in ("--prompt", prompt)]
    guidance = ["--guidance-scale", str(call["guidance_scale"])]
    assert main([*calibrate, *prompts, *_size_flags(call), *guidance, "--no-progress", "--out", str(config_path)]) == 0
    config = ac.AdaCacheConfig.from_json(config_path)

    # Applied to new prompts, the config computes about the fraction it was calibrated for.
    pipe = _load(path)
    ac.apply(pipe, config)
    try:
        for prompt in NEW_PROMPTS:
            _generate(pipe, prompt, call)
        histories = [h for module in (pipe.transformer,) for h in module.stats["history"]]
        torch_video = _generate(pipe, NEW_PROMPTS[0], call)
        torch_steps = [h["computed_steps"] for h in pipe.transformer.stats["history"][len(histories) :]]
    finally:
        ac.remove(pipe)
    fraction = sum(len(h["computed_steps"]) for h in histories) / sum(h["steps_run"] for h in histories)
    assert abs(fraction - TARGET) <= 0.1, f"computed fraction {fraction:.3f} on new prompts, target {TARGET}"

    # inspect and export take the same directory; the export records the pipeline call it came from.
    record = ["--prompt", CALIBRATION_PROMPTS[0], *_size_flags(call)]
    assert main(["inspect", str(path), *record]) == 0
    assert "blocks: 2" in capsys.readouterr().out
    out = tmp_path / "export"
    assert main(["export", str(path), str(out), *record, "--config", str(config_path)]) == 0

    # The exported onnxruntime runtime inside the pipeline: the torch cached pipeline's schedule and video.
    runtime = ac.load(out, "onnxruntime")
    assert runtime.manifest.runtime["example_inputs"]["model"]["kind"] == "pipeline_dir"
    pipe = _load(path)
    ac.apply(pipe, runtime=runtime)
    try:
        ort_video = _generate(pipe, NEW_PROMPTS[0], call)
    finally:
        ac.remove(pipe)
    assert [h["computed_steps"] for h in runtime.stats["history"]] == torch_steps
    assert float((ort_video - torch_video).abs().max()) <= 1e-4
