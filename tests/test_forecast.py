"""Forecasting the cached delta (AdaCacheConfig.forecast_order) and the forecast decision metric.

A model whose blocks add residuals that are fixed polynomials of the timestep argument has a fused delta that is
exactly that polynomial in the step (the test passes the step index as the timestep): forecasting of the matching
order must reproduce the uncached output at skipped steps, and the forecast metric must measure the forecast's error.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import build
from torch import nn

from adacache_compile import AdaCacheConfig, optimize
from adacache_compile.forecast import extrapolation_weights

NUM_STEPS = 12
STRIDE_3 = ((1e9, 3),)  # one rate: computed 1, 2, 5, 8, 11, 12 (forced 11 = N-1 and 12 = N), the rest skipped


class PolynomialBlock(nn.Module):
    def __init__(self, dim: int, degree: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.coef = nn.Parameter(torch.randn(degree + 1, dim, generator=generator, dtype=torch.float64))

    def residual(self, timestep: torch.Tensor) -> torch.Tensor:
        s = timestep.to(torch.float64).reshape(-1, 1, 1)
        return sum(self.coef[k] * s**k for k in range(self.coef.shape[0]))

    def forward(self, x, timestep):
        return x + self.residual(timestep)


class PolynomialResidualDiT(nn.Module):
    """``out(proj(x) + sum_b r_b(t))`` with ``r_b`` a polynomial of degree ``degree`` in ``t``."""

    def __init__(self, degree: int, dim: int = 8, depth: int = 2):
        super().__init__()
        self.proj = nn.Linear(dim, dim, dtype=torch.float64)
        self.blocks = nn.ModuleList(PolynomialBlock(dim, degree, seed) for seed in range(depth))
        self.out = nn.Linear(dim, dim, dtype=torch.float64)

    def forward(self, hidden_states, timestep):
        x = self.proj(hidden_states)
        for block in self.blocks:
            x = block(x, timestep)
        return (self.out(x),)


def _inputs(step: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(2, 5, 8, generator=generator, dtype=torch.float64),
        "timestep": torch.full((2,), float(step), dtype=torch.float64),
    }


def _generate(model, config, num_steps: int = NUM_STEPS):
    cached = optimize(model.eval(), config, example_inputs=_inputs(1))
    with cached.generation(num_steps):
        outputs = [cached(**_inputs(step))[0] for step in range(1, num_steps + 1)]
    return cached, outputs, cached.stats["history"][-1]


def _uncached(model, num_steps: int = NUM_STEPS):
    with torch.no_grad():
        return [model(**_inputs(step))[0] for step in range(1, num_steps + 1)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_weights_are_the_lagrange_form_of_newtons_polynomial():
    assert extrapolation_weights([5], 9, 3) == [1.0, 0.0, 0.0]
    assert extrapolation_weights([5, 2], 7, 3) == pytest.approx([5 / 3, -2 / 3, 0.0])  # D5 + (7-5) (D5-D2)/3
    assert extrapolation_weights([3, 2, 1], 4, 3) == pytest.approx([3.0, -3.0, 1.0])
    # Irregular spacing: the quadratic through (8, 64), (5, 25), (2, 4) at 10 is 100.
    weights = extrapolation_weights([8, 5, 2], 10, 3)
    assert sum(w * v for w, v in zip(weights, (64, 25, 4))) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="distinct"):
        extrapolation_weights([3, 3], 4, 2)


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_of_matching_order_reproduces_a_polynomial_delta_at_skipped_steps(order):
    model = PolynomialResidualDiT(degree=order)
    cached, outputs, history = _generate(model, AdaCacheConfig(codebook=STRIDE_3, forecast_order=order))
    want = _uncached(model)
    assert history["computed_steps"] == [1, 2, 5, 8, 11, 12]
    # Exact once order + 1 computed steps exist (before that the order falls back to what the steps allow).
    exact_from = history["computed_steps"][order]
    checked = [s for s in history["skipped_steps"] if s > exact_from]
    assert checked
    for step in checked:
        assert _rel(outputs[step - 1], want[step - 1]) < 1e-9, f"step {step}"
    # The reference (order 0) reuses the delta: wrong by the polynomial's change since the last computed step.
    _, reused, _ = _generate(model, AdaCacheConfig(codebook=STRIDE_3))
    assert all(_rel(reused[s - 1], want[s - 1]) > 1e-3 for s in checked)


def test_order_two_falls_back_to_linear_before_three_computed_steps():
    model = PolynomialResidualDiT(degree=1)
    _, outputs, history = _generate(model, AdaCacheConfig(codebook=STRIDE_3, forecast_order=2))
    want = _uncached(model)
    # Steps 3 and 4 follow computed steps 1 and 2 only: a linear forecast, exact on a linear delta.
    assert {3, 4} <= set(history["skipped_steps"])
    for step in (3, 4):
        assert _rel(outputs[step - 1], want[step - 1]) < 1e-9


def test_order_zero_is_bitwise_the_reference_skip():
    model, kwargs = build("tiny-dit", batch=2)
    config = AdaCacheConfig(codebook=((10.0, 3),))
    reference = optimize(model, config, example_inputs=kwargs)
    explicit = optimize(model, config.replace(forecast_order=0, decision_metric="change"), example_inputs=kwargs)
    assert [n.name for n in explicit.programs.skip.graph.nodes if n.op == "placeholder"] == [
        "hidden_states",
        "timestep",
        "delta_stream0",
    ]
    x = kwargs["hidden_states"]
    runs = []
    for cached in (reference, explicit):
        with cached.generation(8):
            runs.append(
                [
                    cached(hidden_states=x, timestep=torch.full((2,), 900 - 100 * i, dtype=torch.long))[0]
                    for i in range(8)
                ]
            )
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_forecast_metric_measures_the_error_of_the_tap_forecast():
    """Quadratic residuals, order 1: the linear forecast through the taps at t1 > t0 misses the tap at s by
    ``c2 * (s - t1) * (s - t0)`` per channel (c2 the tap block's quadratic coefficient), so the raw metric is
    ``|s - t1| |s - t0| sum|c2| / sum|r(s)|`` (L1 over the tap, whose rows are equal); the program takes its norms
    in float32."""
    model = PolynomialResidualDiT(degree=2)
    config = AdaCacheConfig(codebook=STRIDE_3, forecast_order=1, decision_metric="forecast")
    cached, _, history = _generate(model, config)
    tap_block = model.get_submodule(cached.plan.tap.split(":")[0])
    records = {r["step"]: r for r in history["records"]}
    computed = history["computed_steps"]
    c2 = tap_block.coef[2].detach().abs().sum().item()
    for index in range(2, len(computed)):
        s, t1, t0 = computed[index], computed[index - 1], computed[index - 2]
        r = tap_block.residual(torch.tensor([float(s)])).detach()
        expected = abs(s - t1) * abs(s - t0) * c2 / r.abs().sum().item()
        assert records[s]["raw_metric"] == pytest.approx(expected, rel=1e-6), f"step {s}"
    # The second computed step has one previous tap: order 0, i.e. the change since step 1, relative to r(2).
    r1, r2 = (tap_block.residual(torch.tensor([float(t)])).detach() for t in (1, 2))
    assert records[2]["raw_metric"] == pytest.approx(((r1 - r2).abs().sum() / r2.abs().sum()).item(), rel=1e-6)


def test_forecast_metric_is_zero_where_the_forecast_is_exact():
    model = PolynomialResidualDiT(degree=1)
    config = AdaCacheConfig(codebook=STRIDE_3, forecast_order=1, decision_metric="forecast")
    _, _, history = _generate(model, config)
    late = [r for r in history["records"] if r["step"] >= 5]
    assert late and all(abs(r["raw_metric"]) < 1e-6 for r in late)


def test_forecast_cache_memory_is_order_plus_one_deltas():
    model, kwargs = build("tiny-dit", batch=2)
    x = kwargs["hidden_states"]
    sizes = {}
    for order in (0, 1, 2):
        cached = optimize(model, AdaCacheConfig(codebook=((10.0, 3),), forecast_order=order), example_inputs=kwargs)
        session = cached.new_session(8)
        for i in range(5):  # computed 1, 2, 5: three computed steps stored at most
            cached.step(session, hidden_states=x, timestep=torch.full((2,), 900 - 100 * i, dtype=torch.long))
        stats = session.stats()
        assert stats["cached_tensors"] == order + 1 + 1  # deltas of order + 1 steps, one tap
        sizes[order] = stats["cache_bytes"]
        if order:
            assert f"forecast each delta (order {order})" in cached.plan.describe()
    delta_bytes = sizes[1] - sizes[0]
    assert delta_bytes > 0 and sizes[2] - sizes[1] == delta_bytes


def test_forecast_skip_program_runs_no_op_of_the_cached_blocks():
    model, kwargs = build("tiny-dit", batch=2)
    cached = optimize(model, AdaCacheConfig(codebook=((10.0, 3),), forecast_order=2), example_inputs=kwargs)
    programs = cached.programs
    inputs = cached.captures.latest().captured.flatten((), kwargs)
    with torch.no_grad():
        deltas = programs.decode_full(programs.full(*inputs, programs.zero_tap(inputs))).deltas
        history = [deltas, tuple(0.5 * d for d in deltas), tuple(0.25 * d for d in deltas)]
        cached_inputs = programs.skip_cached_inputs(history, [3.0, -3.0, 1.0])
        before = programs.skip(*inputs, *cached_inputs)
        region_params = [p for name in cached.plan.region for p in model.get_submodule(name).parameters()]
        saved = [p.clone() for p in region_params]
        try:
            for p in region_params:
                p.fill_(float("nan"))
            after = programs.skip(*inputs, *cached_inputs)
        finally:
            for p, value in zip(region_params, saved):
                p.copy_(value)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("metric", ["change", "forecast"])
def test_onnxruntime_runs_the_forecasting_programs_like_torch(tmp_path, metric):
    from adacache_compile import load
    from adacache_compile.export import to_onnx

    model, kwargs = build("tiny-dit", batch=2)
    config = AdaCacheConfig(codebook=((10.0, 3),), forecast_order=2, decision_metric=metric)
    cached = optimize(model, config, example_inputs=kwargs)
    to_onnx(cached, tmp_path / "export")
    runtime = load(tmp_path / "export", "onnxruntime")
    skip_inputs = [t.name for t in runtime.manifest.programs["skip"].inputs]
    assert skip_inputs[-4:] == ["delta_stream0", "delta_stream0_prev1", "delta_stream0_prev2", "forecast_weights"]
    x = kwargs["hidden_states"]
    runs = []
    for module in (cached, runtime):
        with module.generation(10):
            outputs = [
                module(hidden_states=x + 0.05 * i, timestep=torch.full((2,), 950 - 100 * i, dtype=torch.long))[0]
                for i in range(10)
            ]
        runs.append((outputs, module.stats["history"][-1]))
    (torch_out, torch_stats), (ort_out, ort_stats) = runs
    assert ort_stats["computed_steps"] == torch_stats["computed_steps"] == [1, 2, 5, 8, 9, 10]
    assert _rel(ort_out[-1], torch_out[-1]) <= 1e-4


def test_exported_runtime_switches_host_side_config_and_refuses_one_needing_other_programs(tmp_path):
    from adacache_compile import load
    from adacache_compile.errors import ArtifactError
    from adacache_compile.export import to_onnx

    model, kwargs = build("tiny-dit", batch=2)
    config = AdaCacheConfig(codebook=((10.0, 3),), forecast_order=1)
    to_onnx(optimize(model, config, example_inputs=kwargs), tmp_path / "export")
    runtime = load(tmp_path / "export", "onnxruntime")
    every_step = config.replace(codebook=((1e9, 1),), decision_metric="forecast")
    runtime.use_config(every_step)
    with runtime.generation(6):
        for i in range(6):
            runtime(hidden_states=kwargs["hidden_states"], timestep=torch.full((2,), 900 - 100 * i, dtype=torch.long))
    assert runtime.stats["history"][-1]["computed_steps"] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ArtifactError, match=r"forecast_order=1; this config needs other programs: re-export"):
        runtime.use_config(config.replace(forecast_order=2))
    assert runtime.adacache_config == every_step, "a refused config leaves the runtime as it was"
