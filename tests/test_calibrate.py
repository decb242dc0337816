"""The calibration algorithm (adacache_compile.calibrate) on hand-made metric sequences, with worked values."""

import math

import pytest

from adacache_compile import AdaCacheConfig, MoRegConfig
from adacache_compile.calibrate import (
    RECORD_CONFIG,
    TEMPLATES,
    calibrate_config,
    codebook_from_metrics,
    metrics_from_stats,
    moreg_threshold,
    motions_from_stats,
    simulate,
)
from adacache_compile.schedule import Schedule, StepMetrics

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
