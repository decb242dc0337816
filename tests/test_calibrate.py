"""The calibration algorithm (adacache_compile.calibration) on hand-made metric sequences, with worked values."""

import json
import math

import pytest
import torch

from adacache_compile import AdaCacheConfig, MoRegConfig
from adacache_compile.calibration import (
    RECORD_CONFIG,
    TEMPLATES,
    CalibrationWarning,
    calibrate_config,
    candidate_configs,
    codebook_from_metrics,
    default_tolerance,
    metric_growth,
    metrics_from_stats,
    moreg_threshold,
    motions_from_stats,
    placed_codebook,
    predict,
    recorder_config,
    select_config,
    simulate,
)
from adacache_compile.cli import main
from adacache_compile.schedule import Schedule, StepMetrics
from adacache_compile.testbed import CHECKPOINT_DIR

# Rate 3 while the per-step metric stays below 0.5, else rate 1; forced steps 1, N-1, N (the default).
TWO_RATES = AdaCacheConfig(codebook=((0.5, 3), (1e6, 1)))


def test_simulate_steady_drift():
    # 10 steps, metric 0.1 per step (steps 2..10). Step 1: no metric, rate 1. Step 2: 0.1 < 0.5, rate 3. Steps 5
    # and 8: three steps of drift 0.3 over rate 3 = 0.1, rate 3 again. Steps 9 and 10 are forced.
    assert simulate(TWO_RATES, [0.1] * 9, 10) == [1, 2, 5, 8, 9, 10]


def test_simulate_a_burst_of_change_computes_every_step_of_it():
    # Steps 5, 6 and 7 change by 2.0 each. Step 5 sees 0.1 + 0.1 + 2.0 over rate 3 = 0.73 >= 0.5: rate 1, so 6 and 7
    # are computed too (2.0 each); step 8 sees 0.1: rate 3 again, cut short by the forced 9 and 10.
    series = [0.1, 0.1, 0.1, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1]
    assert simulate(TWO_RATES, series, 10) == [1, 2, 5, 6, 7, 8, 9, 10]


def test_simulate_ignores_moreg_and_matches_the_schedule_fed_the_same_metrics():
    series = [0.1, 0.1, 0.1, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1]
    with_moreg = TWO_RATES.replace(moreg=MoRegConfig(window=(1, 1.0)))
    assert simulate(with_moreg, series, 10) == simulate(TWO_RATES, series, 10)
    # The schedule itself, given each computed step's drift since the last computed one, takes the same steps.
    schedule = Schedule(TWO_RATES, 10)
    for step in range(1, 11):
        if not schedule.is_computed(step):
            schedule.mark_skipped(step)
            continue
        drift = sum(series[schedule.last_computed - 1 : step - 1])
        schedule.observe(step, StepMetrics(drift, 1.0) if schedule.last_computed else None)
    assert schedule.computed_steps == simulate(TWO_RATES, series, 10)


def test_codebook_from_metrics_places_thresholds_at_template_quantiles():
    metrics = [0.1 * k for k in range(1, 12)]  # 0.1 .. 1.1: quantile q sits at position 10 q
    codebook = codebook_from_metrics(metrics, "fast")
    # fast: quantiles 0.30, 0.45, 0.60, 0.75, 0.90 -> 0.4, 0.55 (between 0.5 and 0.6), 0.7, 0.85, 1.0; then rate 1.
    assert [rate for _, rate in codebook] == [6, 5, 4, 3, 2, 1]
    assert [t for t, _ in codebook[:-1]] == pytest.approx([0.4, 0.55, 0.7, 0.85, 1.0])
    assert codebook[-1][0] == 1e6
    slow = codebook_from_metrics(metrics, "slow")  # quantiles 0.30 and 0.60
    assert [rate for _, rate in slow] == [3, 2, 1]
    assert [t for t, _ in slow[:-1]] == pytest.approx([0.4, 0.7])
    # Non-finite metrics are left out: the same codebook.
    assert codebook_from_metrics([*metrics, math.inf, math.nan], "fast") == codebook


def test_codebook_from_metrics_is_monotone():
    metrics = [0.3, 0.05, 0.2, 0.12, 0.08, 0.5, 0.02]
    for template in TEMPLATES:
        codebook = codebook_from_metrics(metrics, template)
        thresholds, rates = zip(*codebook)
        assert list(thresholds) == sorted(set(thresholds)), codebook  # strictly ascending
        assert list(rates) == sorted(rates, reverse=True) and rates[-1] == 1, codebook
        # A larger scale gives larger thresholds (the open end aside), hence higher rates for the same metric.
        scaled = codebook_from_metrics(metrics, template, scale=2.0)
        assert [t for t, _ in scaled[:-1]] == pytest.approx([2 * t for t in thresholds[:-1]])
    # Equal metrics (every quantile the same) still give a valid, strictly ascending codebook.
    flat = codebook_from_metrics([0.1] * 5, "fast")
    assert AdaCacheConfig(codebook=flat).codebook == flat
    assert all(a[0] < b[0] for a, b in zip(flat, flat[1:]))


def test_codebook_from_metrics_refuses_too_few_metrics_and_unknown_templates():
    with pytest.raises(ValueError, match="at least 3"):
        codebook_from_metrics([0.1, math.nan, 0.2, math.inf], "fast")
    with pytest.raises(ValueError, match="calibration target 'medium'"):
        codebook_from_metrics([0.1, 0.2, 0.3], "medium")


def test_calibrate_config_with_a_template_name_is_the_pooled_codebook():
    runs = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]]
    base = AdaCacheConfig(codebook=((1.0, 1),), forced_steps=(1, -1))
    config = calibrate_config(runs, 8, "slow", base=base)
    assert config.codebook == codebook_from_metrics([m for run in runs for m in run], "slow")
    assert [t for t, _ in config.codebook[:-1]] == pytest.approx([0.4, 0.7])
    assert config.forced_steps == (1, -1)  # everything but the codebook comes from base


def test_calibrate_config_hits_its_target_compute_fraction():
    # A steady drift of 0.1 per step over 20 steps, slow template (rates 3, 2, 1): every computed step sees metric
    # 0.1, so a scale above 1 gives rate 3 (steps 1 2 5 8 11 14 17 + forced 19 20: 9 of 20 = 0.45), a scale just
    # at 1 rate 2 (12 of 20 = 0.6), below it rate 1 (all 20). The closest fraction not above 0.5 is 0.45.
    runs = [[0.1] * 19]
    config = calibrate_config(runs, 20, 0.5, template="slow")
    assert simulate(config, runs[0], 20) == [1, 2, 5, 8, 11, 14, 17, 19, 20]
    # 0.6 is reached exactly, by the narrow band of scales that gives rate 2: 1 2 4 .. 18 + forced 19 20.
    config = calibrate_config(runs, 20, 0.6, template="slow")
    assert simulate(config, runs[0], 20) == [1, 2, *range(4, 19, 2), 19, 20]
    everything = calibrate_config(runs, 20, 1.0, template="slow")
    assert simulate(everything, runs[0], 20) == list(range(1, 21))
    with pytest.raises(ValueError, match="target compute fraction"):
        calibrate_config(runs, 20, 1.5)


def test_calibrate_config_fraction_follows_the_target_on_decaying_metrics():
    # Metrics that fall over the generation, as on a trained model: the fraction lands at or just below the target
    # and grows with it.
    num_steps = 50
    runs = [[0.4 * 0.93**k * (1 + 0.1 * r) for k in range(num_steps - 1)] for r in range(3)]

    def fraction(config):
        return sum(len(simulate(config, run, num_steps)) for run in runs) / (len(runs) * num_steps)

    reached = {target: fraction(calibrate_config(runs, num_steps, target)) for target in (0.25, 0.4, 0.6)}
    for target, value in reached.items():
        assert target - 0.02 <= value <= target, reached
    assert reached[0.25] < reached[0.4] < reached[0.6]


def test_moreg_threshold_is_the_median_motion_inside_the_window():
    motions = [
        [(1, 0.5), (2, 0.1), (3, 0.3), (5, 0.2), (9, 0.9)],
        [(2, math.nan), (4, 0.4)],
    ]
    # Inside steps 2..5 (inclusive), finite: 0.1, 0.3, 0.2, 0.4 -> median 0.25.
    assert moreg_threshold(motions, (2, 5)) == pytest.approx(0.25)
    assert moreg_threshold(motions, (1, 1)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no recorded motion"):
        moreg_threshold(motions, (6, 8))


def test_metrics_and_motions_from_stats_read_a_recorded_generation():
    history = {
        "records": [
            {"step": 1, "raw_metric": None, "motion": None},
            {"step": 2, "raw_metric": 0.25, "motion": 0.3},
            {"step": 3, "raw_metric": 0.125, "motion": None},
        ]
    }
    assert metrics_from_stats(history) == [0.25, 0.125]
    assert motions_from_stats(history) == [(2, 0.3)]


def test_record_config_computes_every_step_and_measures_motion_throughout():
    schedule = Schedule(RECORD_CONFIG, 30)
    assert RECORD_CONFIG.moreg.window_for(30) == (1, 30)
    for step in range(1, 31):
        assert schedule.is_computed(step)
        schedule.observe(step, StepMetrics(1e6, 1.0, ((1.0, 2.0),) * len(RECORD_CONFIG.moreg.strides)))
    assert schedule.computed_steps == list(range(1, 31))


# --- measured selection (select_config) --------------------------------------------------------------------------


def test_recorder_config_records_the_metric_the_target_acts_on():
    target = AdaCacheConfig(
        codebook=((0.1, 3), (1e6, 1)), forecast_order=2, decision_metric="forecast", tap=1, norm_ord=2, region=(0, 2)
    )
    record = recorder_config(target)
    assert record.codebook == ((1e12, 1),)  # rate 1 whatever the metric: every step computed and recorded
    assert (record.forecast_order, record.decision_metric, record.tap, record.norm_ord, record.region) == (
        2,
        "forecast",
        1,
        2,
        (0, 2),
    )
    assert record.moreg.window == (1, 1.0)
    # Without a target: the reference metric, the RECORD_CONFIG of before.
    assert recorder_config() == RECORD_CONFIG
    assert RECORD_CONFIG == AdaCacheConfig(codebook=((1e12, 1),), moreg=MoRegConfig(window=(1, 1.0)))


def test_simulate_with_a_growth_exponent_and_the_default_growth():
    # Every config is simulated with growth 1 (the sum of the per-step metrics; measured on the testbed, see
    # metric_growth), the forecast metric too; other exponents can be asked for.
    linear = TWO_RATES.replace(forecast_order=1, decision_metric="forecast")
    assert metric_growth(TWO_RATES) == metric_growth(linear) == 1
    # 10 steps, per-step metric 0.2. Growth 1: step 2 sees 0.2 -> rate 3; step 5 sees 0.6 / 3 = 0.2 -> rate 3; step
    # 8 likewise; 9, 10 forced. Growth 2: step 5 sees 0.6 * 3 (spacing 3) / 3 = 0.6 >= 0.5 -> rate 1; step 6 sees
    # 0.2 -> rate 3; step 9 (forced) 0.6 again; 10 forced. Growth 3: 0.6 * 9 / 3 = 1.8 on step 5, the same.
    series = [0.2] * 9
    assert simulate(TWO_RATES, series, 10) == simulate(linear, series, 10) == [1, 2, 5, 8, 9, 10]
    assert simulate(linear, series, 10, growth=2) == [1, 2, 5, 6, 9, 10]
    assert simulate(linear, series, 10, growth=3) == [1, 2, 5, 6, 9, 10]
    # The error proxy sums what each skipped step would have shown: skips 3 4 6 7: 0.2 + 0.4 + 0.2 + 0.4.
    assert predict(TWO_RATES, [series], 10) == pytest.approx((0.6, 1.2))
    assert predict(linear, [series, [0.1] * 9], 10) == pytest.approx((0.6, 0.9))  # mean of 1.2 and 0.6


def test_placed_codebook_scales_or_shifts_the_quantiles():
    metrics = [0.1 * k for k in range(1, 12)]  # quantile q at 0.1 + q
    scaled = placed_codebook(metrics, (0.3, 0.6), (3, 2), "scale", 2.0)
    assert [t for t, _ in scaled[:-1]] == pytest.approx([0.8, 1.4]) and [r for _, r in scaled] == [3, 2, 1]
    unshifted = placed_codebook(metrics, (0.3, 0.6), (3, 2), "shift", 0.0)
    assert [t for t, _ in unshifted[:-1]] == pytest.approx([0.4, 0.7]) and [r for _, r in unshifted] == [3, 2, 1]
    # A logit shift of ln 3 moves quantile 1/4 to 1/2 and 1/2 to 3/4: thresholds 0.6 and 0.85.
    shifted = placed_codebook(metrics, (0.25, 0.5), (4, 2), "shift", math.log(3))
    assert [t for t, _ in shifted[:-1]] == pytest.approx([0.6, 0.85])
    with pytest.raises(ValueError, match="family 'stretch'"):
        placed_codebook(metrics, (0.5,), (2,), "stretch", 1.0)


# Two steady runs over 20 steps: per-step metric 0.125 (A) and 0.375 (B). Every computed step of a run sees its own
# constant, so each run keeps one rate r from step 2: computed 1, 2, 2 + r, ... <= 18, then the forced 19 and 20 —
# r = 1: 20 steps, 2: 12, 3: 9, 4: 8, 5: 7, 6: 6. Pooled quantiles lie between 0.125 and 0.375.
STEADY = [[0.125] * 19, [0.375] * 19]


def test_candidates_predicted_fractions_on_steady_runs():
    candidates = {c.name: c for c in candidate_configs(STEADY, 20, 0.44)}
    # One threshold placed by quantile can never exceed the largest metric 0.375: B stays at rate 1; best for 0.44 is
    # A at rate 3: (9 + 20) / 40.
    assert candidates["shift:3"].predicted_fraction == pytest.approx(0.725)
    # Scaled thresholds can pass 0.375: both runs at rate 3, 9 / 20.
    assert candidates["scale:slow"].predicted_fraction == pytest.approx(0.45)
    # Rates 4, 2: both at 4 (0.40, 0.04 off) beats A 4 / B 2 ((8 + 12) / 40 = 0.50, 0.06 off).
    assert candidates["scale:4-2"].predicted_fraction == pytest.approx(0.4)
    # Shifted 6-4-2: A at rate 6, B at rate 2: (6 + 12) / 40.
    assert candidates["shift:6-4-2"].predicted_fraction == pytest.approx(0.45)
    # The fast template is the evenly spaced 6-5-4-3-2 ladder: one candidate per family, not two.
    assert "scale:6-5-4-3-2" not in candidates and "scale:fast" in candidates
    for c in candidates.values():
        assert c.solved_for == 0.44
        assert c.predicted_fraction == pytest.approx(predict(c.config, STEADY, 20)[0])


def squared_drift(config, bias=0.0):
    """A fake but honest evaluation: error = mean over the runs of the sum, over skipped steps, of the squared drift
    since the last computed step; fraction = simulated fraction + bias."""
    errors, fractions = [], []
    for run in STEADY:
        computed = simulate(config, run, 20)
        errors.append(
            sum((run[0] * (s - max(c for c in computed if c < s))) ** 2 for s in range(1, 21) if s not in computed)
        )
        fractions.append(len(computed) / 20)
    return sum(errors) / len(errors), sum(fractions) / len(fractions) + bias


def test_select_config_picks_the_least_measured_error_within_the_tolerance():
    calls = []

    def evaluate(config):
        calls.append(config)
        return squared_drift(config)

    result = select_config(STEADY, 20, 0.44, evaluate)
    assert result.tolerance == default_tolerance(20) == 0.025
    # Within 0.44 +- 0.025: scale:slow (A and B at rate 3): A 5 gaps of drift 0.125, 0.25 and a skip of 0.125 before
    # the forced 19 -> 5 * 0.078125 + 0.015625 = 0.40625, B 9 times that; mean 2.03125. shift:6-4-2 (A rate 6, B
    # rate 2): A 2 * 55 / 64 + 30 / 64 = 2.1875, B 8 * 0.140625 = 1.125; mean 1.65625 — the winner. shift:fast (A
    # rate 5, B rate 2) has less error, 1.2734375, but computes 0.475: outside, not chosen.
    assert result.winner.name == "shift:6-4-2"
    assert result.winner.error == pytest.approx(1.65625) and result.winner.measured_fraction == pytest.approx(0.45)
    measured = {c.name: c for c in result.candidates if c.error is not None}
    assert measured["scale:slow"].error == pytest.approx(2.03125)
    assert measured["shift:fast"].error == pytest.approx(1.2734375)
    assert measured["shift:fast"].measured_fraction == pytest.approx(0.475)
    # Ranked by the predicted proxy, the first five measured: shift:fast, scale:slow, shift:6-4-2, scale:4-3 (one of
    # the five with its simulated schedules; shift:4-3, 4-3-2, 5-4-3 take the same and are not measured), scale:fast.
    names = [c.name for c in result.candidates if c.error is not None]
    assert names == ["shift:fast", "scale:slow", "shift:6-4-2", "scale:4-3", "scale:fast", "scale:fast"]
    # The refinement: scale:fast measured 0.40 (no bias here, 0.04 short), so it is re-solved for 0.48, which gives A
    # rate 5 / B rate 2 (both runs like shift:fast's B): 0.50 with error 1.0 — less than the winner's, but outside.
    refined = [c for c in result.candidates if c.name == "scale:fast" and c.error is not None][-1]
    assert refined.solved_for == pytest.approx(0.48) and refined.measured_fraction == pytest.approx(0.5)
    assert refined.error == pytest.approx(1.0)
    # Then its points bracket 0.44, but interpolating gives back a codebook already measured: nothing new to measure.
    assert len(calls) == result.evaluations == 6
    assert result.to_dict()["winner"] == "shift:6-4-2"


def test_select_config_corrects_for_the_measured_bias_of_the_simulation():
    # The real schedule computes 0.05 less than the simulation predicts: after the first measurement the candidates
    # are re-solved for 0.44 + 0.05, and every winner measured lands within the tolerance.
    result = select_config(STEADY, 20, 0.44, lambda config: squared_drift(config, bias=-0.05))
    measured = [c for c in result.candidates if c.error is not None]
    assert measured[0].solved_for == 0.44
    assert [c.solved_for for c in measured[1:5]] == pytest.approx([0.49] * 4)  # the rest of the first five
    # Refinement: scale:slow measured 0.475 when solved for 0.49 (0.035 over): re-solved for 0.455, it measures 0.40.
    assert (measured[5].name, measured[5].solved_for) == ("scale:slow", pytest.approx(0.455))
    assert measured[5].measured_fraction == pytest.approx(0.40)
    for c in measured:
        assert c.measured_fraction == pytest.approx(c.predicted_fraction - 0.05)
    assert abs(result.winner.measured_fraction - 0.44) <= 0.025
    admitted = [c for c in measured if abs(c.measured_fraction - 0.44) <= 0.025]
    assert result.winner.error == min(c.error for c in admitted)


def test_a_target_no_candidate_lands_on_gives_the_nearest_measured_config_with_a_warning():
    # Every evaluation measures 0.6 and 0.9 alternately: nothing lands within 0.44 +- 0.025.
    measured = []

    def evaluate(config):
        measured.append(config)
        return float(len(measured)), 0.6 if len(measured) % 2 else 0.9

    with pytest.warns(
        CalibrationWarning, match=r"no candidate computed 0.440 \+- 0.025 of the steps .* chose the nearest"
    ):
        result = select_config(STEADY, 20, 0.44, evaluate)
    assert not result.landed and result.achieved_fraction == 0.6
    # Nearest to the target, then least error: the first measured at 0.6.
    assert result.config == measured[0] and result.winner.error == 1.0
    report = result.to_dict()
    assert report["landed"] is False and report["achieved_fraction"] == 0.6
    # A given config (e.g. a shipped preset) is measured too, and wins when it is the best within the tolerance.
    given = AdaCacheConfig(codebook=((10.0, 3), (1e6, 1)))  # both runs at rate 3: 0.45
    result = select_config(
        STEADY, 20, 0.44, lambda config: (-1.0 if config == given else 5.0, 0.45), extra={"g": given}
    )
    assert result.winner.name == "g" and result.config == given and result.landed
    with pytest.raises(ValueError, match="target compute fraction"):
        select_config(STEADY, 20, 0.0, squared_drift)


# --- the testbed: a small real run ---------------------------------------------------------------------------------

needs_checkpoint = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="testbed checkpoint not shipped in this tree"
)


@needs_checkpoint
def test_the_cli_records_the_testbed_once_and_searches_each_target_by_measurement(tmp_path, capsys):
    out = tmp_path / "calibration.json"
    argv = ["calibrate", "--steps", "8", "--videos", "2", "--target", "0.6", "0.8", "--max-evaluations", "4"]
    # Two of the three forecast orders (each order is a capture of its own programs): the search over orders, cheaper.
    argv += ["--forecast-order", "0", "1"]
    assert main([*argv, "--max-candidates", "3", "--no-progress", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["testbed"] == "latte-shapes" and report["num_steps"] == 8
    # One recording for both targets: per video the AdaCache metric of steps 2..8 and the input change of steps 1..8.
    assert [len(r["metrics"]) for r in report["recorded"]] == [7, 7]
    assert [len(r["input_changes"]) for r in report["recorded"]] == [8, 8]
    assert all(r["input_changes"][0] is None and r["input_changes"][1] > 0 for r in report["recorded"])
    for target in ("0.6", "0.8"):
        result = report["targets"][target]
        measured = [c for c in result["candidates"] if c["error"] is not None]
        assert 1 <= len(measured) <= 4 and result["evaluations"] <= 4
        # The winner is the least measured error within the tolerance (0.5 / 8), or, when none landed, the nearest.
        admitted = [c for c in measured if abs(c["measured_fraction"] - float(target)) <= 0.0625]
        if result["landed"]:
            assert result["error"] == min(c["error"] for c in admitted)
        else:
            assert not admitted
        assert result["psnr"] == pytest.approx(-result["error"]) and result["psnr"] > 10
        assert result["cost"]["uncached_generations"] == 2
        assert result["cost"]["cached_generations"] == 2 * len(
            {
                json.dumps(c["policy"]) + str(c["codebook"]) + str(c["forced_steps"]) + str(c["forecast_order"])
                for c in measured
            }
        )
        AdaCacheConfig.from_dict(result["config"])
    assert "[latte-shapes] 0.6:" in capsys.readouterr().out


def test_refinement_interpolates_or_steps_towards_the_measured_target():
    from adacache_compile.calibration import Candidate, _next_solve_for

    def point(solved_for, measured):
        return Candidate("f", TWO_RATES, 0.0, 0.0, "scale", solved_for=solved_for, measured_fraction=measured)

    # Bracketing points: linear interpolation, 0.30 + 0.75 * 0.04.
    assert _next_solve_for([point(0.30, 0.25), point(0.34, 0.29)], 0.28) == pytest.approx(0.33)
    # One point: its bias removed, 0.30 + (0.28 - 0.25).
    assert _next_solve_for([point(0.30, 0.25)], 0.28) == pytest.approx(0.33)
    # Two points on one side, slope 1: a secant step 0.32 + 0.04.
    assert _next_solve_for([point(0.30, 0.22), point(0.32, 0.24)], 0.28) == pytest.approx(0.36)
    # A secant gain of 100 (the measured fraction hardly moved) is not trusted: the bias step, 0.40 + 0.029.
    assert _next_solve_for([point(0.30, 0.25), point(0.40, 0.251)], 0.28) == pytest.approx(0.429)


def test_a_preset_target_is_its_shipped_compute_and_its_codebook_in_the_combinations_start_and_end():
    from adacache_compile.calibration import base_config
    from adacache_compile.config import FORECAST_FORCED_STEPS
    from adacache_compile.testbed.calibrate import preset_target

    measured = []

    def evaluator(config):  # the calibration's evaluator interface: (error, measured fraction, info)
        measured.append(config)
        return 0.0, 0.25, {}

    shipped = AdaCacheConfig.preset("fast-50")
    fraction, extra = preset_target("fast-50", base_config(2, "change"), evaluator)
    # The target is the compute of the preset as users run it (order 0, the reference's start and end) ...
    assert measured == [shipped] and fraction == 0.25
    # ... and its codebook competes with the forecasting candidates' start and end, not the reference's.
    (candidate,) = extra.values()
    assert list(extra) == ["preset:fast-50"]
    assert candidate.codebook == shipped.codebook and candidate.forecast_order == 2
    assert candidate.first_rate == "top" and candidate.forced_steps == FORECAST_FORCED_STEPS
    assert shipped.first_rate == 1 and shipped.forced_steps != FORECAST_FORCED_STEPS
    # Order 0: the preset itself.
    _, extra = preset_target("fast-50", base_config(0), evaluator)
    assert list(extra.values()) == [shipped]


# --- the joint search on a model whose best forecast order is known ------------------------------------------------


class TimeOnlyBlock(torch.nn.Module):
    """Adds a residual that depends only on the timestep features: (slope, wiggle) columns of one projection."""

    def __init__(self, dim: int, wiggle: float):
        super().__init__()
        self.proj = torch.nn.Linear(2, dim, bias=False)
        with torch.no_grad():
            self.proj.weight[:, 1] *= wiggle

    def forward(self, x, features):
        return x + self.proj(features).unsqueeze(1)


class TimeOnlyDiT(torch.nn.Module):
    """Its fused delta is linear in the timestep plus a small fast wiggle: a linear forecast (order 1) is exact but
    for the wiggle, holding the delta (order 0) misses the slope, and a quadratic one (order 2) amplifies the wiggle
    more (weights 3, -3, 1 against 2, -1). The deltas do not depend on the latent, so caching cannot change them."""

    def __init__(self, dim: int = 16, depth: int = 4, wiggle: float = 0.01, frequency: float = 2 * math.pi * 7.3):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(4, dim)
        self.blocks = torch.nn.ModuleList(TimeOnlyBlock(dim, wiggle) for _ in range(depth))
        self.out = torch.nn.Linear(dim, 4)
        self.frequency = frequency

    def forward(self, hidden_states, timestep):
        s = timestep.float().reshape(-1, 1) / 1000
        features = torch.cat([s, torch.sin(self.frequency * s)], dim=1)
        x = self.inp(hidden_states)
        for block in self.blocks:
            x = block(x, features)
        return (self.out(x),)


SEARCH_STEPS = 20


def _euler(module, index: int) -> torch.Tensor:
    x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(index))
    for k in range(SEARCH_STEPS):
        x = x - module(hidden_states=x, timestep=torch.tensor([1000.0 * (1 - k / SEARCH_STEPS)]))[0] / SEARCH_STEPS
    return x


@pytest.fixture(scope="module")
def time_only():
    import adacache_compile as ac
    from adacache_compile.calibration import base_config

    cached = ac.optimize(TimeOnlyDiT().eval(), base_config(0))
    return cached


def test_the_default_calibration_picks_the_forecast_order_that_is_best(time_only):
    import adacache_compile as ac

    cached = time_only
    result = ac.calibrate_loop(
        cached, lambda i: _euler(cached, i), 2, num_steps=SEARCH_STEPS, target=0.35, report=True, progress=False
    )
    assert result.landed and abs(result.achieved_fraction - 0.35) <= result.tolerance
    assert result.config.forecast_order == 1
    measured = [c for c in result.candidates if c.error is not None]
    # It measured every order and more than one kind, and order 1 won on measurement, not by default.
    assert {c.config.forecast_order for c in measured} == {0, 1, 2}
    assert len({c.group[0] for c in measured}) >= 2
    best = {order: min(c.error for c in measured if c.config.forecast_order == order) for order in (0, 1, 2)}
    assert best[1] < best[2] < best[0]
    # What it cost: the recording (2 uncached generations) and 2 cached ones per config it measured.
    configs = len({c.config.to_json() for c in measured})
    assert result.cost["uncached_generations"] == 2
    assert result.cost["cached_generations"] == result.cost["new_cached_generations"] == 2 * configs


def test_a_simulated_gap_schedule_is_the_one_the_runtime_takes_when_the_deltas_are_as_recorded(time_only):
    from adacache_compile.calibration import RunPredictor, base_config, recorded_runs, recorder_config
    from adacache_compile.config import GapPolicy, policy_config

    cached = time_only
    cached.use_config(recorder_config(base_config(0), record_motion=False))
    start = cached.generations_finished
    with cached.recording(256) as recordings:
        with cached.generation(SEARCH_STEPS):
            _euler(cached, 0)
    runs = recorded_runs(cached.history_since(start), recordings)
    assert len(runs) == 1 and runs[0].deltas.shape[0] == SEARCH_STEPS and runs[0].changes[0] is None
    config = policy_config(GapPolicy(tolerance=0.02, max_gap=6, first_gap=2), forecast_order=1)
    (simulated,) = RunPredictor(runs, SEARCH_STEPS).schedules(config)
    cached.use_config(config)
    with cached.generation(SEARCH_STEPS):
        _euler(cached, 0)
    assert list(simulated) == cached.stats["history"][-1]["computed_steps"]
    assert 3 < len(simulated) < SEARCH_STEPS
