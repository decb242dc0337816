"""Forecasting the cached residual: host-side extrapolation weights in the step index (ours, not the reference's).

A skip step of the reference reuses the fused delta of the last computed step (zero-order hold). With
``AdaCacheConfig.forecast_order = p`` the runtime keeps the deltas of the last ``p + 1`` computed steps and the skip
program adds, per stream, ``sum_j w_j * D_j``: the value at the current step of the polynomial of degree ``p``
through the stored deltas (Newton's interpolating polynomial on the irregular steps at which they were computed,
written in its Lagrange form so that the program only needs ``p + 1`` scalars). While fewer than ``p + 1`` computed
steps exist the order falls back to what they allow; unused slots get weight 0.

The same weights forecast the metric tap for the forecast decision metric (``AdaCacheConfig.metric = "forecast"``):
on a computed step the full program measures how far the tap is from the tap forecast from the previous computed
steps, which is the error a skip of that length would have made.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["extrapolation_weights", "forecast", "weights_dtype", "LOW_PRECISION"]

# Dtypes whose weighted sums are accumulated in float32 (weights such as (3, -3, 1) cancel).
LOW_PRECISION = (torch.float16, torch.bfloat16)


def weights_dtype(delta_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the skip program's ``forecast_weights``: float32, float64 for float64 deltas."""
    return torch.float64 if delta_dtype == torch.float64 else torch.float32


def extrapolation_weights(steps: Sequence[int], at: int, slots: int) -> list[float]:
    """Weights ``w`` (length ``slots``) with ``P(at) = sum_j w[j] * value[j]`` for the polynomial ``P`` of degree
    ``len(steps) - 1`` through ``(steps[j], value[j])``; ``steps`` newest first, distinct; slots past ``len(steps)``
    get 0."""
    if not steps:
        raise ValueError("extrapolation_weights: needs at least one computed step")
    if len(steps) > slots:
        raise ValueError(f"extrapolation_weights: {len(steps)} steps for {slots} slots")
    if len(set(steps)) != len(steps):
        raise ValueError(f"extrapolation_weights: steps must be distinct, got {list(steps)}")
    weights = []
    for j, t_j in enumerate(steps):
        w = 1.0
        for k, t_k in enumerate(steps):
            if k != j:
                w *= (at - t_k) / (t_j - t_k)
        weights.append(w)
    return weights + [0.0] * (slots - len(steps))


def forecast(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_j weights[j] * values[j]`` (float32 accumulation for :data:`LOW_PRECISION` values), in the values' dtype:
    the tap forecast on the host; the skip program computes the same combination of the deltas in its graph."""
    dtype = values[0].dtype
    work = torch.float32 if dtype in LOW_PRECISION else dtype
    total = values[0].to(work) * weights[0]
    for value, weight in zip(values[1:], weights[1:]):
        if weight != 0.0:
            total = total + value.to(work) * weight
    return total.to(dtype)
