"""backend="inductor": a whole short generation with skipped steps matches eager, and compiles each program once.

In a file of its own because compiling the two programs takes about a minute on two shared CPU cores.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from test_runtime import (  # noqa: E402
    EXPECTED_COMPUTED,
    EXPECTED_SKIPPED,
    SKIPPING,
    in_generation,
    make_inputs,
    tiny_latte,
)

from adacache_compile import optimize  # noqa: E402

RTOL = 1e-4  # relative to the output scale: inductor reorders float32 reductions


def test_inductor_matches_eager_without_recompiles():
    model = tiny_latte()
    latents, prompt = make_inputs(0)
    eager = optimize(model, SKIPPING)
    want = in_generation(eager, latents, prompt)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = optimize(model, SKIPPING, backend="inductor")
    got = in_generation(compiled, latents, prompt)
    history = compiled.stats["history"]
    assert history[-1]["computed_steps"] == EXPECTED_COMPUTED
    assert history[-1]["skipped_steps"] == EXPECTED_SKIPPED
    for step, (g, w) in enumerate(zip(got, want), start=1):
        torch.testing.assert_close(g, w, rtol=0, atol=RTOL * w.abs().max().item(), msg=f"step {step}")
    # One graph per program (full, skip): the changing timestep and deltas of each step reuse them.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2

    # A second generation, other inputs of the same shapes: nothing recompiles.
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = in_generation(compiled, *make_inputs(1))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert len(again) == len(want)
