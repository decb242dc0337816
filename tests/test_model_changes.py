"""A model changed after capture never runs a stale graph: LoRA through peft, replaced submodules and parameters,
dtype moves are detected once per generation and re-captured; in-place weight updates need no new capture. And
diffusers' reset contract reaches every live session, also inside ``generation()``."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("peft")

from peft import LoraConfig  # noqa: E402
from tiny_models import build  # noqa: E402

from adacache_compile import AdaCacheConfig, optimize  # noqa: E402

# Threshold 10 is above any metric: after steps 1 and 2 two of every three steps are skipped.
SKIPPING = AdaCacheConfig(codebook=((10.0, 3),))
NUM_STEPS = 6


@pytest.fixture
def wan():
    model, kwargs = build("wan")
    model.eval()
    cached = optimize(model, SKIPPING, example_inputs={**kwargs, "return_dict": False})
    return model, {**kwargs, "return_dict": False}, cached


def _lora(seed: int) -> LoraConfig:
    torch.manual_seed(seed)  # init_lora_weights=False draws random B too, so the adapter changes the output
    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)


def _first_step(cached, kwargs) -> torch.Tensor:
    """The first (computed) step of a new generation."""
    with cached.generation(NUM_STEPS):
        return cached(**kwargs)[0]


def _reference(model, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs)[0]


def _assert_matches_model(cached, model, kwargs):
    got, want = _first_step(cached, kwargs), _reference(model, kwargs)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale


def test_every_lora_operation_is_honoured_from_the_next_generation(wan):
    model, kwargs, cached = wan
    base = _reference(model, kwargs)
    operations = [
        # One operation per field of peft's state that model_state reads (adapters and their modules, active
        # adapters, scaling, disabled, merged), each a re-capture (5-15 s on 2 cores): enable_lora and unfuse_lora
        # undo disable_lora and fuse_lora through the same fields.
        ("add_adapter", lambda: cached.add_adapter(_lora(1), adapter_name="one")),
        ("add a second adapter", lambda: cached.add_adapter(_lora(2), adapter_name="two")),
        ("set_adapters(weights=...)", lambda: cached.set_adapters(["one", "two"], weights=[0.5, 1.5])),
        ("disable_lora", lambda: cached.disable_lora()),
        ("fuse_lora", lambda: (cached.enable_lora(), cached.fuse_lora())),
        ("delete_adapters", lambda: (cached.unfuse_lora(), cached.delete_adapters(["one", "two"]))),
    ]
    seen = {"base": base}
    for name, operation in operations:
        captures_before = cached.captures.captures_made
        operation()
        _assert_matches_model(cached, model, kwargs)
        assert cached.captures.captures_made == captures_before + 1, f"{name}: one re-capture"
        seen[name] = _reference(model, kwargs)
    # The operations really changed the model (so matching it is not matching the base model by accident).
    assert not torch.allclose(seen["add_adapter"], base, atol=1e-4)
    assert not torch.allclose(seen["set_adapters(weights=...)"], seen["add a second adapter"], atol=1e-4)
    assert torch.allclose(seen["disable_lora"], base, atol=1e-5)
    assert torch.allclose(seen["delete_adapters"], base, atol=1e-5)


class HalvedAttention:
    """An attention processor as speedups and adapters install them: wraps Wan's own and changes its output."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return 0.5 * self.inner(attn, hidden_states, *args, **kwargs)


def test_an_attention_processor_set_after_capture_is_honoured_from_the_next_generation(wan):
    model, kwargs, cached = wan
    base = _reference(model, kwargs)
    _assert_matches_model(cached, model, kwargs)
    captures_before = cached.captures.captures_made
    processors = model.attn_processors
    model.set_attn_processor({name: HalvedAttention(p) for name, p in processors.items()})
    assert not torch.allclose(_reference(model, kwargs), base, atol=1e-4), "the processor changes the output"
    _assert_matches_model(cached, model, kwargs)
    assert cached.captures.captures_made == captures_before + 1
    model.set_attn_processor(processors)  # back to the processors of the first capture
    _assert_matches_model(cached, model, kwargs)


def test_no_change_no_recapture_and_in_place_updates_need_none(wan):
    model, kwargs, cached = wan
    _first_step(cached, kwargs)
    _first_step(cached, kwargs)
    assert cached.captures.captures_made == 1
    weight = model.proj_out.weight
    with torch.no_grad():
        weight.mul_(1.5)  # in place: the programs share the parameter
    _assert_matches_model(cached, model, kwargs)
    assert cached.captures.captures_made == 1


@pytest.mark.parametrize(
    "change",
    ["replace a parameter", "replace a submodule", "move to float64"],
)
def test_replaced_parameters_submodules_and_dtype_moves_recapture(wan, change, caplog):
    model, kwargs, cached = wan
    _first_step(cached, kwargs)
    if change == "replace a parameter":
        model.proj_out.weight = torch.nn.Parameter(torch.randn_like(model.proj_out.weight))
        expected = "'proj_out.weight' replaced"
    elif change == "replace a submodule":
        old = model.proj_out
        model.proj_out = torch.nn.Linear(old.in_features, old.out_features)
        expected = "'proj_out' replaced"
    else:
        model.double()
        kwargs = {k: v.double() if torch.is_floating_point(v) else v for k, v in kwargs.items() if k != "return_dict"}
        kwargs["return_dict"] = False
        expected = "replaced or reconfigured"
    with caplog.at_level(logging.INFO, logger="adacache_compile"):
        _assert_matches_model(cached, model, kwargs)
    assert cached.captures.captures_made == 2
    assert any(expected in r.getMessage() and "re-capturing" in r.getMessage() for r in caplog.records)


def test_a_change_seen_by_a_new_signature_drops_every_stale_capture(wan):
    model, kwargs, cached = wan
    _first_step(cached, kwargs)
    cached.add_adapter(_lora(3), adapter_name="late")
    smaller = {
        **kwargs,
        "hidden_states": kwargs["hidden_states"][:1],
        "encoder_hidden_states": kwargs["encoder_hidden_states"][:1],
        "timestep": kwargs["timestep"][:1],
    }
    cached.capture((), smaller)  # a new signature captured after the change
    assert len(cached.captures.entries) == 1, "the capture of the unchanged model was dropped"
    _assert_matches_model(cached, model, kwargs)


def test_reset_inside_generation_starts_it_anew(wan):
    _, kwargs, cached = wan
    with cached.generation(NUM_STEPS) as session:
        for _ in range(3):
            cached(**kwargs)
        cached._reset_stateful_cache()
        assert session.step == 0 and session.deltas is None
        cached(**kwargs)
        assert session.step == 1
    history = cached.stats["history"]
    assert [h["steps_run"] for h in history[-2:]] == [3, 1]
