"""Tiny random-init configs of the diffusers video transformers (built from config; nothing is downloaded), a small
hand-written DiT, and example inputs for each. Shared by the CLI (``inspect --model wan-tiny``), the tests, the
examples and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn


class TinyDiTBlock(nn.Module):
    """adaLN-gated pre-norm block: x + g1 * attn(norm(x)) + g2 * mlp(norm(x))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(dim, 4 * dim)

    def forward(self, x, temb):
        shift, scale, gate1, gate2 = self.ada(temb).unsqueeze(1).chunk(4, dim=-1)
        h = self.norm1(x) * (1 + scale) + shift
        x = x + gate1 * self.attn(h)
        return x + gate2 * self.mlp(self.norm2(x))

    def attn(self, h):
        b, n, c = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TinyVideoDiT(nn.Module):
    """A small hand-written video DiT over [B, C, F, H, W] latents with patch 2 and frame-major tokens."""

    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 2, depth: int = 4):
        super().__init__()
        self.patch = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(TinyDiTBlock(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, channels * 4)
        self.channels = channels

    def forward(self, hidden_states, timestep):
        b, c, f, h, w = hidden_states.shape
        x = self.patch(hidden_states).flatten(2).transpose(1, 2)
        temb = self.time(timestep.float().reshape(-1, 1) / 1000)
        for block in self.blocks:
            x = block(x, temb)
        x = self.out(x).reshape(b, f, h // 2, w // 2, c, 2, 2)
        return (x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w),)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed))


# family -> (diffusers class name, constructor kwargs)
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "latte": (
        "LatteTransformer3DModel",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            cross_attention_dim=16,
            sample_size=8,
            patch_size=2,
            caption_channels=16,
            video_length=3,
            norm_type="ada_norm_single",
            num_embeds_ada_norm=1000,
        ),
    ),
    "cogvideox": (
        "CogVideoXTransformer3DModel",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=16,
            num_layers=2,
            sample_width=8,
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            max_text_seq_length=6,
        ),
    ),
    "wan": (
        "WanTransformer3DModel",
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=32,
        ),
    ),
    "ltx": (
        "LTXVideoTransformer3DModel",
        dict(
            in_channels=4,
            out_channels=4,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            caption_channels=16,
        ),
    ),
    "hunyuan": (
        "HunyuanVideoTransformer3DModel",
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 2, 4),
        ),
    ),
    "mochi": (
        "MochiTransformer3DModel",
        dict(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            pooled_projection_dim=8,
            in_channels=4,
            text_embed_dim=16,
            time_embed_dim=8,
            max_sequence_length=5,
        ),
    ),
    "allegro": (
        "AllegroTransformer3DModel",
        dict(
            patch_size=2,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            cross_attention_dim=16,
            sample_height=8,
            sample_width=8,
            sample_frames=3,
            caption_channels=16,
        ),
    ),
}


def tiny_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random-init model of ``family`` in eval mode; ``overrides`` change constructor arguments."""
    torch.manual_seed(seed)
    if family == "tiny-dit":
        return TinyVideoDiT(**overrides).eval()
    import diffusers

    if family not in TINY_CONFIGS:
        raise KeyError(f"unknown tiny model family {family!r}; known: {FAMILIES}")
    class_name, config = TINY_CONFIGS[family]
    return getattr(diffusers, class_name)(**{**config, **overrides}).eval()


def example_inputs(family: str, batch: int = 2) -> dict:
    """A real call of ``tiny_model(family)`` (without ``return_dict``)."""
    b = batch
    t = torch.full((b,), 500, dtype=torch.long)
    text = _randn(b, 5, 16, seed=1)
    if family in ("tiny-dit",):
        return dict(hidden_states=_randn(b, 4, 3, 8, 8), timestep=t)
    if family in ("latte", "wan"):
        return dict(hidden_states=_randn(b, 4, 3, 8, 8), timestep=t, encoder_hidden_states=text)
    if family == "allegro":
        return dict(hidden_states=_randn(b, 4, 3, 8, 8), encoder_hidden_states=text, timestep=t)
    if family == "cogvideox":
        return dict(hidden_states=_randn(b, 3, 4, 8, 8), encoder_hidden_states=_randn(b, 6, 16, seed=1), timestep=t)
    if family == "ltx":
        return dict(
            hidden_states=_randn(b, 3 * 4 * 4, 4),
            encoder_hidden_states=text,
            timestep=t,
            encoder_attention_mask=torch.ones(b, 5),
            num_frames=3,
            height=4,
            width=4,
        )
    if family == "hunyuan":
        return dict(
            hidden_states=_randn(b, 4, 3, 8, 8),
            timestep=t,
            encoder_hidden_states=text,
            encoder_attention_mask=torch.ones(b, 5),
            pooled_projections=_randn(b, 8, seed=2),
            guidance=torch.full((b,), 3000.0),
        )
    if family == "mochi":
        return dict(
            hidden_states=_randn(b, 4, 3, 8, 8),
            encoder_hidden_states=text,
            timestep=t,
            encoder_attention_mask=torch.ones(b, 5, dtype=torch.bool),
        )
    raise KeyError(f"unknown tiny model family {family!r}; known: {FAMILIES}")


def build(family: str, batch: int = 2, seed: int = 0):
    """``(model, kwargs)`` for one family; the kwargs are a real call of the model."""
    return tiny_model(family, seed=seed), example_inputs(family, batch)


FAMILIES = ["tiny-dit", "latte", "cogvideox", "wan", "ltx", "hunyuan", "mochi", "allegro"]
