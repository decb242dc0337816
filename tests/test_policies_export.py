"""The step policies on exported programs: the manifest records the policy and its parameters, and the onnxruntime
runtime runs it — the same computed steps as the torch runtime and the same video."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

from adacache_compile import optimize  # noqa: E402
from adacache_compile.cli import build_model  # noqa: E402
from adacache_compile.config import AdaCacheConfig, GapPolicy, InputPolicy, policy_config  # noqa: E402
from adacache_compile.export import load, to_onnx  # noqa: E402

NUM_STEPS = 16
POLICIES = {
    "gap": policy_config(GapPolicy(tolerance=0.05, max_gap=4, first_gap=2), forecast_order=1),
    "input": policy_config(InputPolicy(threshold=0.25, max_skips=3), forecast_order=1),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, example = build_model("wan-tiny")
    cached = optimize(model, POLICIES["gap"], example_inputs=example)
    out_dir = tmp_path_factory.mktemp("policy") / "export"
    to_onnx(cached, out_dir)
    return cached, example, out_dir


def _generate(module, example):
    """A hand-written flow loop: the latent moves by the model's output, so the input policy sees real changes."""
    latents = example["hidden_states"]
    with module.generation(NUM_STEPS):
        for step in range(NUM_STEPS):
            # int64 timesteps, as the example the programs were exported with.
            t = torch.full((latents.shape[0],), round(1000 * (1 - step / NUM_STEPS)), dtype=torch.long)
            out = module(
                hidden_states=latents,
                timestep=t,
                encoder_hidden_states=example["encoder_hidden_states"],
                return_dict=False,
            )[0]
            latents = latents - out / NUM_STEPS
    return latents, module.stats["history"][-1]


def test_the_manifest_records_the_policy(exported):
    _, _, out_dir = exported
    manifest = json.loads((out_dir / "manifest.json").read_text())
    config = AdaCacheConfig.from_dict(manifest["config"])
    assert config == POLICIES["gap"] and manifest["config"]["policy"]["kind"] == "gap"
    assert manifest["config"]["policy"]["tolerance"] == 0.05 and manifest["config"]["codebook"] is None


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_onnxruntime_runs_the_policy_as_the_torch_runtime_does(exported, policy):
    cached, example, out_dir = exported
    runtime = load(out_dir, "onnxruntime")
    cached.use_config(POLICIES[policy])
    runtime.use_config(POLICIES[policy])  # host-side: the same exported programs (order 1) serve both policies
    expected, expected_stats = _generate(cached, example)
    actual, stats = _generate(runtime, example)
    assert stats["computed_steps"] == expected_stats["computed_steps"]
    assert stats["skipped_steps"], "the policy never skipped: the test would not exercise the skip program"
    # onnxruntime and torch order their float32 sums differently (the programs match to ~1e-6 per call); 16 steps of
    # a loop that feeds each output back stay well inside 1e-4 of the output's scale.
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= 1e-4 * max(scale, 1.0)
