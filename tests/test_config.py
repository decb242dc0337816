"""AdaCacheConfig / MoRegConfig: presets, validation (errors name the field), JSON round trip, step resolution."""

import dataclasses
import json

import pytest

from adacache_compile.config import PRESETS, AdaCacheConfig, MoRegConfig

REFERENCE_CODEBOOKS = {
    "reference-100": {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.00: 3},
    "fast-30": {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1},
    "slow-30": {0.08: 3, 0.16: 2, 0.24: 1, 0.32: 1, 0.40: 1, 1.00: 1},
}


@pytest.mark.parametrize("name", sorted(REFERENCE_CODEBOOKS))
def test_presets_hold_the_reference_values(name):
    plain = AdaCacheConfig.preset(name)
    assert dict(plain.codebook) == REFERENCE_CODEBOOKS[name]
    assert plain.moreg is None
    assert plain.forced_steps == (1, -2, -1)
    assert plain.norm_ord == 1 and plain.enabled and plain.tap is None and plain.region is None

    with_moreg = AdaCacheConfig.preset(f"{name}+moreg")
    assert with_moreg.codebook == plain.codebook
    assert with_moreg.moreg == MoRegConfig(
        strides=(1,),
        window=(10, 90) if name.endswith("-100") else (4, 26),
        threshold=0.385,
        power=8.0,
        scale=1.0,
        gradient_multiplier=10.0,
    )


def test_preset_registry_lists_all_names_and_unknown_names_are_refused():
    assert set(PRESETS) == {
        "reference-100",
        "reference-100+moreg",
        "fast-30",
        "fast-30+moreg",
        "slow-30",
        "slow-30+moreg",
        "fast-50",
        "fast-50+moreg",
        "slow-50",
        "slow-50+moreg",
        "fast-50+f2",
        "slow-50+f2",
        "stride-3+f2",
        "stride-4+f2",
        "stride-5+f2",
    }
    with pytest.raises(ValueError, match=r"unknown AdaCache preset 'fast-40'.*fast-30\+moreg.*slow-30"):
        AdaCacheConfig.preset("fast-40")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    config = AdaCacheConfig.preset(name)
    assert AdaCacheConfig.from_json(config.to_json()) == config
    path = tmp_path / f"{name}.json"
    config.to_json(path)
    assert AdaCacheConfig.from_json(path) == config
    assert AdaCacheConfig.from_json(str(path)) == config


def test_json_round_trip_is_exact_for_every_field():
    config = AdaCacheConfig(
        codebook=[(0.1, 4), (0.25, 2), (3, 1)],
        forced_steps=[1, 7, -1],
        tap="blocks.13",
        region=[2, 26],
        moreg=MoRegConfig(strides=[1, 2], window=(3, 0.75), threshold=0.4, power=6, scale=2, gradient_multiplier=5),
        norm_ord=2,
        enabled=False,
        forecast_order=2,
        decision_metric="forecast",
        first_rate=3,
    )
    data = json.loads(config.to_json())
    assert data["forecast_order"] == 2 and data["decision_metric"] == "forecast" and data["first_rate"] == 3
    assert data["codebook"] == [[0.1, 4], [0.25, 2], [3.0, 1]]
    assert data["moreg"]["window"] == [3, 0.75]
    restored = AdaCacheConfig.from_json(config.to_json())
    assert restored == config
    assert isinstance(restored.moreg.window[0], int) and isinstance(restored.moreg.window[1], float)
    assert AdaCacheConfig.from_dict(config.to_dict()) == config


def test_lists_are_normalised_to_tuples_so_configs_compare_and_hash():
    config = AdaCacheConfig(codebook=[[0.1, 2], [1.0, 1]], forced_steps=[1, -1], region=[0, 4])
    assert config.codebook == ((0.1, 2), (1.0, 1))
    assert config.forced_steps == (1, -1)
    assert config.region == (0, 4)
    assert hash(config) == hash(AdaCacheConfig(codebook=((0.1, 2), (1.0, 1)), forced_steps=(1, -1), region=(0, 4)))


def test_replace_returns_a_validated_copy():
    base = AdaCacheConfig.preset("fast-30")
    assert base.replace(enabled=False).enabled is False
    assert base.enabled is True
    with pytest.raises(ValueError, match=r"AdaCacheConfig\.norm_ord"):
        base.replace(norm_ord=3)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AdaCacheConfig.preset("fast-30").enabled = False


@pytest.mark.parametrize(
    ("num_steps", "forced"),
    [(100, {1, 99, 100}), (30, {1, 29, 30}), (2, {1, 2}), (1, {1})],
)
def test_forced_for_resolves_negative_steps_from_the_end(num_steps, forced):
    assert AdaCacheConfig.preset("reference-100").forced_for(num_steps) == frozenset(forced)


def test_forced_for_drops_steps_outside_the_generation():
    config = AdaCacheConfig(codebook=[(1.0, 2)], forced_steps=(1, 5, 40, -3, -60))
    assert config.forced_for(30) == frozenset({1, 5, 28})


@pytest.mark.parametrize(
    ("window", "num_steps", "resolved"),
    [
        ((10, 90), 100, (10, 90)),
        ((4, 26), 30, (4, 26)),
        ((0.1, 0.9), 100, (10, 90)),
        ((0.1, 0.9), 30, (3, 27)),
        ((0.01, 1.0), 20, (1, 20)),
        ((2, 0.5), 10, (2, 5)),
    ],
)
def test_window_for_resolves_absolute_and_fractional_ends(window, num_steps, resolved):
    assert MoRegConfig(window=window).window_for(num_steps) == resolved


def test_window_for_refuses_a_window_outside_the_generation():
    with pytest.raises(ValueError, match=r"MoRegConfig\.window\.hi: step 90 lies outside \[1, N\] for N = 30"):
        MoRegConfig(window=(10, 90)).window_for(30)
    with pytest.raises(ValueError, match=r"MoRegConfig\.window: resolves to \(8, 5\) for N = 10"):
        MoRegConfig(window=(8, 0.5)).window_for(10)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"codebook": ()}, r"AdaCacheConfig\.codebook: expected a non-empty sequence"),
        ({"codebook": {0.1: 2}}, r"AdaCacheConfig\.codebook: .*got a dict"),
        ({"codebook": [(0.1, 3), (0.2, 2), (0.2, 1)]}, r"AdaCacheConfig\.codebook\[2\]: thresholds must be strictly"),
        ({"codebook": [(0.3, 3), (0.2, 2)]}, r"AdaCacheConfig\.codebook\[1\]: thresholds must be strictly ascending"),
        ({"codebook": [(0.0, 3), (1.0, 1)]}, r"AdaCacheConfig\.codebook\[0\]: threshold must be a finite number > 0"),
        ({"codebook": [(-0.1, 3)]}, r"AdaCacheConfig\.codebook\[0\]: threshold must be"),
        ({"codebook": [(0.1, 2), (1.0, 0)]}, r"AdaCacheConfig\.codebook\[1\]: rate must be an int >= 1"),
        ({"codebook": [(0.1, 2.0)]}, r"AdaCacheConfig\.codebook\[0\]: rate must be an int >= 1"),
        ({"codebook": [(0.1, True)]}, r"AdaCacheConfig\.codebook\[0\]: rate must be an int >= 1"),
        ({"codebook": [(0.1,)]}, r"AdaCacheConfig\.codebook\[0\]: expected a pair"),
        ({"norm_ord": 3}, r"AdaCacheConfig\.norm_ord: expected 1 or 2, got 3"),
        ({"forced_steps": (1, 0)}, r"AdaCacheConfig\.forced_steps\[1\]: expected a non-zero int"),
        ({"tap": ""}, r"AdaCacheConfig\.tap: expected a block index, a non-empty block name or None"),
        ({"region": (4, 4)}, r"AdaCacheConfig\.region: expected \[start, stop\) block indices"),
        ({"region": (-1, 4)}, r"AdaCacheConfig\.region: expected \[start, stop\)"),
        ({"moreg": "on"}, r"AdaCacheConfig\.moreg: expected a MoRegConfig or None"),
        ({"enabled": 1}, r"AdaCacheConfig\.enabled: expected a bool"),
        ({"forecast_order": 3}, r"AdaCacheConfig\.forecast_order: expected an int in 0\.\.2"),
        ({"forecast_order": 1.0}, r"AdaCacheConfig\.forecast_order: expected an int in 0\.\.2"),
        ({"decision_metric": "error"}, r"AdaCacheConfig\.decision_metric: expected one of \('change', 'forecast'\)"),
    ],
)
def test_invalid_adacache_config_names_the_field(changes, match):
    fields = {"codebook": [(0.1, 2), (1.0, 1)], **changes}
    with pytest.raises(ValueError, match=match):
        AdaCacheConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"strides": ()}, r"MoRegConfig\.strides: expected a non-empty sequence of positive ints"),
        ({"strides": (1, 0)}, r"MoRegConfig\.strides\[1\]: expected a positive int, got 0"),
        ({"strides": (1.5,)}, r"MoRegConfig\.strides\[0\]: expected a positive int"),
        ({"window": (20, 10)}, r"MoRegConfig\.window: lo must be <= hi"),
        ({"window": (0.9, 0.1)}, r"MoRegConfig\.window: lo must be <= hi"),
        ({"window": (0, 10)}, r"MoRegConfig\.window\.lo: an absolute step must be an int >= 1"),
        ({"window": (0.0, 0.5)}, r"MoRegConfig\.window\.lo: a fractional step must be a float in \(0, 1\]"),
        ({"window": (0.1, 1.5)}, r"MoRegConfig\.window\.hi: a fractional step must be a float in \(0, 1\]"),
        ({"window": (1,)}, r"MoRegConfig\.window: expected a pair"),
        ({"threshold": 0}, r"MoRegConfig\.threshold: expected a finite number > 0"),
        ({"power": -8}, r"MoRegConfig\.power: expected a finite number > 0"),
        ({"scale": float("inf")}, r"MoRegConfig\.scale: expected a finite number > 0"),
        ({"gradient_multiplier": 0.0}, r"MoRegConfig\.gradient_multiplier: expected a finite number > 0"),
    ],
)
def test_invalid_moreg_config_names_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        MoRegConfig(**fields)


def test_from_dict_refuses_unknown_fields():
    data = AdaCacheConfig.preset("fast-30").to_dict()
    data["cache_rate"] = 3
    with pytest.raises(ValueError, match=r"AdaCacheConfig\.from_dict: unknown field\(s\) \['cache_rate'\]"):
        AdaCacheConfig.from_dict(data)


def test_from_json_reports_bad_text():
    with pytest.raises(ValueError, match=r"AdaCacheConfig\.from_json: JSON text is not valid JSON"):
        AdaCacheConfig.from_json("{not json")


def test_configs_written_before_forecasting_load_as_the_reference():
    old = {"codebook": [[0.1, 2], [1.0, 1]], "forced_steps": [1, -2, -1], "tap": None, "region": None, "moreg": None}
    config = AdaCacheConfig.from_dict({**old, "norm_ord": 1, "enabled": True})
    assert (config.forecast_order, config.decision_metric, config.first_rate) == (0, "change", 1)


def _computed_steps(config, num_steps, metrics=(1.0, 2.0)):
    from adacache_compile.schedule import Schedule, StepMetrics

    schedule = Schedule(config, num_steps)
    for step in range(1, num_steps + 1):
        if schedule.is_computed(step):
            schedule.observe(step, StepMetrics(*metrics))
        else:
            schedule.mark_skipped(step)
    return schedule.computed_steps


def test_stride_presets_compute_the_regular_grid_with_the_second_order_forecast():
    config = AdaCacheConfig.preset("stride-3+f2")
    assert config.forecast_order == 2 and config.decision_metric == "change"
    assert _computed_steps(config, 12) == [1, 4, 7, 10, 12]
    assert _computed_steps(AdaCacheConfig.preset("stride-4+f2"), 50) == [*range(1, 50, 4), 50]
    # The same one-entry codebook with the reference's start (rate 1 after step 1) and forced steps.
    assert _computed_steps(AdaCacheConfig(codebook=((1e9, 3),), forecast_order=2), 12) == [1, 2, 5, 8, 11, 12]


def test_first_rate_sets_the_rate_of_the_first_computed_step_only():
    codebook = ((0.1, 4), (1e6, 1))
    # metric 0.5 / rate: >= 0.1 -> rate 1 after the second computed step.
    assert _computed_steps(AdaCacheConfig(codebook=codebook, first_rate=3, forced_steps=(1,)), 8, (0.5, 1.0)) == [
        1,
        4,
        5,
        6,
        7,
        8,
    ]
    assert _computed_steps(AdaCacheConfig(codebook=codebook, forced_steps=(1,)), 6, (0.5, 1.0)) == [1, 2, 3, 4, 5, 6]
    config = AdaCacheConfig.preset("fast-50+f2")
    assert config.first_rate == "top" and config.forced_steps == (1, -1)
    assert config.resolved_first_rate() == max(rate for _, rate in config.codebook)
    # "top" follows the codebook through replace (what the calibration does to its base config).
    assert config.replace(codebook=((0.1, 7), (1e6, 1))).resolved_first_rate() == 7


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2", "max"])
def test_invalid_first_rate_names_the_field(value):
    with pytest.raises(ValueError, match=r"AdaCacheConfig\.first_rate: expected an int >= 1"):
        AdaCacheConfig(codebook=((1.0, 1),), first_rate=value)


def test_schedule_config_computes_exactly_its_steps_and_even_grid_spreads_them():
    from adacache_compile.config import even_grid, schedule_config
    from adacache_compile.schedule import Schedule, StepMetrics

    steps = [1, 4, 5, 11, 20]
    for order in (0, 2):
        config = schedule_config(steps, order)
        assert config.forecast_order == order
        schedule = Schedule(config, 20)
        for step in range(1, 21):
            if schedule.is_computed(step):
                schedule.observe(step, StepMetrics(0.9, 1.0, ()))  # a large change: the codebook would say rate 1
            else:
                schedule.mark_skipped(step)
        assert schedule.computed_steps == steps
    assert even_grid(13, 50) == [1, 5, 9, 13, 17, 21, 26, 30, 34, 38, 42, 46, 50]
    assert even_grid(2, 50) == [1, 50] and even_grid(50, 50) == list(range(1, 51))
    for bad in ([], [2, 5], [1, 5, 5], [1, 7, 3], [1, 2.5]):
        with pytest.raises(ValueError, match="schedule_config"):
            schedule_config(bad)
    with pytest.raises(ValueError, match="even_grid"):
        even_grid(51, 50)
