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
)
from .families import FAMILIES, Family, family_of
from .model import CondConfig, LabelConditioner, ModelConfig, build_transformer
from .sample import DEFAULT_GUIDANCE_SCALE, sample, save_gif, save_mp4, side_by_side_png

__all__ = [
    "CHECKPOINT_DIR",
    "TESTBEDS",
    "DEFAULT_TESTBED",
    "resolve_testbed",
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
# The shipped testbeds by name; the first is the default of the demo, the benchmark and the tests.
TESTBEDS = {"latte-shapes": CHECKPOINT_DIR, "ltx-textures": Path(__file__).parent / "checkpoint_ltx"}
DEFAULT_TESTBED = "latte-shapes"


@dataclasses.dataclass
class Testbed:
    """A loaded testbed: transformer and conditioner (eval, float32), scheduler config and the checkpoint's config.

    ``family`` (``families.Family``) says how the transformer is called, trained and sampled."""

    transformer: torch.nn.Module
    cond: LabelConditioner
    scheduler_config: dict
    meta: dict

    @property
    def family(self) -> Family:
        return family_of(self.meta)

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def data_config(self):
        return self.family.data_config(self.meta["data"])

    @property
    def model_config(self):
        return self.family.model_config(self.meta["model"])

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """[C, F, H, W] of one video."""
        data = self.meta["data"]
        return (3, data["frames"], data["size"], data["size"])

    @property
    def default_guidance_scale(self) -> float:
        return self.family.default_guidance_scale

    def make_condition(self, labels: Sequence[tuple[int, int]]) -> torch.Tensor:
        return make_condition(self.cond, labels, self.family)

    def predict(self, transformer, videos: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states) -> torch.Tensor:
        """``transformer``'s prediction [B, C, F, H, W], called as this family's pipeline calls it."""
        return self.family.predict(transformer, videos, timestep, encoder_hidden_states, self.model_config)

    def scheduler(self, num_steps: int):
        return self.family.scheduler(num_steps)


def make_condition(
    cond: LabelConditioner, labels: Sequence[tuple[int, int]], family: Family | None = None
) -> torch.Tensor:
    """``encoder_hidden_states`` [B, 2, caption_channels] for (first, second) label pairs — latte-shapes: (shape
    class, motion bucket), ltx-textures: (pattern, camera motion); -1 means null.

    A label may be given by name (``"disc"``, ``"zoom"``) as well as by index.
    """
    family = family or FAMILIES[DEFAULT_TESTBED]
    shapes = torch.tensor([family.label_index(s) for s, _ in labels], dtype=torch.long)
    motions = torch.tensor([family.label_index(m, second=True) for _, m in labels], dtype=torch.long)
    with torch.no_grad():
        return cond(shapes, motions)


def resolve_testbed(testbed: str | Path | None) -> Path:
    """The checkpoint directory of a shipped testbed's name, or ``testbed`` itself as a directory (None: the
    default testbed)."""
    if testbed is None:
        return TESTBEDS[DEFAULT_TESTBED]
    if str(testbed) in TESTBEDS:
        return TESTBEDS[str(testbed)]
    path = Path(testbed)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"testbed {str(testbed)!r} is neither a shipped testbed ({', '.join(TESTBEDS)}) nor a checkpoint"
            " directory with a config.json"
        )
    return path


def load_testbed(checkpoint_dir: str | Path | None = None, random_init: bool = False) -> Testbed:
    """Load a shipped testbed by name (``"latte-shapes"``, the default, or ``"ltx-textures"``) or a checkpoint
    directory; ``random_init`` builds the same architecture untrained."""
    from safetensors.torch import load_file

    checkpoint_dir = resolve_testbed(checkpoint_dir)
    meta = json.loads((checkpoint_dir / "config.json").read_text())
    family = family_of(meta)
    transformer = family.build_transformer(family.model_config(meta["model"]), family.data_config(meta["data"]))
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
