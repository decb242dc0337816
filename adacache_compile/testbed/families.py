"""The two testbeds' families: what differs between them, behind one interface for training, loading and sampling.

- ``latte-shapes`` (the first testbed): a diffusers ``LatteTransformer3DModel`` on moving-shape clips
  (``testbed.data``), DDPM v-prediction, sampled with DDIM.
- ``ltx-textures`` (the second): a diffusers ``LTXVideoTransformer3DModel`` on textures under a moving camera
  (``testbed.textures``), rectified flow, sampled with flow-matching Euler, called on packed tokens as
  ``LTXPipeline`` calls it.

Choices are made on one testbed and reported on the other (``benchmarks/README.md`` says which number comes from
which).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["Family", "LatteShapes", "LtxTextures", "FAMILIES", "family_of"]


class Family:
    """What a testbed family defines. Timesteps are the values the transformer is called with."""

    name: str
    transformer_class: str
    objective: str
    scheduler_config: dict
    # Label names: index -> name of the first label (what is drawn) and of the second (how it moves).
    first_labels: tuple[str, ...]
    second_labels: tuple[str, ...]
    default_guidance_scale: float

    def data_config(self, fields: dict | None = None):
        raise NotImplementedError

    def make_batch(self, seeds, data_config):
        raise NotImplementedError

    def model_config(self, fields: dict | None = None):
        raise NotImplementedError

    def build_transformer(self, model_config, data_config):
        raise NotImplementedError

    def draw_timesteps(
        self, batch_size: int, generator: torch.Generator, focus_prob: float, focus_range
    ) -> torch.Tensor:
        raise NotImplementedError

    def noised(self, videos: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor):
        """``(noisy videos, regression target, per-sample loss weight [B, 1, 1, 1, 1])``."""
        raise NotImplementedError

    def predict(self, transformer, videos: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states, model_config):
        """The transformer's prediction [B, C, F, H, W] for videos [B, C, F, H, W], called as the family's pipeline
        calls it (so a cached drop-in of the transformer sees the same call); ``model_config`` is the checkpoint's."""
        raise NotImplementedError

    def scheduler(self, num_steps: int):
        """The sampler with its timesteps set for ``num_steps``."""
        raise NotImplementedError

    def label_index(self, label: str | int, second: bool = False) -> int:
        names = self.second_labels if second else self.first_labels
        if isinstance(label, str):
            if label not in names:
                raise ValueError(f"{self.name}: unknown label {label!r}; known: {names}")
            return names.index(label)
        return int(label)


class LatteShapes(Family):
    name = "latte-shapes"
    transformer_class = "LatteTransformer3DModel"
    objective = "v_prediction"
    scheduler_config = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "v_prediction",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        # Sampling starts at t = 999 (pure noise), as in training, rather than at the "leading" spacing's t = 981.
        "timestep_spacing": "trailing",
    }
    # Per-sample weight of the v-prediction MSE: (min(SNR_t, gamma) + 1) / (SNR_t + 1), i.e. a weight of
    # min(SNR_t, gamma) + 1 on the implied x0 error. Noisy steps keep plain v-MSE (x0 weight ~1; they decide the layout
    # and which shape is drawn), nearly clean steps are capped as in min-SNR-gamma (Hang et al., 2023), whose own
    # weight min(SNR_t, gamma) on x0 starves the noisy steps like epsilon-MSE does.
    snr_gamma = 5.0

    @property
    def first_labels(self):
        from .data import SHAPES

        return SHAPES

    @property
    def second_labels(self):
        from .data import MOTION_BUCKET_NAMES

        return MOTION_BUCKET_NAMES

    @property
    def default_guidance_scale(self):
        from .sample import DEFAULT_GUIDANCE_SCALE

        return DEFAULT_GUIDANCE_SCALE

    def data_config(self, fields=None):
        from .data import DataConfig

        fields = dict(fields or {})
        if "radius" in fields:
            fields["radius"] = tuple(fields["radius"])
        return DataConfig(**fields)

    def make_batch(self, seeds, data_config):
        from .data import make_batch

        return make_batch(seeds, data_config)

    def model_config(self, fields=None):
        from .model import ModelConfig

        return ModelConfig(**(fields or {}))

    def build_transformer(self, model_config, data_config):
        from .model import build_transformer

        return build_transformer(model_config, data_config)

    @functools.cached_property
    def _alphas_cumprod(self) -> torch.Tensor:
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.scheduler_config).alphas_cumprod

    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def draw_timesteps(self, batch_size, generator, focus_prob, focus_range):
        uniform = torch.randint(0, self.scheduler_config["num_train_timesteps"], (batch_size,), generator=generator)
        focused = torch.randint(*focus_range, (batch_size,), generator=generator)
        return torch.where(torch.rand(batch_size, generator=generator) < focus_prob, focused, uniform)

    def noised(self, videos, timesteps, noise):
        alpha_bar = self.alphas_cumprod()[timesteps].view(-1, 1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * videos + (1.0 - alpha_bar).sqrt() * noise
        target = alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * videos
        snr = alpha_bar / (1.0 - alpha_bar)
        return noisy, target, (snr.clamp(max=self.snr_gamma) + 1.0) / (snr + 1.0)

    def predict(self, transformer, videos, timestep, encoder_hidden_states, model_config):
        return transformer(
            hidden_states=videos, timestep=timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False
        )[0]

    def scheduler(self, num_steps):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_steps)
        return scheduler


class LtxTextures(Family):
    name = "ltx-textures"
    transformer_class = "LTXVideoTransformer3DModel"
    objective = "flow_matching"
    # Static shift 1: sigmas spaced evenly from 1 to 1/N. LTXPipeline shifts by resolution, and these clips are
    # 16 x 16 pixels (the low end of its range).
    scheduler_config = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
    first_labels = ("stripes", "checker", "rings", "dots")
    second_labels = ("static", "pan", "rotate", "zoom")
    # Classifier-free guidance at 3 or more, as the testbed was asked to be sampled with (LTXPipeline's default is 3).
    default_guidance_scale = 3.0

    def data_config(self, fields=None):
        from .textures import TextureConfig

        fields = dict(fields or {})
        for name in ("period", "pan_speed", "rotate_speed", "zoom_rate"):
            if name in fields:
                fields[name] = tuple(fields[name])
        return TextureConfig(**fields)

    def make_batch(self, seeds, data_config):
        from .textures import make_batch

        return make_batch(seeds, data_config)

    def model_config(self, fields=None):
        from .model import LtxModelConfig

        return LtxModelConfig(**(fields or {}))

    def build_transformer(self, model_config, data_config):
        from .model import build_ltx_transformer

        return build_ltx_transformer(model_config, data_config)

    def draw_timesteps(self, batch_size, generator, focus_prob, focus_range):
        # Logit-normal sigmas (Esser et al., 2024: SD3's default), which weight the middle noise levels; with
        # probability focus_prob a sigma is drawn uniformly instead (focus_range, in timestep units).
        logit_normal = torch.sigmoid(torch.randn(batch_size, generator=generator))
        lo, hi = focus_range
        uniform = lo / 1000.0 + (hi - lo) / 1000.0 * torch.rand(batch_size, generator=generator)
        sigma = torch.where(torch.rand(batch_size, generator=generator) < focus_prob, uniform, logit_normal)
        return sigma * self.scheduler_config["num_train_timesteps"]

    def noised(self, videos, timesteps, noise):
        sigma = (timesteps / self.scheduler_config["num_train_timesteps"]).view(-1, 1, 1, 1, 1)
        noisy = (1.0 - sigma) * videos + sigma * noise
        return noisy, noise - videos, torch.ones_like(sigma)

    def predict(self, transformer, videos, timestep, encoder_hidden_states, model_config):
        patch_t, patch = model_config.patch_size_t, model_config.patch_size
        batch, channels, frames, height, width = videos.shape
        grid = (frames // patch_t, height // patch, width // patch)
        tokens = pack_tokens(videos, patch_t, patch)
        mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.long, device=encoder_hidden_states.device)
        out = transformer(
            hidden_states=tokens,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            encoder_attention_mask=mask,
            num_frames=grid[0],
            height=grid[1],
            width=grid[2],
            return_dict=False,
        )[0]
        return unpack_tokens(out, grid, patch_t, patch)

    def scheduler(self, num_steps):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_steps)
        return scheduler


def pack_tokens(videos: torch.Tensor, patch_t: int, patch: int) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, F/pt * H/p * W/p, C * pt * p * p], the layout of ``LTXPipeline._pack_latents``."""
    b, c, f, h, w = videos.shape
    x = videos.reshape(b, c, f // patch_t, patch_t, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_tokens(tokens: torch.Tensor, grid: tuple[int, int, int], patch_t: int, patch: int) -> torch.Tensor:
    """The inverse of :func:`pack_tokens` (``LTXPipeline._unpack_latents``)."""
    frames, height, width = grid
    x = tokens.reshape(tokens.shape[0], frames, height, width, -1, patch_t, patch, patch)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


FAMILIES: dict[str, Family] = {family.name: family for family in (LatteShapes(), LtxTextures())}


def family_of(meta: dict) -> Family:
    """The family a checkpoint's config.json names (checkpoints written before the second testbed name none: Latte)."""
    name = meta.get("family", LatteShapes.name)
    if name not in FAMILIES:
        raise ValueError(f"testbed checkpoint names family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]
