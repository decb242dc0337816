"""Tiny diffusers video pipelines built from config (nothing downloaded): random transformer, VAE and text encoder,
and a word-level tokenizer built with the ``tokenizers`` library."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan, CogVideoXDDIMScheduler, CogVideoXPipeline, WanPipeline
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from adacache_compile.testbed.tiny_models import tiny_model

WORDS = ["a", "cat", "runs", "on", "the", "beach", "blurry", "low", "quality", "dog"]


# UMT5 (Wan) and T5 (CogVideoX) share these sizes: one layer, 16 wide, the word-level vocabulary below.
TEXT_ENCODER = dict(
    vocab_size=len(WORDS) + 3,
    d_model=16,
    d_kv=8,
    d_ff=32,
    num_layers=1,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)


def _assemble(pipeline_class, text_encoder, vae, transformer, scheduler):
    pipe = pipeline_class(
        tokenizer=tiny_tokenizer(),
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_wan_pipeline(scheduler) -> WanPipeline:
    torch.manual_seed(0)
    transformer = tiny_model("wan")
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return _assemble(WanPipeline, UMT5EncoderModel(UMT5Config(**TEXT_ENCODER)), vae, transformer, scheduler)


def tiny_cogvideox_pipeline() -> CogVideoXPipeline:
    """Latents of a 16x16, 9-frame video are [B, 3, 4, 2, 2] (VAE: 8x spatial, 4x temporal compression)."""
    torch.manual_seed(0)
    transformer = tiny_model(
        "cogvideox",
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        temporal_compression_ratio=4,
        text_embed_dim=16,
        max_text_seq_length=8,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    text_encoder = T5EncoderModel(T5Config(**TEXT_ENCODER))
    return _assemble(CogVideoXPipeline, text_encoder, vae, transformer, CogVideoXDDIMScheduler())
