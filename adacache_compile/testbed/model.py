"""The testbed DiT: a small diffusers ``LatteTransformer3DModel`` in pixel space plus its label conditioning."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .data import DataConfig

__all__ = [
    "ModelConfig",
    "LtxModelConfig",
    "CondConfig",
    "LabelConditioner",
    "build_transformer",
    "build_ltx_transformer",
]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Size of the Latte transformer; frames and resolution come from the data config."""

    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    patch_size: int = 2
    caption_channels: int = 64

    def transformer_kwargs(self, data: DataConfig) -> dict:
        inner_dim = self.num_attention_heads * self.attention_head_dim
        return {
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": 3,
            "out_channels": 3,
            "num_layers": self.num_layers,
            # Latte projects captions to the inner width before cross-attention.
            "cross_attention_dim": inner_dim,
            "sample_size": data.size,
            "patch_size": self.patch_size,
            "activation_fn": "gelu-approximate",
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "caption_channels": self.caption_channels,
            "video_length": data.frames,
        }


@dataclasses.dataclass(frozen=True)
class CondConfig:
    num_shapes: int = 5
    num_motion_buckets: int = 4
    caption_channels: int = 64
    # Probability during training that both labels are replaced by the null condition (for CFG).
    label_dropout: float = 0.1


def build_transformer(model: ModelConfig, data: DataConfig):
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(**model.transformer_kwargs(data))


class LabelConditioner(nn.Module):
    """(shape class, motion bucket) -> ``encoder_hidden_states`` [B, 2, caption_channels], one token per label.

    Index ``num_shapes`` / ``num_motion_buckets`` (i.e. label ``-1`` after :meth:`forward` maps it) is the learned
    null token used for the unconditional branch of classifier-free guidance.
    """

    def __init__(self, config: CondConfig):
        super().__init__()
        self.config = config
        self.shape_embedding = nn.Embedding(config.num_shapes + 1, config.caption_channels)
        self.motion_embedding = nn.Embedding(config.num_motion_buckets + 1, config.caption_channels)
        nn.init.normal_(self.shape_embedding.weight, std=1.0)
        nn.init.normal_(self.motion_embedding.weight, std=1.0)

    def forward(self, shapes: torch.Tensor, motions: torch.Tensor) -> torch.Tensor:
        """Labels [B] (long); a negative label selects the null token."""
        shapes = torch.where(shapes < 0, self.config.num_shapes, shapes)
        motions = torch.where(motions < 0, self.config.num_motion_buckets, motions)
        return torch.stack([self.shape_embedding(shapes), self.motion_embedding(motions)], dim=1)

    def null(self, batch_size: int) -> torch.Tensor:
        labels = torch.full((batch_size,), -1, dtype=torch.long, device=self.shape_embedding.weight.device)
        return self(labels, labels)


@dataclasses.dataclass(frozen=True)
class LtxModelConfig:
    """Size of the second testbed's LTX-Video transformer. Its input is the pipeline's packed tokens: patches of
    ``patch_size_t x patch_size x patch_size`` RGB pixels flattened into channels, as ``LTXPipeline._pack_latents``
    packs a VAE latent."""

    num_layers: int = 6
    num_attention_heads: int = 4
    # 4 x 24 = 96 channels: LTX's rotary embedding splits the width over 3 axes x (cos, sin), so a multiple of 6 uses
    # all of it.
    attention_head_dim: int = 24
    patch_size: int = 2
    # Two frames per token, as LTX's VAE compresses time: 256 tokens per clip, 3.7x cheaper to train on CPU than one
    # frame per token (0.40 s against 1.46 s per batch of 16 on the 2-core machine).
    patch_size_t: int = 2
    caption_channels: int = 64

    @property
    def token_channels(self) -> int:
        return 3 * self.patch_size_t * self.patch_size * self.patch_size

    def transformer_kwargs(self, data) -> dict:
        inner_dim = self.num_attention_heads * self.attention_head_dim
        return {
            "in_channels": self.token_channels,
            "out_channels": self.token_channels,
            # The packing happens outside the transformer (as in LTXPipeline); its own patch sizes only scale the
            # rotary coordinates, which the testbed leaves at the integer token grid.
            "patch_size": 1,
            "patch_size_t": 1,
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "cross_attention_dim": inner_dim,
            "num_layers": self.num_layers,
            "caption_channels": self.caption_channels,
        }


def build_ltx_transformer(model: LtxModelConfig, data):
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(**model.transformer_kwargs(data))
