"""Which shape a testbed video shows: template matching against the data generator's own shapes.

A check that samples are recognisable shapes, not only coloured blobs: the labelled object is segmented (objects are
saturated colours, backgrounds are dark), and each frame's largest object is compared, by intersection over union,
with every shape class rendered at a range of sizes and sub-pixel offsets around the object's centroid. The video's
class is the majority vote over its frames. The same classifier run on generated clips gives its own ceiling.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from .data import MOTION_BUCKET_NAMES, SHAPES, shape_index, signed_distance

__all__ = [
    "FOREGROUND_LEVEL",
    "classify_shape",
    "recognised",
    "label_accuracy",
    "sample_labels",
    "sample_accuracy",
    "main",
]

# Foreground threshold on the brightest channel in [0, 1]: every palette colour has a channel at 1.0, every background
# channel is at most 0.35.
FOREGROUND_LEVEL = 0.6
_RADII = np.linspace(2.4, 4.8, 13)
_OFFSETS = np.linspace(-0.75, 0.75, 4)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _frame_scores(mask: np.ndarray) -> np.ndarray:
    """Best IoU of each shape class with the object mask [H, W]."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    grid_y, grid_x = np.arange(mask.shape[0]) + 0.5, np.arange(mask.shape[1]) + 0.5
    scores = np.zeros(len(SHAPES))
    for index, shape in enumerate(SHAPES):
        for oy in _OFFSETS:
            for ox in _OFFSETS:
                dx, dy = grid_x[None, :] - (cx + ox), grid_y[:, None] - (cy + oy)
                for radius in _RADII:
                    template = signed_distance(shape, dx, dy, radius) < 0.0
                    union = np.logical_or(template, mask).sum()
                    scores[index] = max(scores[index], np.logical_and(template, mask).sum() / max(union, 1))
    return scores


def classify_shape(video: torch.Tensor, min_pixels: int = 6) -> int | None:
    """Shape class index of a video [C, F, H, W] in [-1, 1], or None when no frame holds an object."""
    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0).amax(dim=0).numpy() > FOREGROUND_LEVEL
    votes = Counter()
    for mask in frames:
        if mask.sum() < min_pixels:
            continue
        mask = _largest_component(mask)
        if mask.sum() < min_pixels:
            continue
        votes[int(np.argmax(_frame_scores(mask)))] += 1
    return votes.most_common(1)[0][0] if votes else None


def recognised(videos: torch.Tensor, shapes) -> list[bool]:
    """Per video [B, C, F, H, W]: does :func:`classify_shape` assign it to its shape label (index or name)?"""
    return [classify_shape(video) == shape_index(shape) for video, shape in zip(videos, shapes)]


def label_accuracy(videos: torch.Tensor, shapes) -> float:
    """Fraction of videos [B, C, F, H, W] that :func:`classify_shape` assigns to their shape label (index or name)."""
    hits = recognised(videos, shapes)
    return sum(hits) / len(hits)


def sample_labels(testbed, seeds_per_label: int = 2, num_steps: int = 50, guidance_scale: float | None = None):
    """Sample ``seeds_per_label`` videos of every (shape, motion bucket) label, uncached; returns (videos, labels).
    Seeds are 0, 1, 2, ... in label order."""
    from .data import MOTION_BUCKET_SPEEDS
    from .sample import DEFAULT_GUIDANCE_SCALE, sample

    labels = [
        (s, m) for s in range(len(SHAPES)) for m in range(len(MOTION_BUCKET_SPEEDS)) for _ in range(seeds_per_label)
    ]
    videos = sample(
        testbed.transformer,
        testbed,
        labels,
        list(range(len(labels))),
        num_steps=num_steps,
        guidance_scale=DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale,
        progress=False,
    )
    return videos, labels


def sample_accuracy(testbed, seeds_per_label: int = 2, num_steps: int = 50, guidance_scale: float | None = None):
    """:func:`sample_labels`, then the fraction recognised as their shape label; returns (accuracy, videos, labels)."""
    videos, labels = sample_labels(testbed, seeds_per_label, num_steps, guidance_scale)
    return label_accuracy(videos, [s for s, _ in labels]), videos, labels


def main(argv=None) -> None:
    import argparse

    from . import CHECKPOINT_DIR, load_testbed
    from .data import HELD_OUT_SEED_BASE, make_batch, motion_per_bucket

    parser = argparse.ArgumentParser(description="Shape-label accuracy of a testbed checkpoint's uncached samples.")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT_DIR))
    parser.add_argument("--seeds-per-label", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=None)
    args = parser.parse_args(argv)
    testbed = load_testbed(args.checkpoint)
    videos, labels = sample_labels(testbed, args.seeds_per_label, args.steps, args.guidance_scale)
    hits = recognised(videos, [s for s, _ in labels])
    print(
        f"{len(labels)} samples, recognised as their labelled shape: {sum(hits) / len(hits):.1%} (chance {1 / len(SHAPES):.0%})"
    )
    print("per shape: " + ", ".join(f"{shape} {_rate(hits, labels, 0, i):.0%}" for i, shape in enumerate(SHAPES)))
    print(
        "per motion bucket: "
        + ", ".join(f"{name} {_rate(hits, labels, 1, i):.0%}" for i, name in enumerate(MOTION_BUCKET_NAMES))
    )
    # Does the motion label steer the motion? Mean frame-to-frame change per bucket, samples vs training clips.
    data_videos, _, data_motions = make_batch(range(HELD_OUT_SEED_BASE, HELD_OUT_SEED_BASE + 256), testbed.data_config)
    sample_motion = motion_per_bucket(videos, [m for _, m in labels])
    data_motion = motion_per_bucket(data_videos, data_motions)
    print(
        "motion (mean |frame difference|), samples / held-out clips: "
        + ", ".join(
            f"{name} {sample:.3f} / {data:.3f}"
            for name, sample, data in zip(MOTION_BUCKET_NAMES, sample_motion, data_motion)
        )
    )


def _rate(hits: list[bool], labels: list[tuple[int, int]], field: int, value: int) -> float:
    group = [hit for hit, label in zip(hits, labels) if label[field] == value]
    return sum(group) / len(group)


if __name__ == "__main__":
    main()
