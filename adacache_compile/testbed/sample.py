"""DDIM sampling with batched classifier-free guidance, and writers for videos and comparison sheets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "sample",
    "initial_noise",
    "to_uint8_frames",
    "save_gif",
    "save_mp4",
    "side_by_side_png",
]

# Chosen on the shipped checkpoint (model card): at 1.5 the samples' shapes are recognised as often as at 2 and more
# often than at 3, their frame-to-frame motion per bucket is closest to the training clips', and static videos stay
# clean; from 2 up, guidance turns static-bucket videos into textured patches and exaggerates motion.
DEFAULT_GUIDANCE_SCALE = 1.5


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """[B, *shape] standard normal noise, row b drawn from its own generator seeded with ``seeds[b]``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds])


def sample(
    transformer,
    testbed,
    labels: Sequence[tuple[int, int]],
    seeds: Sequence[int],
    num_steps: int = 50,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Generate one video per label pair and seed; returns [B, C, F, H, W] in [-1, 1].

    ``transformer`` is any module with the call signature of the testbed's transformer (the transformer itself or a
    cached drop-in); it is called once per step, as the family's pipeline calls it, with the conditional and
    unconditional halves stacked in the batch. The sampler is the family's (latte-shapes: DDIM; ltx-textures:
    flow-matching Euler); ``guidance_scale`` defaults to the testbed's.
    """
    if len(labels) != len(seeds):
        raise ValueError(f"sample: {len(labels)} labels but {len(seeds)} seeds; give one seed per video")
    guidance_scale = testbed.default_guidance_scale if guidance_scale is None else guidance_scale
    scheduler = testbed.scheduler(num_steps)
    latents = initial_noise(seeds, testbed.video_shape)
    cond = testbed.make_condition(labels)
    encoder_hidden_states = torch.cat([cond, testbed.cond.null(len(labels))])
    steps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    with torch.no_grad():
        for t in steps:
            model_input = torch.cat([latents, latents])
            timestep = t.expand(model_input.shape[0])
            prediction = testbed.predict(transformer, model_input, timestep, encoder_hidden_states)
            pred_cond, pred_uncond = prediction.chunk(2)
            guided = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            latents = scheduler.step(guided, t, latents).prev_sample
    return latents.clamp(-1.0, 1.0)


def to_uint8_frames(video: torch.Tensor, upscale: int = 1) -> np.ndarray:
    """[C, F, H, W] in [-1, 1] -> [F, H*upscale, W*upscale, C] uint8, nearest-neighbour upscaled."""
    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    frames = frames.permute(1, 2, 3, 0).numpy()
    return frames.repeat(upscale, axis=1).repeat(upscale, axis=2)


def save_gif(video: torch.Tensor, path, upscale: int = 8, fps: int = 4) -> Path:
    import imageio.v3 as iio

    path = Path(path)
    iio.imwrite(path, to_uint8_frames(video, upscale), duration=1000 / fps, loop=0)
    return path


def save_mp4(video: torch.Tensor, path, upscale: int = 8, fps: int = 4) -> Path:
    """Needs the imageio-ffmpeg plugin; H.264 wants even sizes, which any ``upscale`` >= 2 of our clips gives."""
    import imageio.v3 as iio

    path = Path(path)
    iio.imwrite(path, to_uint8_frames(video, upscale), fps=fps, codec="libx264")
    return path


def side_by_side_png(rows: Mapping[str, torch.Tensor], path, upscale: int = 6, gap: int = 2) -> Path:
    """A grid with one row per method (label on the left) and one column per frame.

    Values of ``rows`` are videos [C, F, H, W], or [B, C, F, H, W] which become B consecutive rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strips, names = [], []
    for name, video in rows.items():
        videos = video if video.dim() == 5 else video.unsqueeze(0)
        for index, single in enumerate(videos):
            frames = to_uint8_frames(single, upscale)
            padded = np.pad(frames, ((0, 0), (0, 0), (0, gap), (0, 0)), constant_values=255)
            strips.append(np.concatenate(list(padded), axis=1)[:, :-gap])
            names.append(name if len(videos) == 1 else f"{name} [{index}]")
    height, width = strips[0].shape[:2]
    fig, axes = plt.subplots(
        len(strips), 1, figsize=(width / 80 + 1.5, len(strips) * (height / 80 + 0.15)), squeeze=False
    )
    for axis, strip, name in zip(axes[:, 0], strips, names):
        axis.imshow(strip, interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80, bbox_inches="tight")  # keeps the long row labels inside the image
    plt.close(fig)
    return path
