import math

import pytest
import torch

from adacache_compile.testbed.metrics import psnr, psnr_per_video, ssim, ssim_per_video


def _videos(batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand((batch, 3, 8, 16, 16), generator=generator) - 0.5


def test_identical_videos_are_perfect():
    video = _videos()
    assert psnr(video, video.clone()) == math.inf
    assert ssim(video, video.clone()) == pytest.approx(1.0, abs=1e-12)
    assert psnr_per_video(video[0], video[0]) == [math.inf]


def test_psnr_of_known_noise_matches_analytic_value():
    video = _videos()
    sigma = 0.05
    noisy = video + sigma * torch.randn(video.shape, generator=torch.Generator().manual_seed(1))
    expected = 10 * math.log10(2.0**2 / sigma**2)  # data range 2 for [-1, 1]
    assert psnr(noisy, video) == pytest.approx(expected, abs=0.1)
    assert len(psnr_per_video(noisy, video)) == 2


def test_ssim_drops_with_noise_and_batch_mean_matches():
    video = _videos(3)
    generator = torch.Generator().manual_seed(2)
    slightly = video + 0.02 * torch.randn(video.shape, generator=generator)
    heavily = video + 0.5 * torch.randn(video.shape, generator=generator)
    assert 1.0 > ssim(slightly, video) > ssim(heavily, video)
    per_video = ssim_per_video(heavily, video)
    assert ssim(heavily, video) == pytest.approx(sum(per_video) / len(per_video), rel=1e-12)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="differs from reference"):
        psnr(torch.zeros(1, 3, 8, 16, 16), torch.zeros(1, 3, 8, 8, 8))
