"""Runtime session handling on a tiny Latte transformer: interleaved generations, timestep inference, resets,
overlong generations and what a skipped step returns."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import LatteTransformer3DModel  # noqa: E402

from adacache_compile import AdaCacheConfig, MoRegConfig, optimize  # noqa: E402
from adacache_compile.errors import AdaCacheError  # noqa: E402
from adacache_compile.testbed.tiny_models import tiny_model  # noqa: E402

NUM_STEPS = 8
# Threshold 10 is above any metric: every computed step after step 1 picks rate 3.
SKIPPING = AdaCacheConfig(codebook=((10.0, 3),))
# Step 1 and 2 computed (rate 1 after step 1), then 2 + 3 = 5, then 5 + 3 = 8 but 7 and 8 are forced.
EXPECTED_COMPUTED = [1, 2, 5, 7, 8]
EXPECTED_SKIPPED = [3, 4, 6]


def tiny_latte() -> LatteTransformer3DModel:
    return tiny_model("latte", video_length=4)


@pytest.fixture(scope="module")
def model():
    return tiny_latte()


@pytest.fixture(scope="module")
def cached(model):
    cached = optimize(model, SKIPPING)
    latents, prompt = make_inputs(0)
    cached.capture((), call_kwargs(latents, prompt, TIMESTEPS[0]))
    return cached


TIMESTEPS = torch.linspace(999.0, 1.0, NUM_STEPS).tolist()


def make_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 4, 8, 8, generator=generator)
    prompt = torch.randn(1, 6, 16, generator=generator)
    return latents, prompt


def call_kwargs(latents, prompt, t: float) -> dict:
    return {
        "hidden_states": latents,
        "timestep": torch.tensor([t]),
        "encoder_hidden_states": prompt,
        "return_dict": False,
    }


def denoise_steps(call, latents, prompt, timesteps=TIMESTEPS):
    """A hand-written sampling loop; yields each step's model output. ``call(kwargs)`` runs the model once."""
    x = latents
    for t in timesteps:
        out = call(call_kwargs(x, prompt, t))[0]
        x = x - 0.1 * out
        yield out


def denoise(call, latents, prompt, timesteps=TIMESTEPS) -> list[torch.Tensor]:
    return list(denoise_steps(call, latents, prompt, timesteps))


def in_generation(cached, latents, prompt, timesteps=TIMESTEPS) -> list[torch.Tensor]:
    with cached.generation(len(timesteps)):
        return denoise(lambda kw: cached(**kw), latents, prompt, timesteps)


def assert_all_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert torch.equal(g, w), f"step {step}: max abs diff {(g - w).abs().max().item()}"


def test_generation_follows_schedule(cached):
    before = len(cached.stats["history"])
    in_generation(cached, *make_inputs(1))
    history = cached.stats["history"]
    assert len(history) == before + 1
    assert history[-1]["computed_steps"] == EXPECTED_COMPUTED
    assert history[-1]["skipped_steps"] == EXPECTED_SKIPPED


def test_interleaved_sessions_equal_sequential(cached):
    inputs_a, inputs_b = make_inputs(1), make_inputs(2)
    want_a = in_generation(cached, *inputs_a)
    want_b = in_generation(cached, *inputs_b)

    session_a = cached.new_session(NUM_STEPS, name="a")
    session_b = cached.new_session(NUM_STEPS, name="b")
    loop_a = denoise_steps(lambda kw: cached.step(session_a, **kw), *inputs_a)
    loop_b = denoise_steps(lambda kw: cached.step(session_b, **kw), *inputs_b)
    got_a, got_b = [], []
    for out_a, out_b in zip(loop_a, loop_b):  # zip alternates: step i of a, then step i of b
        got_a.append(out_a)
        got_b.append(out_b)

    assert_all_equal(got_a, want_a)
    assert_all_equal(got_b, want_b)
    for session in (session_a, session_b):
        assert session.schedule.computed_steps == EXPECTED_COMPUTED
        assert session.schedule.skipped_steps == EXPECTED_SKIPPED


def test_generations_in_two_threads_equal_sequential(cached):
    inputs = [make_inputs(3), make_inputs(4)]
    want = [in_generation(cached, *x) for x in inputs]

    # Strict alternation: thread 0 runs a step, hands over to thread 1, which runs its step and hands back.
    turns = [threading.Semaphore(1), threading.Semaphore(0)]
    got: list[list[torch.Tensor]] = [[], []]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        mine, theirs = turns[index], turns[1 - index]

        def call(kwargs):
            mine.acquire()
            try:
                return cached(**kwargs)
            finally:
                theirs.release()

        try:
            got[index] = in_generation_with(call, *inputs[index])
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            theirs.release()

    def in_generation_with(call, latents, prompt):
        with cached.generation(NUM_STEPS, name="thread"):
            return denoise(call, latents, prompt)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert_all_equal(got[0], want[0])
    assert_all_equal(got[1], want[1])


def test_timestep_inference_without_context(cached):
    latents, prompt = make_inputs(5)
    cached._reset_stateful_cache()
    before = len(cached.stats["history"])
    first = denoise(lambda kw: cached(**kw), latents, prompt)
    live = cached.stats["default"]
    assert live["steps_run"] == NUM_STEPS and live["num_steps"] is None
    # N unknown: the forced last steps are not honoured, the rate alone decides.
    assert live["computed_steps"] == [1, 2, 5, 8]

    second = denoise(lambda kw: cached(**kw), latents, prompt)  # the timestep rises: a new generation
    stats = cached.stats
    assert len(stats["history"]) == before + 1
    assert stats["history"][-1]["branch"] == "default"
    assert stats["history"][-1]["steps_run"] == NUM_STEPS
    assert stats["default"]["steps_run"] == NUM_STEPS
    assert_all_equal(second, first)

    cached._reset_stateful_cache()
    assert [entry["steps_run"] for entry in cached.stats["history"][before:]] == [NUM_STEPS, NUM_STEPS]
    assert "default" not in cached.stats


def test_known_num_steps_without_context_restarts_after_n_calls(cached):
    latents, prompt = make_inputs(6)
    # Timesteps that keep falling across both generations: only the step count can tell where the second starts.
    falling = [float(t) for t in range(990, 990 - 2 * NUM_STEPS * 10, -10)]
    first_t, second_t = falling[:NUM_STEPS], falling[NUM_STEPS:]
    cached._reset_stateful_cache()
    before = len(cached.stats["history"])
    cached.num_steps = NUM_STEPS  # what optimize(num_steps=...) and the diffusers integration set
    try:
        first = denoise(lambda kw: cached(**kw), latents, prompt, first_t)
        second = denoise(lambda kw: cached(**kw), latents, prompt, second_t)
        cached._reset_stateful_cache()
    finally:
        cached.num_steps = None
    history = cached.stats["history"][before:]
    assert [entry["computed_steps"] for entry in history] == [EXPECTED_COMPUTED, EXPECTED_COMPUTED]
    # Each equals its own generation run with the step count given explicitly (the same programs, bit for bit).
    assert_all_equal(first, in_generation(cached, latents, prompt, first_t))
    assert_all_equal(second, in_generation(cached, latents, prompt, second_t))


def test_repeated_timestep_without_context_is_refused(cached):
    latents, prompt = make_inputs(6)
    cached._reset_stateful_cache()
    cached.num_steps = NUM_STEPS
    try:
        with pytest.raises(AdaCacheError, match="second call at timestep 500 without a cache_context"):
            denoise(lambda kw: cached(**kw), latents, prompt, [500.0] * NUM_STEPS)
    finally:
        cached._reset_stateful_cache()
        cached.num_steps = None


def counted_call(cached, path: str):
    """A call that runs the model through ``path``: "cache_context" (branch "cond", step_index 0, 1, ...) or
    "timestep" (no context: the runtime infers the generation from the timestep)."""
    if path == "timestep":
        return lambda kwargs: cached(**kwargs)
    steps = iter(range(NUM_STEPS))

    def call(kwargs):
        with cached.cache_context("cond", step_index=next(steps), num_inference_steps=NUM_STEPS):
            return cached(**kwargs)

    return call


@pytest.mark.parametrize("path,branch", [("cache_context", "cond"), ("timestep", "default")])
def test_reset_mid_generation_starts_clean(cached, path, branch):
    latents, prompt = make_inputs(7)
    want = in_generation(cached, latents, prompt)
    cached._reset_stateful_cache()
    before = len(cached.stats["history"])
    partial = denoise_steps(counted_call(cached, path), latents, prompt)
    for _ in range(3):
        next(partial)

    cached._reset_stateful_cache()
    assert cached.stats["history"][-1]["steps_run"] == 3
    assert branch not in cached.stats

    again = denoise(counted_call(cached, path), latents, prompt)
    assert cached.stats[branch]["computed_steps"][0] == 1
    assert len(cached.stats["history"]) == before + 1
    if path == "cache_context":  # N known: identical to a generation() run
        assert_all_equal(again, want)
    else:  # N unknown: the last steps are not forced, so only the steps up to the first difference agree
        assert_all_equal(again[:6], want[:6])


def test_more_calls_than_num_steps_start_a_new_generation(cached, caplog):
    latents, prompt = make_inputs(8)
    want = in_generation(cached, latents, prompt, TIMESTEPS[:4])
    before = len(cached.stats["history"])
    timesteps = TIMESTEPS[:4] + TIMESTEPS[:2]
    with caplog.at_level(logging.WARNING, logger="adacache_compile.runtime"):
        with cached.generation(4) as session:
            got = denoise(lambda kw: cached(**kw), latents, prompt, timesteps)
    assert "more calls than num_steps=4" in caplog.text
    assert any("new generation" in event for event in session.events)
    history = cached.stats["history"][before:]
    assert [entry["steps_run"] for entry in history] == [4, 2]
    # The restart is clean: calls 5 and 6 are steps 1 and 2 of a new generation (fed the continued latents).
    assert history[1]["computed_steps"] == [1, 2]
    assert_all_equal(got[:4], want)


def test_more_calls_than_num_inference_steps_in_cache_context(cached, caplog):
    latents, prompt = make_inputs(9)
    cached._reset_stateful_cache()
    before = len(cached.stats["history"])
    steps = iter(range(6))

    def call(kwargs):
        with cached.cache_context("cond", step_index=next(steps), num_inference_steps=4):
            return cached(**kwargs)

    with caplog.at_level(logging.WARNING, logger="adacache_compile.runtime"):
        denoise(call, latents, prompt, TIMESTEPS[:6])
    cached._reset_stateful_cache()
    assert "more calls than num_steps=4" in caplog.text
    assert [entry["steps_run"] for entry in cached.stats["history"][before:]] == [4, 2]


def test_skipped_step_runs_skip_program_on_cached_deltas(cached):
    latents, prompt = make_inputs(10)
    session = cached.new_session(NUM_STEPS, name="probe")
    entry = cached.captures.latest()
    x = latents
    for step, t in enumerate(TIMESTEPS[:4], start=1):
        kwargs = call_kwargs(x, prompt, t)
        deltas = session.deltas
        out = cached.step(session, **kwargs)[0]
        if step in EXPECTED_SKIPPED:
            inputs = entry.captured.flatten((), kwargs)
            with torch.no_grad():
                want = entry.captured.unflatten(cached.programs.skip(*inputs, *deltas))[0]
            assert torch.equal(out, want), f"step {step}"
            # A skipped step leaves the cache as it was.
            assert all(a is b for a, b in zip(session.deltas, deltas))
        x = x - 0.1 * out
    assert session.schedule.skipped_steps == [3, 4]
    assert session.schedule.computed_steps == [1, 2]


def test_full_program_matches_model_and_skips_differ(cached, model):
    latents, prompt = make_inputs(11)
    got = in_generation(cached, latents, prompt)
    with torch.no_grad():
        want = denoise(lambda kw: model(**kw), latents, prompt)
    scale = max(w.abs().max().item() for w in want)
    # Steps 1 and 2 are computed on identical inputs: equal up to float rounding.
    for step in (0, 1):
        torch.testing.assert_close(got[step], want[step], rtol=0, atol=1e-5 * scale)
    # Step 3 is skipped: the cached residuals of step 2 stand in, so it differs from the model.
    assert not torch.allclose(got[2], want[2], rtol=0, atol=1e-5 * scale)


def test_model_joining_mid_loop_keeps_the_forced_last_steps(cached):
    """Wan 2.2 hands the low-noise steps to transformer_2 from a boundary step on, with the pipeline's N: the
    session covers the remaining steps, so the last two pipeline steps are still computed in full."""
    latents, prompt = make_inputs(11)
    cached._reset_stateful_cache()
    steps = iter(range(4, 12))

    def call(kwargs):
        with cached.cache_context("cond", step_index=next(steps), num_inference_steps=12):
            return cached(**kwargs)

    denoise(call, latents, prompt, torch.linspace(999.0, 1.0, 12).tolist()[4:12])
    live = cached.stats["cond"]
    cached._reset_stateful_cache()
    assert live["num_steps"] == 8 and live["steps_run"] == 8
    assert live["computed_steps"][-2:] == [7, 8] and live["skipped_steps"]


# --- review fixes: disabled config, diffusers' own hooks, MoReg without N, use_config ----------------------------------
def test_step_honours_a_disabled_config(model):
    cached = optimize(model, AdaCacheConfig(codebook=((10.0, 3),), enabled=False))
    latents, prompt = make_inputs(5)
    session = cached.new_session(NUM_STEPS)
    kwargs = call_kwargs(latents, prompt, TIMESTEPS[0])
    with torch.no_grad():
        want = model(**kwargs)[0]
    got = cached.step(session, **kwargs)[0]
    assert torch.equal(got, want)
    assert session.step == 0 and not cached.captures.entries, (
        "a disabled config runs the original model, nothing captured"
    )


def test_diffusers_cache_hooks_on_the_cached_module_are_refused(model):
    from diffusers import FirstBlockCacheConfig

    from adacache_compile.errors import AdaCacheError

    cached = optimize(model, SKIPPING)
    with pytest.raises(AdaCacheError, match=r"enable_cache: diffusers' cache hooks would hook the wrapped "):
        cached.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    assert not model.is_cache_enabled, "the wrapped model was left unhooked"
    assert cached.config is model.config, "other attributes still read through to the wrapped model"


def _fallback_generation(cached, seed: int) -> None:
    """Calls without a pipeline, generation() or session: the runtime infers generations from the timestep."""
    latents, prompt = make_inputs(seed)
    denoise(lambda kw: cached(**kw), latents, prompt)


def test_moreg_with_a_fractional_window_and_unknown_n_warns_once_and_is_off(model, caplog):
    moreg = AdaCacheConfig(codebook=((10.0, 3),), moreg=MoRegConfig())  # the default window: fractions of N
    cached = optimize(model, moreg)
    with caplog.at_level(logging.WARNING, logger="adacache_compile"):
        _fallback_generation(cached, 6)
        _fallback_generation(cached, 7)
    cached.reset()
    warnings = [r for r in caplog.records if "N is unknown, so MoReg is off" in r.getMessage()]
    assert len(warnings) == 1
    history = cached.stats["history"]
    assert len(history) == 2 and history[0]["num_steps"] is None
    assert all(r["moreg_factor"] is None for h in history for r in h["records"])

    known = optimize(model, moreg, num_steps=NUM_STEPS)
    _fallback_generation(known, 6)
    known.reset()
    records = known.stats["history"][0]["records"]
    assert any(r["moreg_factor"] is not None for r in records), "with N known MoReg acts inside its window"


def test_use_config_keeps_captures_for_host_side_changes_and_recaptures_for_program_changes(model):
    cached = optimize(model, SKIPPING)
    latents, prompt = make_inputs(8)
    in_generation(cached, latents, prompt)
    entry = cached.captures.latest()

    every_other = AdaCacheConfig(codebook=((10.0, 2),))
    cached.use_config(every_other)
    assert cached.captures.entries == [entry], "a codebook change needs no new capture"
    got = in_generation(cached, latents, prompt)
    assert cached.stats["history"][-1]["computed_steps"] == [1, 2, 4, 6, 7, 8]
    assert_all_equal(got, in_generation(optimize(model, every_other), latents, prompt))

    other_region = AdaCacheConfig(codebook=((10.0, 2),), region=(1, 4))
    cached.use_config(other_region)
    assert cached.captures.entries == [], "a region change sets the captures aside"
    got = in_generation(cached, latents, prompt)
    assert cached.plan.region != entry.plan.region
    assert_all_equal(got, in_generation(optimize(model, other_region), latents, prompt))


def test_switching_away_and_back_before_any_call_takes_the_kept_capture_back(model):
    cached = optimize(model, SKIPPING)
    latents, prompt = make_inputs(9)
    in_generation(cached, latents, prompt)
    entry = cached.captures.latest()
    cached.use_config(SKIPPING.replace(forecast_order=2))  # other programs: the capture is set aside
    assert cached.captures.entries == []
    cached.use_config(SKIPPING)  # back, before any call captured for the other config
    assert cached.captures.entries == [entry]
    in_generation(cached, latents, prompt)
    assert cached.captures.captures_made == 1


def test_switching_back_to_a_config_reuses_its_kept_capture_unless_the_model_changed():
    model = tiny_latte()
    latents, prompt = make_inputs(9)
    cached = optimize(model, SKIPPING)
    reuse = in_generation(cached, latents, prompt)
    reuse_entry = cached.captures.latest()

    forecasting = SKIPPING.replace(forecast_order=2)  # other programs: a new capture
    cached.use_config(forecasting)
    forecast = in_generation(cached, latents, prompt)
    forecast_entry = cached.captures.latest()
    assert forecast_entry is not reuse_entry and cached.captures.captures_made == 2

    # Back and forth: the kept captures serve again, with the same outputs as before; nothing is captured anew.
    cached.use_config(SKIPPING)
    assert cached.captures.entries == [reuse_entry]
    assert_all_equal(in_generation(cached, latents, prompt), reuse)
    cached.use_config(forecasting)
    assert cached.captures.entries == [forecast_entry]
    assert_all_equal(in_generation(cached, latents, prompt), forecast)
    assert cached.captures.captures_made == 2

    # A model changed while a capture was kept: that capture never runs again.
    old = model.proj_out
    model.proj_out = torch.nn.Linear(old.in_features, old.out_features)
    cached.use_config(SKIPPING)
    assert cached.captures.entries == [], "the kept capture saw another model"
    got = in_generation(cached, latents, prompt)
    assert cached.captures.captures_made == 3
    assert_all_equal(got, in_generation(optimize(model, SKIPPING), latents, prompt))
    assert not torch.equal(got[0], reuse[0])
