"""The project's own small video DiT: a trained diffusers ``LatteTransformer3DModel`` on moving-shape clips.

``load_testbed()`` gives the shipped checkpoint ready for inference; ``sample()`` runs DDIM with batched CFG on it
or on any drop-in wrapper of its transformer. diffusers and safetensors are imported only when a function needs them.

Besides the model: ``demo`` (``adacache-compile demo``), ``calibrate`` (recording for ``adacache-compile
calibrate``), ``metrics`` (PSNR / SSIM, scikit-image), ``timing`` (the timed loop shared with ``benchmarks/``),
``recognise`` (shape check), ``tiny_models`` (tiny random-init models of each family), ``train``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .data import (
    HELD_OUT_SEED_BASE,
    MOTION_BUCKET_SPEEDS,
    SHAPES,
    DataConfig,
    make_batch,
    make_clip,
    measured_motion,
    motion_per_bucket,
    shape_index,
)
from .model import CondConfig, LabelConditioner, ModelConfig, build_transformer
from .sample import DEFAULT_GUIDANCE_SCALE, sample, save_gif, save_mp4, side_by_side_png

__all__ = [
    "CHECKPOINT_DIR",
    "Testbed",
    "load_testbed",
    "make_condition",
    "sample",
    "save_gif",
    "save_mp4",
    "side_by_side_png",
    "DEFAULT_GUIDANCE_SCALE",
    "SHAPES",
    "MOTION_BUCKET_SPEEDS",
    "HELD_OUT_SEED_BASE",
    "DataConfig",
    "ModelConfig",
    "CondConfig",
    "LabelConditioner",
    "build_transformer",
    "make_clip",
    "make_batch",
    "measured_motion",
    "motion_per_bucket",
]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"


@dataclasses.dataclass
class Testbed:
    """A loaded testbed: transformer and conditioner (eval, float32), scheduler config and the checkpoint's config."""

    transformer: torch.nn.Module
    cond: LabelConditioner
    scheduler_config: dict
    meta: dict

    @property
    def data_config(self) -> DataConfig:
        data = dict(self.meta["data"])
        data["radius"] = tuple(data["radius"])
        return DataConfig(**data)

    def make_condition(self, labels: Sequence[tuple[int, int]]) -> torch.Tensor:
        return make_condition(self.cond, labels)


def make_condition(cond: LabelConditioner, labels: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``encoder_hidden_states`` [B, 2, caption_channels] for (shape class, motion bucket) pairs; -1 means null.

    A shape may be given by name (``"disc"``) as well as by index.
    """
    shapes = torch.tensor([shape_index(s) for s, _ in labels], dtype=torch.long)
    motions = torch.tensor([int(m) for _, m in labels], dtype=torch.long)
    with torch.no_grad():
        return cond(shapes, motions)


def load_testbed(checkpoint_dir: str | Path | None = None, random_init: bool = False) -> Testbed:
    """Load the shipped checkpoint (or ``checkpoint_dir``); ``random_init`` builds the same architecture untrained."""
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else CHECKPOINT_DIR
    meta = json.loads((checkpoint_dir / "config.json").read_text())
    data_config = DataConfig(**{**meta["data"], "radius": tuple(meta["data"]["radius"])})
    transformer = build_transformer(ModelConfig(**meta["model"]), data_config)
    cond = LabelConditioner(CondConfig(**meta["cond"]))
    if not random_init:
        tensors = load_file(str(checkpoint_dir / "model.safetensors"))
        for prefix, module in (("transformer.", transformer), ("cond.", cond)):
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            module.load_state_dict(state, strict=True)
    transformer.float().eval().requires_grad_(False)
    cond.float().eval().requires_grad_(False)
    scheduler_config = {**meta["scheduler"], "prediction_type": meta["objective"]}
    return Testbed(transformer=transformer, cond=cond, scheduler_config=scheduler_config, meta=meta)
