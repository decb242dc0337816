"""The testbed DiT: a small diffusers ``LatteTransformer3DModel`` in pixel space plus its label conditioning."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .data import DataConfig

__all__ = ["ModelConfig", "CondConfig", "LabelConditioner", "build_transformer"]


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
