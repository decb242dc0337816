"""Capture falls back instead of failing: dynamic, then batch-only dynamic, then static, with one warning."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from tiny_models import TinyVideoDiT

from adacache_compile import AdaCacheConfig, optimize
from adacache_compile.errors import CaptureError, UnsupportedModelError


class NumpyScaledDiT(TinyVideoDiT):
    """Host math on a spatial size, as diffusers' Cosmos does: numpy cannot take a symbolic size."""

    def forward(self, hidden_states, timestep):
        scale = float(np.sqrt(hidden_states.shape[-1]))
        return super().forward(hidden_states / scale, timestep)


class NumpyBatchDiT(TinyVideoDiT):
    def forward(self, hidden_states, timestep):
        return super().forward(hidden_states * float(np.log1p(hidden_states.shape[0])), timestep)


class ValueBranchDiT(TinyVideoDiT):
    def forward(self, hidden_states, timestep):
        if hidden_states.sum() > 0:  # data-dependent control flow: no capture mode serves it
            hidden_states = hidden_states * 2
        return super().forward(hidden_states, timestep)


class FrameBranchDiT(TinyVideoDiT):
    """Branches on a dynamic size, as a model with a long-video path does."""

    def forward(self, hidden_states, timestep):
        if hidden_states.shape[2] > 8:  # frames
            hidden_states = hidden_states * 0.5
        return super().forward(hidden_states, timestep)


def _kwargs(batch: int = 2, width: int = 8, frames: int = 3) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(batch, 4, frames, 8, width, generator=generator),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
    }


def _one_step(cached, kwargs: dict):
    """One call as a one-step generation (step 1 is always computed): repeated calls at one timestep outside a
    generation are refused as ambiguous (the next step, or another CFG branch?)."""
    with cached.generation(num_steps=1):
        return cached(**kwargs)


def _capture_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "dynamic capture failed" in r.getMessage()]


def test_numpy_on_a_spatial_size_captures_with_batch_dynamic_and_one_warning(caplog):
    model = NumpyScaledDiT().eval()
    with caplog.at_level(logging.WARNING, logger="adacache_compile"):
        cached = optimize(model, AdaCacheConfig(codebook=((10.0, 3),)), example_inputs=_kwargs())
    (message,) = _capture_warnings(caplog)
    assert "captured with batch shapes: every dim but dim 0 (batch) is now static" in message
    assert "test_capture.py" in message and "np.sqrt(hidden_states.shape[-1])" in message
    spec = cached.captures.latest().captured.input_specs[0]
    assert spec.shape == (None, 4, 3, 8, 8), "batch stays dynamic, the rest is static"
    with torch.no_grad():
        for batch in (1, 3):
            assert torch.allclose(_one_step(cached, _kwargs(batch))[0], model(**_kwargs(batch))[0], atol=1e-5)
        assert len(cached.captures.entries) == 1, "other batch sizes need no new capture"
        other = _kwargs(width=12)
        assert torch.allclose(_one_step(cached, other)[0], model(**other)[0], atol=1e-5)
    assert len(cached.captures.entries) == 2, "another width is captured anew"


def test_a_branch_on_a_dynamic_size_keeps_its_bound_and_a_call_outside_captures_anew():
    model = FrameBranchDiT().eval()
    cached = optimize(model, AdaCacheConfig(codebook=((10.0, 3),)), example_inputs=_kwargs(frames=16))
    spec = cached.captures.latest().captured.input_specs[0]
    assert spec.shape[2] is None and spec.ranges[2][0] == 9, "the captured branch holds for frames >= 9 only"
    with torch.no_grad():
        for frames in (12, 4):  # inside the captured range, then the other branch
            kwargs = _kwargs(frames=frames)
            expected = model(**kwargs)[0]
            # Same float32 kernels on the same inputs, one graph against the other: 1e-5 of values of order 1.
            assert torch.allclose(_one_step(cached, kwargs)[0], expected, atol=1e-5), frames
    assert len(cached.captures.entries) == 2, "4 frames is outside [9, inf): captured anew"


def test_numpy_on_the_batch_size_falls_back_to_static():
    model = NumpyBatchDiT().eval()
    cached = optimize(model, AdaCacheConfig(codebook=((10.0, 3),)), example_inputs=_kwargs())
    assert cached.captures.latest().captured.input_specs[0].shape == (2, 4, 3, 8, 8)


def test_a_model_no_capture_mode_serves_is_refused_naming_the_frame():
    with pytest.raises(CaptureError, match=r"failed with static shapes: .* \(at .*test_capture.py:\d+ in forward") as e:
        optimize(ValueBranchDiT().eval(), AdaCacheConfig(codebook=((10.0, 3),)), example_inputs=_kwargs())
    assert isinstance(e.value, UnsupportedModelError)


def test_a_model_that_captures_dynamically_gets_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="adacache_compile"):
        cached = optimize(TinyVideoDiT().eval(), AdaCacheConfig(codebook=((10.0, 3),)), example_inputs=_kwargs())
    assert not _capture_warnings(caplog)
    assert cached.captures.latest().captured.input_specs[0].shape[0] is None


def test_a_call_constant_array_is_compared_by_its_bytes_not_its_repr():
    from adacache_compile.capture import call_signature

    table = np.zeros(5000, dtype=np.float32)
    changed = table.copy()
    changed[2500] = 1.0  # in the part of the array that its repr elides with "..."
    assert repr(table) == repr(changed)
    (_, same), (_, again), (_, other) = (call_signature(None, (), {"table": t}) for t in (table, table.copy(), changed))
    assert same == again and same != other


def test_capture_prints_no_leafspec_deprecation():
    model = TinyVideoDiT().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimize(model, AdaCacheConfig(codebook=((10.0, 3),)), example_inputs=_kwargs())
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
