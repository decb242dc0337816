"""The host-side AdaCache rule against hand-worked expectations (docs/algorithm.md, "The schedule" and "MoReg").

Metric taps are small explicit vectors laid out frame-major; the tests compute the norms themselves and feed the
Schedule the same scalars the full program would return. Expected computed steps, rates and MoReg factors below were
worked out by hand from the rule, one computed step per comment line:
    c = ||r_prev - r||_1 / ||r_prev||_1 / rate_in_force   (rate_in_force = the rate decided on the previous computed step)
    MoReg: m' = (m / 0.385) ** 8 inside the window, else 1; g = 10 * (m' - m_prev) / rate_in_force; factor = m' + |g|
Useful exact values: (0.5)**8 = 1/256 = 0.00390625 (m = 0.1925), 1.25**8 = 5.9604644775390625 (m = 0.48125).
"""

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adacache_compile.config import AdaCacheConfig, MoRegConfig
from adacache_compile.schedule import Schedule, StepMetrics

M_CALM = 0.5**8  # m' for m = 0.1925
M_HIGH = 1.25**8  # m' for m = 0.48125


def tap_metrics(prev, tap, frames, strides):
    """The scalars the full program returns for metric tap `tap` ([frames * tokens] values, frame-major)."""
    tap = np.asarray(tap, dtype=np.float64)
    per_frame = tap.reshape(frames, -1)
    motion = tuple(
        (
            float(np.abs(per_frame[k:] - per_frame[:-k]).sum()),
            float(np.abs(per_frame[k:]).sum() + np.abs(per_frame[:-k]).sum()),
        )
        for k in strides
    )
    if prev is None:
        return StepMetrics(diff_norm=float("nan"), prev_norm=float("nan"), motion=motion)
    prev = np.asarray(prev, dtype=np.float64)
    return StepMetrics(float(np.abs(prev - tap).sum()), float(np.abs(prev).sum()), motion)


def run(config, num_steps, taps, frames=2):
    """Drive a Schedule over one generation, handing the k-th computed step the k-th tap."""
    schedule = Schedule(config, num_steps)
    strides = config.moreg.strides if config.moreg is not None else ()
    remaining = iter(taps)
    prev = None
    for step in range(1, num_steps + 1):
        if schedule.is_computed(step):
            tap = next(remaining)
            schedule.observe(step, tap_metrics(prev, tap, frames, strides))
            prev = tap
        else:
            schedule.mark_skipped(step)
    assert next(remaining, None) is None, "scripted more taps than computed steps"
    assert sorted(schedule.computed_steps + schedule.skipped_steps) == list(range(1, num_steps + 1))
    return schedule


def scaled_taps(base, changes):
    """Taps x_k * base with x_0 = 1 and x_k = x_{k-1} * (1 + d_k): the raw metric of tap k is exactly |d_k|."""
    taps, scale = [list(base)], 1.0
    for change in changes:
        scale *= 1 + change
        taps.append([scale * value for value in base])
    return taps


def grown(tap, factor):
    return [factor * value for value in tap]


def assert_schedule(schedule, computed, rates, factors=None, motions=None):
    assert schedule.computed_steps == computed
    assert [record.step for record in schedule.records] == computed
    assert [record.rate for record in schedule.records] == rates
    if factors is not None:
        assert [record.moreg_factor for record in schedule.records] == [
            None if f is None else pytest.approx(f, rel=1e-9) for f in factors
        ]
    if motions is not None:
        assert [record.motion for record in schedule.records] == [
            None if m is None else pytest.approx(m, rel=1e-9) for m in motions
        ]
    assert not any(record.nonfinite for record in schedule.records)


BASE = [1.0, -2.0, 3.0, 0.5]  # two frames of two tokens


def test_reference_100_without_moreg():
    # codebook c < .03 -> 12, < .05 -> 10, < .07 -> 8, < .09 -> 6, < .11 -> 4, else 3; forced 1, 99, 100
    changes = [0.2, 0.3, 0.32, 0.36, 0.32, 0.2, 0.12, -6.0, 0.06, 0.54, 0.1, 0.12, 0.12, 0.12]
    # step 1: first computed step, rate 1                       -> next 2
    # step 2: c = .2 / 1 = .2                 -> 3               -> next 5
    # step 5: c = .3 / 3 = .1                 -> 4               -> next 9
    # step 9: c = .32 / 4 = .08               -> 6               -> next 15
    # step 15: c = .36 / 6 = .06              -> 8               -> next 23
    # step 23: c = .32 / 8 = .04              -> 10              -> next 33
    # step 33: c = .2 / 10 = .02              -> 12              -> next 45
    # step 45: c = .12 / 12 = .01             -> 12              -> next 57
    # step 57: c = |-6| / 12 = .5 (tap flips sign) -> 3          -> next 60
    # step 60: c = .06 / 3 = .02              -> 12              -> next 72
    # step 72: c = .54 / 12 = .045            -> 10              -> next 82
    # step 82: c = .1 / 10 = .01              -> 12              -> next 94
    # step 94: c = .12 / 12 = .01             -> 12              -> next 106 > N
    # step 99 (forced): c = .12 / 12 = .01    -> 12
    # step 100 (forced): c = .12 / 12 = .01   -> 12
    schedule = run(AdaCacheConfig.preset("reference-100"), 100, scaled_taps(BASE, changes))
    assert_schedule(
        schedule,
        computed=[1, 2, 5, 9, 15, 23, 33, 45, 57, 60, 72, 82, 94, 99, 100],
        rates=[1, 3, 4, 6, 8, 10, 12, 12, 3, 12, 10, 12, 12, 12, 12],
        factors=[None] * 15,
    )
    assert [record.metric for record in schedule.records] == [None] + [
        pytest.approx(c, rel=1e-9)
        for c in [0.2, 0.1, 0.08, 0.06, 0.04, 0.02, 0.01, 0.5, 0.02, 0.045, 0.01, 0.01, 0.01, 0.01]
    ]
    assert schedule.records[8].raw_metric == pytest.approx(6.0)


def test_fast_30_without_moreg():
    # codebook c < .08 -> 6, < .16 -> 5, < .24 -> 4, < .32 -> 3, < .40 -> 2, else 1; forced 1, 29, 30
    changes = [0.5, 0.35, 0.56, 0.6, 0.48, -0.25, 0.3, 1.2, 0.2]
    # step 1: first, rate 1                        -> next 2
    # step 2: c = .5 / 1 = .5        -> 1          -> next 3
    # step 3: c = .35 / 1 = .35      -> 2          -> next 5
    # step 5: c = .56 / 2 = .28      -> 3          -> next 8
    # step 8: c = .6 / 3 = .2        -> 4          -> next 12
    # step 12: c = .48 / 4 = .12     -> 5          -> next 17
    # step 17: c = .25 / 5 = .05     -> 6          -> next 23
    # step 23: c = .3 / 6 = .05      -> 6          -> next 29
    # step 29 (due and forced): c = 1.2 / 6 = .2 -> 4
    # step 30 (forced, gap 1 but rate in force 4): c = .2 / 4 = .05 -> 6
    schedule = run(AdaCacheConfig.preset("fast-30"), 30, scaled_taps(BASE, changes))
    assert_schedule(
        schedule,
        computed=[1, 2, 3, 5, 8, 12, 17, 23, 29, 30],
        rates=[1, 1, 2, 3, 4, 5, 6, 6, 4, 6],
    )


def test_slow_30_without_moreg():
    # codebook c < .08 -> 3, < .16 -> 2, else 1; forced 1, 29, 30
    changes = [0.05, 0.3, 0.5, 0.12, -0.1, 0.15, 0.6, 0.01, 0.03, 0.03, 0.36, 0.1, 0.03, 0.9]
    # step 1: first, rate 1                    -> next 2
    # step 2: c = .05 / 1 = .05   -> 3         -> next 5
    # step 5: c = .3 / 3 = .1     -> 2         -> next 7
    # step 7: c = .5 / 2 = .25    -> 1         -> next 8
    # step 8: c = .12 / 1 = .12   -> 2         -> next 10
    # step 10: c = .1 / 2 = .05   -> 3         -> next 13
    # step 13: c = .15 / 3 = .05  -> 3         -> next 16
    # step 16: c = .6 / 3 = .2    -> 1         -> next 17
    # step 17: c = .01 / 1        -> 3         -> next 20
    # step 20: c = .03 / 3 = .01  -> 3         -> next 23
    # step 23: c = .01            -> 3         -> next 26
    # step 26: c = .36 / 3 = .12  -> 2         -> next 28
    # step 28: c = .1 / 2 = .05   -> 3         -> next 31 > N
    # step 29 (forced): c = .03 / 3 = .01 -> 3
    # step 30 (forced): c = .9 / 3 = .3   -> 1
    schedule = run(AdaCacheConfig.preset("slow-30"), 30, scaled_taps(BASE, changes))
    assert_schedule(
        schedule,
        computed=[1, 2, 5, 7, 8, 10, 13, 16, 17, 20, 23, 26, 28, 29, 30],
        rates=[1, 3, 2, 1, 2, 3, 3, 1, 3, 3, 3, 2, 3, 3, 1],
    )


# MoReg taps are two frames of one token: [p, q]. Then m = |q - p| / (|p| + |q|) and, with S = p + q,
# m = .1925 -> m' = 1/256; m = .385 -> m' = 1; m = .48125 -> m' = 1.25**8; m = 0 -> m' = 0.


def test_reference_100_with_moreg():
    # window (10, 90); codebook as reference-100; m_prev starts at 1
    taps = [[50.0, 50.0], [51.0, 51.0], [80.75, 119.25], [161.5, 238.5], [103.75, 296.25]]
    taps.append(grown(taps[-1], 1.03))
    taps += [[126.69, 285.31]]
    taps.append(grown(taps[-1], 1.27))
    taps += [[300.0, 300.0], [360.0, 360.0], [221.4, 498.6]]
    for factor in (1.6, 1.12, 1.9, 1.15):
        taps.append(grown(taps[-1], factor))
    # step 1: first computed step: rate 1, MoReg not evaluated (m_prev stays 1)            -> next 2
    # step 2 (outside): c = 2/100 = .02; m' = 1, g = 0, factor 1; c = .02 -> 12            -> next 14
    # step 14 (inside): raw = (29.75 + 68.25)/102 = .96078; m = 38.5/200 = .1925, m' = 1/256;
    #   g = 10 (1/256 - 1)/12 = -.830078125; factor = .833984375; c = .96078/12 * .83398 = .06677 -> 8 -> next 22
    # step 22: raw = 1.0; m' = 1/256, g = 0, factor = 1/256; c = 1/8/256 = .00049 -> 12    -> next 34
    # step 34: raw = 115.5/400 = .28875; m = 192.5/400 = .48125, m' = 1.25**8 = 5.96046;
    #   g = 10 (5.96046 - .00391)/12 = 4.96380; factor = 10.92426; c = .0240625 * 10.92426 = .26287 -> 3 -> next 37
    # step 37: raw = .03, c = .01; g = 0, factor = 5.96046; c = .05960 -> 8              -> next 45
    # step 45: raw = 39.655/412 = .09625, c = .01203125; m = 158.62/412 = .385, m' = 1;
    #   g = 10 (1 - 5.96046)/8 = -6.20058; factor = 7.20058; c = .08663 -> 6              -> next 51
    # step 51: raw = .27, c = .045; m' = 1, g = 0, factor 1 -> 10                         -> next 61
    # step 61: raw = (139.1037 + 62.3437)/523.24 = .385, c = .0385; m = 0, m' = 0;
    #   g = 10 (0 - 1)/10 = -1; factor = 1; c = .0385 -> 10                                -> next 71
    # step 71: raw = .2; m' = 0, g = 0, factor 0; c = 0 -> 12                             -> next 83
    # step 83: raw = 277.2/720 = .385, c = .0320833; m = .385, m' = 1; g = 10 (1 - 0)/12 = .83333;
    #   factor = 1.83333; c = .05882 -> 8                                                  -> next 91
    # step 91 (outside): raw = .6, c = .075; m' = 1, g = 0, factor 1 -> 6                 -> next 97
    # step 97: c = .12/6 = .02 -> 12                                                      -> next 109 > N
    # step 99 (forced): c = .9/12 = .075 -> 6
    # step 100 (forced): c = .15/6 = .025 -> 12
    config = AdaCacheConfig.preset("reference-100+moreg")
    schedule = run(config, 100, taps)
    assert_schedule(
        schedule,
        computed=[1, 2, 14, 22, 34, 37, 45, 51, 61, 71, 83, 91, 97, 99, 100],
        rates=[1, 12, 8, 12, 3, 8, 6, 10, 10, 12, 8, 6, 12, 6, 12],
        factors=[
            None,
            1,
            0.833984375,
            M_CALM,
            M_HIGH + 10 * (M_HIGH - M_CALM) / 12,
            M_HIGH,
            1 + 10 * (M_HIGH - 1) / 8,
            1,
            1,
            0,
            1 + 10 / 12,
            1,
            1,
            1,
            1,
        ],
        motions=[None, None, 0.1925, 0.1925, 0.48125, 0.48125, 0.385, 0.385, 0, 0, 0.385, None, None, None, None],
    )
    assert schedule.records[4].moreg_factor == pytest.approx(10.92426300048828125)
    assert schedule.records[6].moreg_factor == pytest.approx(7.200580596923828125)


def test_fast_30_with_moreg():
    # window (4, 26); codebook as fast-30
    taps = [[50.0, 50.0], [60.0, 60.0], [64.6, 95.4], [80.75, 119.25], [51.875, 148.125]]
    taps.append(grown(taps[-1], 1.02))
    taps.append([62.73, 141.27])
    for factor in (1.4, 1.1, 1.6):
        taps.append(grown(taps[-1], factor))
    # step 1: first: rate 1, no MoReg                                                   -> next 2
    # step 2 (outside): raw = 20/100 = .2; m' = 1, g = 0, factor 1; c = .2 -> 4          -> next 6
    # step 6: raw = (4.6 + 35.4)/120 = 1/3, c = 1/12; m = 30.8/160 = .1925, m' = 1/256;
    #   g = 10 (1/256 - 1)/4 = -2.490234375; factor = 2.494140625; c = .20785 -> 4       -> next 10
    # step 10: raw = 40/160 = .25, c = .0625; g = 0, factor = 1/256; c = .00024 -> 6    -> next 16
    # step 16: raw = 57.75/200 = .28875, c = .048125; m = 96.25/200 = .48125, m' = 5.96046;
    #   g = 10 (5.96046 - .00391)/6 = 9.92760; factor = 15.88806; c = .76461 -> 1       -> next 17
    # step 17: raw = .02, c = .02; g = 0, factor = 5.96046; c = .11921 -> 5             -> next 22
    # step 22: raw = 19.635/204 = .09625, c = .01925; m = 78.54/204 = .385, m' = 1;
    #   g = 10 (1 - 5.96046)/5 = -9.92093; factor = 10.92093; c = .21023 -> 4           -> next 26
    # step 26 (last inside): raw = .4, c = .1; m' = 1, g = 0, factor 1 -> 5             -> next 31 > N
    # step 29 (forced, outside): c = .1/5 = .02; factor 1 -> 6
    # step 30 (forced): c = .6/6 = .1 -> 5
    schedule = run(AdaCacheConfig.preset("fast-30+moreg"), 30, taps)
    assert_schedule(
        schedule,
        computed=[1, 2, 6, 10, 16, 17, 22, 26, 29, 30],
        rates=[1, 4, 4, 6, 1, 5, 4, 5, 6, 5],
        factors=[None, 1, 2.494140625, M_CALM, 15.8880615234375, M_HIGH, 10.920928955078125, 1, 1, 1],
        motions=[None, None, 0.1925, 0.1925, 0.48125, 0.48125, 0.385, 0.385, None, None],
    )


def test_slow_30_with_moreg():
    # window (4, 26); codebook as slow-30 (c < .08 -> 3, < .16 -> 2, else 1)
    taps = [[50.0, 50.0], [52.0, 52.0], [41.99, 62.01]]
    taps.append(grown(taps[-1], 1.5))
    taps.append([47.97, 108.03])
    taps.append(grown(taps[-1], 1.1))
    taps.append([69.2835, 102.3165])
    for factor in (1.2, 5.0, 1.3, 1.3, 1.3, 1.06, 1.1, 1.3):
        taps.append(grown(taps[-1], factor))
    # step 1: first: rate 1, no MoReg                                                    -> next 2
    # step 2 (outside): raw = 4/100 = .04; factor 1; c = .04 -> 3                         -> next 5
    # step 5: raw = 20.02/104 = .1925, c = .064167; m = 20.02/104 = .1925, m' = 1/256;
    #   g = 10 (1/256 - 1)/3 = -3.3203125; factor = 3.32421875; c = .21330 -> 1           -> next 6
    # step 6: raw = .5, c = .5; g = 0, factor = 1/256; c = .00195 -> 3                   -> next 9
    # step 9: raw = 30.03/156 = .1925, c = .064167; m = 60.06/156 = .385, m' = 1;
    #   g = 10 (1 - 1/256)/3 = 3.3203125; factor = 4.3203125; c = .27722 -> 1            -> next 10
    # step 10: raw = .1, c = .1; m' = 1, g = 0, factor 1 -> 2                            -> next 12
    # step 12: raw = 33.033/171.6 = .1925, c = .09625; m = .1925, m' = 1/256;
    #   g = 10 (1/256 - 1)/2 = -4.98046875; factor = 4.984375; c = .47975 -> 1           -> next 13
    # step 13: raw = .2; factor 1/256 -> 3                                              -> next 16
    # step 16: raw = 4, c = 4/3; factor 1/256; c = .00521 -> 3                           -> next 19
    # steps 19, 22, 25 (inside): raw = .3, c = .1; factor 1/256 -> 3                     -> next 28
    # step 28 (outside): raw = .06, c = .02; m' = 1, g = 10 (1 - 1/256)/3 = 3.3203125;
    #   factor = 4.3203125; c = .08641 -> 2                                               -> next 30
    # step 29 (forced): raw = .1, c = .05; m' = 1 = m_prev, factor 1 -> 3
    # step 30 (forced): raw = .3, c = .1 -> 2
    schedule = run(AdaCacheConfig.preset("slow-30+moreg"), 30, taps)
    assert_schedule(
        schedule,
        computed=[1, 2, 5, 6, 9, 10, 12, 13, 16, 19, 22, 25, 28, 29, 30],
        rates=[1, 3, 1, 3, 1, 2, 1, 3, 3, 3, 3, 3, 2, 3, 2],
        factors=[None, 1, 3.32421875, M_CALM, 4.3203125, 1, 4.984375] + [M_CALM] * 5 + [4.3203125, 1, 1],
        motions=[None, None, 0.1925, 0.1925, 0.385, 0.385] + [0.1925] * 6 + [None, None, None],
    )


def test_moreg_with_several_strides_averages_the_motion():
    # four frames of one token [1, 2, 4, 8]: stride 1: 7/(14 + 7) = 1/3; stride 2: 9/(12 + 3) = .6; mean = 7/15
    config = AdaCacheConfig(codebook=[(1.0, 1)], moreg=MoRegConfig(strides=(1, 2), window=(1, 4)))
    schedule = run(config, 4, [[1.0, 2.0, 4.0, 8.0]] * 4, frames=4)
    assert [record.motion for record in schedule.records][1:] == [pytest.approx(7 / 15)] * 3


def test_forced_steps_are_computed_even_with_a_long_rate():
    # step 1 -> rate 1; step 2: c = 0 < 1 -> rate 50, due 52 > N; 29 and 30 are forced
    schedule = run(AdaCacheConfig(codebook=[(1.0, 50)]), 30, [[1.0, 1.0]] * 4)
    assert schedule.computed_steps == [1, 2, 29, 30]
    assert schedule.skipped_steps == list(range(3, 29))


def test_custom_forced_steps():
    schedule = run(AdaCacheConfig(codebook=[(1.0, 50)], forced_steps=(1, 10, -1)), 30, [[1.0, 1.0]] * 4)
    assert schedule.computed_steps == [1, 2, 10, 30]


def test_disabled_config_computes_every_step():
    config = AdaCacheConfig.preset("reference-100+moreg").replace(enabled=False)
    schedule = run(config, 100, [[1.0, 2.0]] * 100)
    assert schedule.computed_steps == list(range(1, 101))
    assert schedule.skipped_steps == []


def test_a_caller_that_jumps_past_the_due_step_still_computes():
    schedule = Schedule(AdaCacheConfig(codebook=[(1.0, 3)]), 30)
    schedule.observe(1, StepMetrics(0.0, 0.0))
    schedule.observe(2, StepMetrics(0.0, 1.0))  # c = 0 -> rate 3, due 5
    assert [schedule.is_computed(step) for step in (3, 4, 5, 6, 20)] == [False, False, True, True, True]


@pytest.mark.parametrize(
    "metrics",
    [
        StepMetrics(diff_norm=1.0, prev_norm=0.0),
        StepMetrics(diff_norm=float("nan"), prev_norm=1.0),
        StepMetrics(diff_norm=1.0, prev_norm=float("inf")),
        StepMetrics(diff_norm=0.1, prev_norm=1.0, motion=((float("nan"), 1.0),)),
        StepMetrics(diff_norm=0.1, prev_norm=1.0, motion=((0.0, 0.0),)),
    ],
)
def test_nonfinite_metrics_reset_the_rate_and_force_the_next_step(metrics, caplog):
    config = AdaCacheConfig.preset("fast-30").replace(moreg=MoRegConfig(window=(2, 26)))
    schedule = Schedule(config, 30)
    schedule.observe(1, StepMetrics(float("nan"), float("nan"), ((1.0, 2.0),)))
    # step 2: c = .01; m = .1925, m' = 1/256, g = 10 (1/256 - 1)/1, factor = 9.96484375; c = .0996 -> 5, due 7
    assert schedule.observe(2, StepMetrics(0.01, 1.0, ((0.1925, 1.0),))).rate == 5
    assert not schedule.is_computed(6)
    with caplog.at_level(logging.WARNING, logger="adacache_compile.schedule"):
        record = schedule.observe(7, metrics)
    assert record.nonfinite and record.rate == 1 and record.metric is None and record.moreg_factor is None
    assert schedule.rate == 1 and schedule.is_computed(8)
    assert len([r for r in caplog.records if "not finite" in r.getMessage()]) == 1
    # m_prev was left at m'(step 2) = 1/256: a finite step 8 with the same motion has g = 0
    recovered = schedule.observe(8, StepMetrics(0.01, 1.0, ((0.1925, 1.0),)))
    assert not recovered.nonfinite
    assert recovered.moreg_factor == pytest.approx(M_CALM)


def test_nonfinite_warning_is_logged_once_per_schedule(caplog):
    schedule = Schedule(AdaCacheConfig.preset("slow-30"), 30)
    schedule.observe(1, StepMetrics(0.0, 0.0))
    with caplog.at_level(logging.WARNING, logger="adacache_compile.schedule"):
        for step in range(2, 6):
            assert schedule.is_computed(step)
            assert schedule.observe(step, StepMetrics(float("nan"), 1.0)).nonfinite
    assert len(caplog.records) == 1
    assert [record.nonfinite for record in schedule.records] == [False, True, True, True, True]


def test_first_computed_step_uses_no_metric():
    schedule = Schedule(AdaCacheConfig.preset("reference-100+moreg"), 100)
    record = schedule.observe(1, StepMetrics(float("nan"), 0.0))
    assert (record.rate, record.metric, record.moreg_factor, record.nonfinite) == (1, None, None, False)
    assert schedule.is_computed(2)


def test_reset_starts_a_new_generation():
    config = AdaCacheConfig.preset("fast-30")
    schedule = run(config, 30, scaled_taps(BASE, [0.5, 0.35, 0.56, 0.6, 0.48, -0.25, 0.3, 1.2, 0.2]))
    schedule.reset()
    assert (schedule.rate, schedule.last_computed, schedule.records) == (1, 0, [])
    assert schedule.computed_steps == [] and schedule.skipped_steps == []


def test_misuse_is_refused():
    schedule = Schedule(AdaCacheConfig.preset("fast-30"), 30)
    with pytest.raises(ValueError, match=r"step must be an int in 1\.\.30, got 31"):
        schedule.is_computed(31)
    schedule.observe(1, StepMetrics(0.0, 0.0))
    with pytest.raises(ValueError, match=r"step 1 is not after the last computed step 1"):
        schedule.observe(1, StepMetrics(0.0, 1.0))
    with pytest.raises(ValueError, match=r"mark_skipped: step 2 must be computed"):
        schedule.mark_skipped(2)
    with pytest.raises(ValueError, match=r"Schedule\.num_steps: expected an int >= 1, got 0"):
        Schedule(AdaCacheConfig.preset("fast-30"), 0)


def test_motion_must_match_the_strides():
    schedule = Schedule(AdaCacheConfig.preset("fast-30+moreg"), 30)
    schedule.observe(1, StepMetrics(0.0, 0.0))
    schedule.observe(2, StepMetrics(0.0, 1.0))
    with pytest.raises(ValueError, match=r"StepMetrics\.motion has 0 \(num, den\) pairs, MoRegConfig\.strides has 1"):
        schedule.observe(8, StepMetrics(0.0, 1.0))


def test_moreg_window_outside_the_generation_is_refused():
    with pytest.raises(ValueError, match=r"MoRegConfig\.window\.hi: step 90 lies outside \[1, N\] for N = 30"):
        Schedule(AdaCacheConfig.preset("reference-100+moreg"), 30)


@st.composite
def configs_and_steps(draw):
    num_steps = draw(st.integers(min_value=1, max_value=120))
    thresholds = draw(
        st.lists(st.floats(min_value=1e-3, max_value=5.0), min_size=1, max_size=7, unique=True).map(sorted)
    )
    rates = draw(st.lists(st.integers(min_value=1, max_value=15), min_size=len(thresholds), max_size=len(thresholds)))
    moreg = None
    if draw(st.booleans()):
        lo = draw(st.integers(min_value=1, max_value=num_steps))
        hi = draw(st.integers(min_value=lo, max_value=num_steps))
        strides = draw(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=3))
        moreg = MoRegConfig(
            strides=strides,
            window=(lo, hi),
            threshold=draw(st.floats(min_value=0.05, max_value=1.0)),
            power=draw(st.floats(min_value=0.5, max_value=16.0)),
            scale=draw(st.floats(min_value=0.1, max_value=10.0)),
            gradient_multiplier=draw(st.floats(min_value=0.1, max_value=20.0)),
        )
    config = AdaCacheConfig(codebook=list(zip(thresholds, rates)), moreg=moreg, norm_ord=draw(st.sampled_from([1, 2])))
    return config, num_steps


norm_values = st.one_of(
    st.floats(min_value=0.0, max_value=1e6),
    st.sampled_from([0.0, float("nan"), float("inf")]),
)


@settings(max_examples=200, deadline=None)
@given(configs_and_steps(), st.data())
def test_never_skips_forced_steps_nor_waits_longer_than_the_largest_rate(config_and_steps, data):
    config, num_steps = config_and_steps
    strides = config.moreg.strides if config.moreg is not None else ()
    schedule = Schedule(config, num_steps)
    for step in range(1, num_steps + 1):
        if schedule.is_computed(step):
            motion = tuple((data.draw(norm_values), data.draw(norm_values)) for _ in strides)
            record = schedule.observe(step, StepMetrics(data.draw(norm_values), data.draw(norm_values), motion))
            assert record.rate in {rate for _, rate in config.codebook} | {1}
            assert record.metric is None or math.isfinite(record.metric)
        else:
            schedule.mark_skipped(step)
    computed = schedule.computed_steps
    assert {1, max(num_steps - 1, 1), num_steps} <= set(computed)
    largest_rate = max(rate for _, rate in config.codebook)
    assert all(later - earlier <= largest_rate for earlier, later in zip(computed, computed[1:]))
    assert sorted(computed + schedule.skipped_steps) == list(range(1, num_steps + 1))
