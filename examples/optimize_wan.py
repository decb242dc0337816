"""AdaCache on a Wan transformer with `optimize(model)`: a drop-in module for a hand-written denoising loop.

With weights available, load the real model:
    transformer = WanTransformer3DModel.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", subfolder="transformer",
                                                        torch_dtype=torch.bfloat16).to("cuda")
Without them (as on CI), a tiny random config of the same class shows the same API.
"""

import argparse

import torch
from diffusers import WanTransformer3DModel

import adacache_compile as ac


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", help="a Wan diffusers repo id or path (needs the weights)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.pretrained:
        transformer = WanTransformer3DModel.from_pretrained(args.pretrained, subfolder="transformer")
    else:
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            freq_dim=32,
            ffn_dim=64,
            num_layers=4,
            rope_max_seq_len=32,
        )
    transformer.eval()
    cached = ac.optimize(transformer, ac.AdaCacheConfig.preset("fast-30"), num_steps=args.steps)

    latents = torch.randn(1, transformer.config.in_channels, 5, 16, 16)
    text = torch.randn(1, 8, transformer.config.text_dim)
    with cached.generation(num_steps=args.steps), torch.no_grad():
        for t in torch.linspace(999, 0, args.steps):
            velocity = cached(latents, timestep=t.expand(1), encoder_hidden_states=text, return_dict=False)[0]
            latents = latents - velocity / args.steps
    stats = cached.stats["history"][-1]
    print(cached.plan.describe())
    print(f"computed {len(stats['computed_steps'])}/{args.steps} steps: {stats['computed_steps']}")


if __name__ == "__main__":
    main()
