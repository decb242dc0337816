"""Fidelity of a (cached) video against its uncached reference: PSNR and SSIM from scikit-image.

Videos are torch tensors in [-1, 1], [B, C, F, H, W] or a single [C, F, H, W]. SSIM is computed per frame (RGB,
``channel_axis``) and averaged over frames, as video-generation papers report it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DATA_RANGE", "psnr", "ssim", "psnr_per_video", "ssim_per_video"]

# Width of the [-1, 1] value range.
DATA_RANGE = 2.0


def _as_batches(video: torch.Tensor, reference: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    if video.shape != reference.shape:
        raise ValueError(f"video shape {tuple(video.shape)} differs from reference shape {tuple(reference.shape)}")
    if video.dim() == 4:
        video, reference = video.unsqueeze(0), reference.unsqueeze(0)
    if video.dim() != 5:
        raise ValueError(f"expected [B, C, F, H, W] or [C, F, H, W], got shape {tuple(video.shape)}")

    def to_numpy(x: torch.Tensor) -> np.ndarray:
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()

    return to_numpy(video), to_numpy(reference)


def psnr_per_video(video: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """PSNR in dB of each video over all its pixels; ``inf`` for an identical video."""
    from skimage.metrics import peak_signal_noise_ratio

    videos, references = _as_batches(video, reference)
    scores = []
    for v, r in zip(videos, references):
        # skimage divides by an MSE of zero with a warning; an exact match is infinite PSNR by definition.
        scores.append(
            float("inf") if np.array_equal(v, r) else float(peak_signal_noise_ratio(r, v, data_range=DATA_RANGE))
        )
    return scores


def ssim_per_video(video: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """SSIM of each video, averaged over its frames."""
    from skimage.metrics import structural_similarity

    videos, references = _as_batches(video, reference)
    scores = []
    for v, r in zip(videos, references):
        frames = [
            structural_similarity(r[:, f], v[:, f], data_range=DATA_RANGE, channel_axis=0) for f in range(v.shape[1])
        ]
        scores.append(float(np.mean(frames)))
    return scores


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over the batch of :func:`psnr_per_video`."""
    return float(np.mean(psnr_per_video(video, reference)))


def ssim(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over the batch of :func:`ssim_per_video`."""
    return float(np.mean(ssim_per_video(video, reference)))
