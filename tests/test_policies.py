"""Step policies beside the AdaCache rule: their decisions on hand-made sequences, their config, and the same
decisions when the runtime runs them on a real model."""

import math

import pytest
import torch

import adacache_compile as ac
from adacache_compile.config import AdaCacheConfig, GapPolicy, InputPolicy, policy_config
from adacache_compile.policies import GapSchedule, InputChangeSchedule, next_gap
from adacache_compile.schedule import StepMetrics, make_schedule
from adacache_compile.testbed.tiny_models import TinyVideoDiT


def _run_input_policy(policy: InputPolicy, changes, num_steps: int, forced=(1, -1)):
    """Computed steps of an InputChangeSchedule fed ``changes[i]`` as the change of step i + 1."""
    schedule = make_schedule(AdaCacheConfig(policy=policy, forced_steps=forced), num_steps)
    assert isinstance(schedule, InputChangeSchedule)
    for step in range(1, num_steps + 1):
        schedule.see_input(step, changes[step - 1])
        if schedule.is_computed(step):
            schedule.observe(step, None)
        else:
            schedule.mark_skipped(step)
    return schedule


def test_input_policy_accumulates_the_change_until_the_threshold_and_starts_again_on_a_computed_step():
    # Steps 2..: changes 0.1 each. Threshold 0.25: steps 2, 3 skipped (0.1, 0.2), step 4 reaches 0.3 -> computed;
    # the sum restarts there, so 5, 6 are skipped and 7 computed again; N = 10 is forced.
    changes = [None] + [0.1] * 9
    schedule = _run_input_policy(InputPolicy(threshold=0.25, max_skips=10), changes, 10)
    assert schedule.computed_steps == [1, 4, 7, 10]
    assert schedule.skipped_steps == [2, 3, 5, 6, 8, 9]
    # The record of a computed step holds the sum that triggered it.
    assert [round(r.metric, 6) for r in schedule.records] == [0.0, 0.3, 0.3, 0.3]


def test_input_policy_uneven_changes_and_a_large_jump():
    changes = [None, 0.05, 0.4, 0.01, 0.02, 0.3, 0.01, 0.01]
    schedule = _run_input_policy(InputPolicy(threshold=0.3, max_skips=10), changes, 8, forced=(1,))
    # step 2: 0.05 skip; step 3: 0.45 computed; 4: 0.01, 5: 0.03 skip; 6: 0.33 computed; 7, 8 skip.
    assert schedule.computed_steps == [1, 3, 6]
    assert schedule.skipped_steps == [2, 4, 5, 7, 8]


def test_input_policy_caps_consecutive_skips():
    changes = [None] + [1e-4] * 11  # never reaches the threshold
    schedule = _run_input_policy(InputPolicy(threshold=0.5, max_skips=3), changes, 12, forced=(1,))
    assert schedule.computed_steps == [1, 5, 9]
    assert schedule.skipped_steps == [2, 3, 4, 6, 7, 8, 10, 11, 12]


def test_input_policy_forces_a_step_with_a_non_finite_change_and_counts_a_step_once():
    changes = [None, 0.01, float("nan"), 0.01, 0.01]
    schedule = _run_input_policy(InputPolicy(threshold=1.0, max_skips=10), changes, 5, forced=(1,))
    assert schedule.computed_steps == [1, 3]
    schedule = make_schedule(AdaCacheConfig(policy=InputPolicy(threshold=0.15)), 10)
    schedule.see_input(1, None)
    schedule.observe(1, None)
    schedule.see_input(2, 0.1)
    schedule.see_input(2, 0.1)  # asked twice for one step: counted once
    assert not schedule.is_computed(2)


def test_gap_controller_gaps_from_given_errors_clip_and_cap():
    policy = GapPolicy(tolerance=0.01, max_gap=6, first_gap=2)
    # Error at the tolerance: the gap shrinks by the safety factor only.
    assert next_gap(4.0, 0.01, 1, policy) == pytest.approx(4 * 0.9)
    # Order 1: the error grows as gap ** 2, so a 4x smaller error allows a 0.9 * 2 = 1.8x larger gap.
    assert next_gap(2.0, 0.0025, 1, policy) == pytest.approx(2 * 1.8)
    # Clipped: a tiny error grows the gap by at most 2x, a huge one shrinks it by at most 2x ...
    assert next_gap(2.0, 1e-9, 1, policy) == pytest.approx(4.0)
    assert next_gap(4.0, 10.0, 2, policy) == pytest.approx(2.0)
    # ... capped at max_gap, and never below 1.
    assert next_gap(5.0, 1e-9, 0, policy) == 6.0
    assert next_gap(1.0, 10.0, 0, policy) == 1.0


def test_gap_schedule_takes_the_gaps_its_errors_call_for():
    config = AdaCacheConfig(policy=GapPolicy(tolerance=0.01, max_gap=6, first_gap=2), forced_steps=(1, -1))
    schedule = make_schedule(config, 20)
    assert isinstance(schedule, GapSchedule)
    errors = {3: 0.0025, 15: float("inf"), 16: 1e-9}
    for step in range(1, 21):
        if not schedule.is_computed(step):
            schedule.mark_skipped(step)
            continue
        error = errors.get(step)
        schedule.observe(step, StepMetrics(1.0, 1.0, (), error, 1))
    # 1: first gap 2 -> 3: a quarter of the tolerance at order 1, gap 2 * 0.9 * 2 = 3.6 -> 7; no error at 7 and 11:
    # the gap stays 3.6 -> 11, 15; 15: a non-finite error forces 16 and restarts at gap 1; 16: a tiny error doubles
    # it (the clip) -> 18; 18 keeps 2 -> 20 = N.
    assert schedule.computed_steps == [1, 3, 7, 11, 15, 16, 18, 20]
    assert [r.rate for r in schedule.records] == [2, 4, 4, 4, 1, 2, 2, 2]
    assert [r.step for r in schedule.records if r.nonfinite] == [15]


def test_policy_config_round_trip_and_refusals(tmp_path):
    config = policy_config(GapPolicy(tolerance=0.02, max_gap=7, first_gap=3), forecast_order=1)
    assert config.codebook is None and config.policy_name == "gap" and config.forced_steps == (1, -1)
    assert AdaCacheConfig.from_json(config.to_json()) == config
    text = policy_config(InputPolicy(threshold=0.2, max_skips=5, input="hidden_states"), 2).to_json(tmp_path / "c.json")
    assert '"kind": "input"' in text
    assert AdaCacheConfig.from_json(tmp_path / "c.json").policy == InputPolicy(0.2, 5, "hidden_states")
    with pytest.raises(ValueError, match=r"AdaCacheConfig.moreg: .*policy='input' replaces"):
        AdaCacheConfig(policy=InputPolicy(0.2), moreg=ac.MoRegConfig())
    with pytest.raises(ValueError, match=r"AdaCacheConfig.codebook: expected a non-empty sequence"):
        AdaCacheConfig()
    with pytest.raises(ValueError, match=r"AdaCacheConfig.policy.kind: expected one of \['gap', 'input'\]"):
        AdaCacheConfig.from_dict({"policy": {"kind": "teacache", "threshold": 1.0}})
    with pytest.raises(ValueError, match=r"GapPolicy: expected shrink <= 1 <= grow"):
        GapPolicy(tolerance=0.1, shrink=1.5)
    with pytest.raises(ValueError, match=r"InputPolicy.max_skips: expected an int >= 1"):
        InputPolicy(threshold=0.1, max_skips=0)


# --- the runtime runs them ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyVideoDiT().eval()


def _loop(module, num_steps: int, seed: int = 0):
    """A hand-written Euler loop; returns the final latent and the latent given to the model at every step."""
    latents = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    seen = []
    with torch.no_grad():
        for i in range(num_steps):
            t = torch.tensor([1000.0 * (1 - i / num_steps)])
            seen.append(latents.clone())
            velocity = module(hidden_states=latents, timestep=t)[0]
            latents = latents - velocity / num_steps
    return latents, seen


def test_the_runtime_decides_as_the_input_policy_on_the_latents_it_was_given(model):
    num_steps = 20
    policy = InputPolicy(threshold=0.02, max_skips=3)
    cached = ac.optimize(model, policy_config(policy, forecast_order=1))
    with cached.generation(num_steps):
        _, seen = _loop(cached, num_steps)
    stats = cached.stats["history"][-1]
    changes = [None] + [float((b - a).abs().sum() / a.abs().sum()) for a, b in zip(seen[:-1], seen[1:])]
    expected = _run_input_policy(policy, changes, num_steps)
    assert stats["computed_steps"] == expected.computed_steps
    assert 3 <= len(stats["computed_steps"]) < num_steps  # it skipped, and computed more than the forced steps


def test_the_runtime_reports_the_delta_forecast_error_and_takes_the_gaps_it_calls_for(model):
    num_steps = 24
    policy = GapPolicy(tolerance=0.05, max_gap=5, first_gap=2)
    cached = ac.optimize(model, policy_config(policy, forecast_order=1))
    with cached.generation(num_steps):
        _loop(cached, num_steps)
    stats = cached.stats["history"][-1]
    records, computed = stats["records"], stats["computed_steps"]
    assert computed[:2] == [1, 3] and computed[-1] == num_steps and 4 <= len(computed) < num_steps
    assert [r["step"] for r in records] == computed
    # From the second computed step on, every record holds the forecast error the runtime measured (the forecast
    # had order 0 there, with one earlier step, then order 1), and its rate is the controller's on that error; the
    # next computed step is that rate later (or N).
    for index in range(1, len(records)):
        record, earlier = records[index], records[index - 1]
        assert record["metric"] is not None and math.isfinite(record["metric"]) and record["metric"] >= 0
        order = min(1, index - 1)
        taken = record["step"] - earlier["step"]
        assert record["rate"] == max(1, round(next_gap(float(taken), record["metric"], order, policy)))
        if index + 1 < len(records):
            assert records[index + 1]["step"] == min(record["step"] + record["rate"], num_steps)
