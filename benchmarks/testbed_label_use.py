"""How much the testbed model uses its shape label: x0 error on noised held-out clips, right label vs a wrong one.

    python benchmarks/testbed_label_use.py [--checkpoint DIR]

For each timestep, the same 64 held-out clips and the same noise are denoised in one step with the right shape label,
a wrong one (another class), and the null label; the table prints the x0 MSE of each and wrong / right. A ratio near 1
means the model ignores the label at that noise level (the model card's table comes from this script).
"""

from __future__ import annotations

import argparse

import torch

from adacache_compile.testbed import HELD_OUT_SEED_BASE, load_testbed, make_batch

TIMESTEPS = (100, 200, 300, 400, 500, 600, 700, 800, 900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    testbed = load_testbed(args.checkpoint)
    if testbed.meta["objective"] != "v_prediction":
        raise SystemExit(f"testbed_label_use: expects a v_prediction checkpoint, got {testbed.meta['objective']!r}")
    videos, shapes, motions = make_batch(
        range(HELD_OUT_SEED_BASE + 7000, HELD_OUT_SEED_BASE + 7064), testbed.data_config
    )
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(videos.shape, generator=generator)
    num_shapes = testbed.cond.config.num_shapes
    wrong = (shapes + 1 + torch.randint(0, num_shapes - 1, shapes.shape, generator=generator)) % num_shapes
    family = testbed.family

    def x0_error(t: int, labels: torch.Tensor) -> float:
        timesteps = torch.full((len(videos),), t)
        noisy, _, _ = family.noised(videos, timesteps, noise)
        alpha_bar = family.alphas_cumprod()[timesteps].view(-1, 1, 1, 1, 1)
        with torch.no_grad():
            v = testbed.transformer(
                hidden_states=noisy,
                timestep=timesteps,
                encoder_hidden_states=testbed.cond(labels, motions),
                return_dict=False,
            )[0]
        x0 = alpha_bar.sqrt() * noisy - (1.0 - alpha_bar).sqrt() * v
        return (x0 - videos).square().mean().item()

    print("| t | x0 MSE right label | wrong label | null label | wrong / right |")
    print("|---|---|---|---|---|")
    for t in TIMESTEPS:
        right, other, null = x0_error(t, shapes), x0_error(t, wrong), x0_error(t, torch.full_like(shapes, -1))
        print(f"| {t} | {right:.4f} | {other:.4f} | {null:.4f} | {other / right:.3f} |")


if __name__ == "__main__":
    main()
