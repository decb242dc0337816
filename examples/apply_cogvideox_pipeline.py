"""AdaCache on a diffusers pipeline with `apply(pipe)`: CogVideoX.

With weights available:
    pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-2b", torch_dtype=torch.float16).to("cuda")
    adacache_compile.apply(pipe, "fast-30")
    video = pipe("a cat surfing a wave", num_inference_steps=50).frames[0]
    adacache_compile.remove(pipe)
Without them (as on CI), tiny random components built from configs show the same calls (nothing is downloaded).
"""

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

import adacache_compile as ac


def tiny_pipeline() -> CogVideoXPipeline:
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=16,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    # from_pretrained returns modules in eval mode; modules built from a config start in training mode, where
    # caching would be wrong (dropout), so the cached module would run them uncached.
    return CogVideoXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=CogVideoXDDIMScheduler(),
    )


def main():
    pipe = tiny_pipeline()
    prompt_embeds = torch.randn(1, 8, 16)
    call = dict(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=torch.zeros_like(prompt_embeds),
        num_inference_steps=20,
        height=16,
        width=16,
        num_frames=9,
        guidance_scale=6.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    ac.apply(pipe, "fast-30")
    video = pipe(**call).frames
    stats = pipe.transformer.stats["history"]
    ac.remove(pipe)
    print(f"video {tuple(video.shape)}; generations: {[(h['branch'], h['computed_steps']) for h in stats]}")


if __name__ == "__main__":
    main()
