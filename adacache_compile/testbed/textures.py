"""Procedural textures under a moving camera: the training data of the second testbed (``ltx-textures``).

Where the first testbed's clips are one or two small objects moving over a still background, every pixel of these
clips changes: a full-frame periodic pattern (stripes, checkerboard, concentric rings, a lattice of dots) in two
colours, seen through a camera that stays put, pans, rotates or zooms. Every clip is a pure function of its seed
(a private ``numpy.random.Generator``), like the first testbed's; training draws seeds below ``TRAIN_SEED_LIMIT``,
held-out evaluation uses seeds from ``HELD_OUT_SEED_BASE`` up.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .data import HELD_OUT_SEED_BASE, PALETTE, TRAIN_SEED_LIMIT, Clip

__all__ = [
    "PATTERNS",
    "CAMERA_MOTIONS",
    "HELD_OUT_SEED_BASE",
    "TRAIN_SEED_LIMIT",
    "TextureConfig",
    "make_clip",
    "make_batch",
    "pattern_value",
]

PATTERNS = ("stripes", "checker", "rings", "dots")
CAMERA_MOTIONS = ("static", "pan", "rotate", "zoom")


@dataclasses.dataclass(frozen=True)
class TextureConfig:
    """Geometry and sampling knobs of the texture clips."""

    frames: int = 8
    size: int = 16
    # Period of the pattern in pixels (at the first frame), drawn uniformly from this range.
    period: tuple[float, float] = (4.5, 8.0)
    # A zoom out shrinks the pattern on screen; its period at the last frame stays above this (16x16 frames alias
    # finer patterns).
    min_screen_period: float = 4.0
    pan_speed: tuple[float, float] = (0.6, 1.4)  # pixels per frame
    rotate_speed: tuple[float, float] = (0.10, 0.20)  # radians per frame, either sense
    zoom_rate: tuple[float, float] = (1.04, 1.08)  # scale factor per frame, in or out

    @property
    def num_shapes(self) -> int:
        return len(PATTERNS)

    @property
    def num_motion_buckets(self) -> int:
        return len(CAMERA_MOTIONS)


def pattern_value(pattern: str, u: np.ndarray, v: np.ndarray, period: float, phase: float) -> np.ndarray:
    """The pattern's value in [0, 1] at pattern coordinates (u, v) in pixels; smooth, so it stays anti-aliased."""
    k = 2.0 * math.pi / period
    if pattern == "stripes":
        return 0.5 + 0.5 * np.sin(k * u + phase)
    if pattern == "checker":
        return 1.0 / (1.0 + np.exp(-6.0 * np.sin(k * u + phase) * np.sin(k * v + phase)))
    if pattern == "rings":
        return 0.5 + 0.5 * np.sin(k * np.sqrt(u * u + v * v) + phase)
    if pattern == "dots":
        du = (np.mod(u / period + phase / (2 * math.pi), 1.0) - 0.5) * period
        dv = (np.mod(v / period + phase / (2 * math.pi), 1.0) - 0.5) * period
        return np.exp(-(du * du + dv * dv) / (2.0 * (0.22 * period) ** 2))
    raise ValueError(f"unknown pattern {pattern!r}; known: {PATTERNS}")


def _camera(rng: np.random.Generator, config: TextureConfig, motion: int, t: np.ndarray):
    """Per frame, the map from frame pixel offsets (x, y) around the centre to pattern coordinates (u, v)."""
    name = CAMERA_MOTIONS[motion]
    shift = np.zeros((len(t), 2))
    angle = np.zeros(len(t))
    scale = np.ones(len(t))
    if name == "pan":
        speed, heading = rng.uniform(*config.pan_speed), rng.uniform(0.0, 2.0 * math.pi)
        shift = np.stack([speed * math.cos(heading) * t, speed * math.sin(heading) * t], axis=1)
    elif name == "rotate":
        angle = rng.choice((-1.0, 1.0)) * rng.uniform(*config.rotate_speed) * t
    elif name == "zoom":
        rate = rng.uniform(*config.zoom_rate)
        scale = (rate if rng.random() < 0.5 else 1.0 / rate) ** t
    return shift, angle, scale


def make_clip(seed: int, config: TextureConfig | None = None) -> Clip:
    """The clip of ``seed``: ``shape`` is its pattern's index into PATTERNS, ``motion`` its camera's into
    CAMERA_MOTIONS."""
    config = config or TextureConfig()
    rng = np.random.default_rng(seed)
    pattern = int(rng.integers(len(PATTERNS)))
    motion = int(rng.integers(len(CAMERA_MOTIONS)))
    first, second = rng.choice(len(PALETTE), size=2, replace=False)
    dark = rng.uniform(0.25, 0.6)
    colours = (np.asarray(PALETTE[first]) * dark, np.asarray(PALETTE[second]))
    period = rng.uniform(*config.period)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    orientation = rng.uniform(0.0, math.pi)
    centre = rng.uniform(-2.0, 2.0, size=2)
    t = np.arange(config.frames, dtype=np.float64)
    shift, angle, scale = _camera(rng, config, motion, t)
    period = max(period, config.min_screen_period / scale.min())
    grid = np.arange(config.size) - config.size / 2 + 0.5
    x, y = grid[None, :] - centre[0], grid[:, None] - centre[1]
    frames = np.empty((3, config.frames, config.size, config.size))
    for f in range(config.frames):
        theta = orientation + angle[f]
        xs, ys = x / scale[f] + shift[f, 0], y / scale[f] + shift[f, 1]
        u = math.cos(theta) * xs + math.sin(theta) * ys
        v = -math.sin(theta) * xs + math.cos(theta) * ys
        value = pattern_value(PATTERNS[pattern], u, v, period, phase)
        frames[:, f] = colours[0][:, None, None] * (1.0 - value) + colours[1][:, None, None] * value
    video = torch.from_numpy(frames * 2.0 - 1.0).float()
    return Clip(video=video, shape=pattern, motion=motion)


def make_batch(seeds, config: TextureConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked clips of ``seeds``: videos [B, C, F, H, W], pattern labels [B], camera-motion labels [B]."""
    clips = [make_clip(int(seed), config) for seed in seeds]
    return (
        torch.stack([clip.video for clip in clips]),
        torch.tensor([clip.shape for clip in clips], dtype=torch.long),
        torch.tensor([clip.motion for clip in clips], dtype=torch.long),
    )
