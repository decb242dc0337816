"""Procedural videos of moving shapes: the training data of the testbed DiT.

Every clip is a pure function of its seed (a private ``numpy.random.Generator``; global RNG is never touched), so
training, tests and benchmarks can name clips by seed. Training draws seeds below ``TRAIN_SEED_LIMIT``; held-out
evaluation uses seeds from ``HELD_OUT_SEED_BASE`` up.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

__all__ = [
    "SHAPES",
    "MOTION_BUCKET_SPEEDS",
    "MOTION_BUCKET_NAMES",
    "TRAIN_SEED_LIMIT",
    "HELD_OUT_SEED_BASE",
    "DataConfig",
    "Clip",
    "make_clip",
    "shape_index",
    "signed_distance",
    "make_batch",
    "measured_motion",
    "motion_per_bucket",
]

SHAPES = ("square", "disc", "triangle", "cross")
# Speed range in pixels per frame of each motion bucket: static, slow, medium, fast.
MOTION_BUCKET_SPEEDS = ((0.0, 0.0), (0.35, 0.6), (0.9, 1.3), (1.8, 2.6))
MOTION_BUCKET_NAMES = ("static", "slow", "medium", "fast")
TRAIN_SEED_LIMIT = 1 << 30
HELD_OUT_SEED_BASE = 1 << 31
# Saturated colours that stay distinct from every background below.
PALETTE = (
    (1.0, 0.2, 0.2),
    (0.2, 1.0, 0.3),
    (0.3, 0.5, 1.0),
    (1.0, 0.9, 0.2),
    (1.0, 0.3, 1.0),
    (0.2, 1.0, 1.0),
    (1.0, 1.0, 1.0),
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Geometry and sampling knobs of the synthetic clips."""

    frames: int = 8
    size: int = 16
    # Half-extent of a shape in pixels, drawn uniformly from this range.
    radius: tuple[float, float] = (3.4, 4.4)
    second_object_prob: float = 0.2
    gradient_background_prob: float = 0.5

    @property
    def num_shapes(self) -> int:
        return len(SHAPES)

    @property
    def num_motion_buckets(self) -> int:
        return len(MOTION_BUCKET_SPEEDS)


@dataclasses.dataclass
class Clip:
    video: torch.Tensor  # [C, F, H, W] in [-1, 1]
    shape: int  # index into SHAPES of the labelled (first) object
    motion: int  # index into MOTION_BUCKET_SPEEDS


def signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance in pixels (negative inside) of a shape centred at the origin."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "square":
        return np.maximum(ax, ay) - r * 0.85
    if shape == "disc":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "triangle":
        # Upward-pointing triangle as the intersection of three half-planes (y grows downwards).
        s = math.sqrt(3.0) / 2.0
        return np.maximum(np.maximum(dy - r * 0.6, s * dx - 0.5 * dy - r * 0.6), -s * dx - 0.5 * dy - r * 0.6)
    if shape == "cross":
        arm = r * 0.35
        return np.minimum(np.maximum(ax - r, ay - arm), np.maximum(ax - arm, ay - r))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def shape_index(shape: str | int) -> int:
    """Index into SHAPES of a shape given by name ("disc") or index."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
        return SHAPES.index(shape)
    return int(shape)


def _bounce(start: float, velocity: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Positions of a point moving at constant speed and reflecting off the walls lo and hi."""
    span = hi - lo
    u = np.mod(start - lo + velocity * t, 2.0 * span)
    return lo + np.where(u > span, 2.0 * span - u, u)


def _background(rng: np.random.Generator, config: DataConfig) -> np.ndarray:
    dark = rng.uniform(0.0, 0.25, size=3)
    if rng.random() >= config.gradient_background_prob:
        return np.broadcast_to(dark[:, None, None], (3, config.size, config.size)).copy()
    other = rng.uniform(0.0, 0.35, size=3)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    coords = (np.arange(config.size) + 0.5) / config.size - 0.5
    ramp = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    return dark[:, None, None] * (1.0 - ramp) + other[:, None, None] * ramp


def _draw_object(rng: np.random.Generator, config: DataConfig, frames: np.ndarray, shape: int, motion: int) -> None:
    radius = rng.uniform(*config.radius)
    colour = np.asarray(PALETTE[rng.integers(len(PALETTE))])
    speed = rng.uniform(*MOTION_BUCKET_SPEEDS[motion])
    heading = rng.uniform(0.0, 2.0 * math.pi)
    lo, hi = radius, config.size - radius
    t = np.arange(config.frames, dtype=np.float64)
    xs = _bounce(rng.uniform(lo, hi), speed * math.cos(heading), t, lo, hi)
    ys = _bounce(rng.uniform(lo, hi), speed * math.sin(heading), t, lo, hi)
    grid = np.arange(config.size) + 0.5
    for f in range(config.frames):
        dx = grid[None, :] - xs[f]
        dy = grid[:, None] - ys[f]
        # One-pixel linear ramp at the edge: anti-aliasing makes sub-pixel motion visible.
        alpha = np.clip(0.5 - signed_distance(SHAPES[shape], dx, dy, radius), 0.0, 1.0)
        frames[:, f] = frames[:, f] * (1.0 - alpha) + colour[:, None, None] * alpha


def make_clip(seed: int, config: DataConfig | None = None) -> Clip:
    """The clip of ``seed``: one labelled object (sometimes a second, unlabelled one of the same motion bucket)."""
    config = config or DataConfig()
    rng = np.random.default_rng(seed)
    shape = int(rng.integers(config.num_shapes))
    motion = int(rng.integers(config.num_motion_buckets))
    background = _background(rng, config)
    frames = np.repeat(background[:, None], config.frames, axis=1)
    if rng.random() < config.second_object_prob:
        _draw_object(rng, config, frames, int(rng.integers(config.num_shapes)), motion)
    _draw_object(rng, config, frames, shape, motion)
    video = torch.from_numpy(frames * 2.0 - 1.0).float()
    return Clip(video=video, shape=shape, motion=motion)


def make_batch(seeds, config: DataConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked clips of ``seeds``: videos [B, C, F, H, W], shape labels [B], motion labels [B]."""
    clips = [make_clip(int(seed), config) for seed in seeds]
    videos = torch.stack([clip.video for clip in clips])
    shapes = torch.tensor([clip.shape for clip in clips], dtype=torch.long)
    motions = torch.tensor([clip.motion for clip in clips], dtype=torch.long)
    return videos, shapes, motions


def measured_motion(video: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between consecutive frames; video [..., C, F, H, W] -> [...]."""
    return (video[..., 1:, :, :] - video[..., :-1, :, :]).abs().mean(dim=(-4, -3, -2, -1))


def motion_per_bucket(videos: torch.Tensor, buckets) -> list[float]:
    """Mean :func:`measured_motion` of videos [B, C, F, H, W] per motion bucket (``buckets``: B bucket indices);
    NaN for a bucket with no video."""
    motion, buckets = measured_motion(videos), torch.as_tensor(buckets)
    return [motion[buckets == bucket].mean().item() for bucket in range(len(MOTION_BUCKET_SPEEDS))]
