"""Train the testbed DiT on procedural moving-shape clips.

    python -m adacache_compile.testbed.train --out runs/new --minutes 58 --threads 2

Writes ``model.safetensors`` (EMA weights of transformer and label conditioner), ``config.json`` and ``MODEL_CARD.md``
to ``--out`` (required: there is no default, so a run never overwrites the shipped checkpoint and its hand-written
model card by accident).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import HELD_OUT_SEED_BASE, SHAPES, TRAIN_SEED_LIMIT, DataConfig, make_batch
from .model import CondConfig, LabelConditioner, ModelConfig, build_transformer
from .sample import DEFAULT_GUIDANCE_SCALE

__all__ = ["TrainConfig", "SCHEDULER_CONFIG", "OBJECTIVE", "noised", "denoising_loss", "train", "main"]

logger = logging.getLogger(__name__)

OBJECTIVE = "v_prediction"
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": OBJECTIVE,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    # Sampling starts at t = 999 (pure noise), as in training, rather than at the "leading" spacing's t = 981.
    "timestep_spacing": "trailing",
}
# Held-out clips on which the loss curve is measured (fixed clips, timesteps and noise).
EVAL_SEED_OFFSET = 1000
EVAL_CLIPS = 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # Per-sample weight of the v-prediction MSE: (min(SNR_t, gamma) + 1) / (SNR_t + 1), i.e. a weight of
    # min(SNR_t, gamma) + 1 on the implied x0 error. Noisy steps keep plain v-MSE (x0 weight ~1; they decide the layout
    # and which shape is drawn), nearly clean steps are capped as in min-SNR-gamma (Hang et al., 2023), whose own
    # weight min(SNR_t, gamma) on x0 starves the noisy steps like epsilon-MSE does.
    snr_gamma: float = 5.0
    # Timesteps are drawn uniformly; with probability ``focus_prob`` a clip's timestep is drawn from ``focus_range``
    # instead (inclusive-exclusive), which spends more of the steps on the noise levels that decide which shape is
    # drawn. 0 is the plain uniform draw.
    focus_prob: float = 0.0
    focus_range: tuple[int, int] = (150, 650)
    log_every: int = 50
    eval_every_s: float = 120.0


def _alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG).alphas_cumprod


def noised(videos: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor):
    """(noisy videos, v-prediction target, alpha_bar_t) for clean ``videos`` at ``timesteps``."""
    alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * videos + (1.0 - alpha_bar).sqrt() * noise
    target = alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * videos
    return noisy, target, alpha_bar


def denoising_loss(
    transformer, cond: LabelConditioner, videos: torch.Tensor, shapes: torch.Tensor, motions: torch.Tensor, seed: int
) -> float:
    """Mean (unweighted) v-prediction MSE over the clips, timesteps and noise drawn from ``seed`` (same draws for
    every model)."""
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.randint(0, SCHEDULER_CONFIG["num_train_timesteps"], (videos.shape[0],), generator=generator)
    noise = torch.randn(videos.shape, generator=generator)
    noisy, target, _ = noised(videos, timesteps, noise, _alphas_cumprod())
    device = next(transformer.parameters()).device
    with torch.no_grad():
        prediction = transformer(
            hidden_states=noisy.to(device),
            timestep=timesteps.to(device),
            encoder_hidden_states=cond(shapes.to(device), motions.to(device)),
            return_dict=False,
        )[0]
    return F.mse_loss(prediction, target.to(device)).item()


def _draw_timesteps(config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    uniform = torch.randint(0, SCHEDULER_CONFIG["num_train_timesteps"], (config.batch_size,), generator=generator)
    focused = torch.randint(*config.focus_range, (config.batch_size,), generator=generator)
    return torch.where(torch.rand(config.batch_size, generator=generator) < config.focus_prob, focused, uniform)


def _lr_factor(step: int, fraction_done: float, config: TrainConfig) -> float:
    warmup = min(1.0, (step + 1) / config.warmup_steps)
    return warmup * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(fraction_done, 1.0))))


def _training_batch(
    batch_index: int, config: TrainConfig, data_config: DataConfig, label_dropout: float, generator, alphas_cumprod
):
    """``(noisy, target, alpha_bar, shapes, motions, timesteps)`` of training batch ``batch_index``, drawn on the CPU.

    A continued run passes its predecessor's step count on, so it draws clips after the ones that run saw."""
    seeds = (batch_index * config.batch_size + torch.arange(config.batch_size)) % TRAIN_SEED_LIMIT
    videos, shapes, motions = make_batch(seeds.tolist(), data_config)
    dropped = torch.rand(config.batch_size, generator=generator) < label_dropout
    shapes, motions = shapes.masked_fill(dropped, -1), motions.masked_fill(dropped, -1)
    timesteps = _draw_timesteps(config, generator)
    noise = torch.randn(videos.shape, generator=generator)
    noisy, target, alpha_bar = noised(videos, timesteps, noise, alphas_cumprod)
    return noisy, target, alpha_bar, shapes, motions, timesteps


def _initial_models(init_from: Path | None, model_config: ModelConfig | None, data_config: DataConfig):
    """``(transformer, cond, model_config, cond_config, previous training summary)``: new ones of ``model_config``'s
    size, or the ones saved at ``init_from`` (whose size a differing ``model_config`` may not change)."""
    previous = saved = None
    if init_from is not None:
        from . import load_testbed

        saved = load_testbed(init_from)
        saved_config = ModelConfig(**saved.meta["model"])
        if model_config is not None and model_config != saved_config:
            raise ValueError(
                f"train: init_from={str(init_from)!r} holds a model of {saved_config}, but model_config asks for"
                f" {model_config}; a continued run keeps its saved size (drop the size options or train from scratch)"
            )
        model_config = saved_config
        previous = saved.meta["training"]
    model_config = model_config or ModelConfig()
    cond_config = CondConfig(
        num_shapes=data_config.num_shapes,
        num_motion_buckets=data_config.num_motion_buckets,
        caption_channels=model_config.caption_channels,
    )
    transformer = build_transformer(model_config, data_config)
    cond = LabelConditioner(cond_config)
    if saved is not None:
        transformer.load_state_dict(saved.transformer.state_dict())
        cond.load_state_dict(saved.cond.state_dict())
    return transformer, cond, model_config, cond_config, previous


def _update_ema(pairs, step: int, ema_decay: float) -> None:
    # Short warm-up of the EMA so early checkpoints are not dominated by the random init.
    decay = min(ema_decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for ema_module, module in pairs:
            for ema_p, p in zip(ema_module.parameters(), module.parameters()):
                ema_p.lerp_(p, 1.0 - decay)


def train(
    out: Path,
    minutes: float,
    threads: int,
    config: TrainConfig | None = None,
    seed: int = 0,
    init_from: Path | None = None,
    device: str = "cpu",
    model_config: ModelConfig | None = None,
) -> dict:
    """Train for ``minutes`` of wall time and save to ``out``; ``init_from`` continues from a saved checkpoint.

    Clips, timesteps and noise are always drawn on the CPU (the same draws on every device); ``device`` ("cuda")
    runs the model there. ``model_config`` sizes a new model (default ``ModelConfig()``); a continued run keeps the size
    it was saved with, and a ``model_config`` that differs from it is an error."""
    config = config or TrainConfig()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data_config = DataConfig()
    transformer, cond, model_config, cond_config, previous = _initial_models(init_from, model_config, data_config)
    transformer, cond = transformer.to(device), cond.to(device)
    ema_transformer, ema_cond = copy.deepcopy(transformer).eval(), copy.deepcopy(cond).eval()
    params = list(transformer.parameters()) + list(cond.parameters())
    num_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    alphas_cumprod = _alphas_cumprod()
    generator = torch.Generator().manual_seed(seed)

    eval_batch = make_batch(
        range(HELD_OUT_SEED_BASE + EVAL_SEED_OFFSET, HELD_OUT_SEED_BASE + EVAL_SEED_OFFSET + EVAL_CLIPS)
    )
    init_loss = denoising_loss(transformer.eval(), cond, *eval_batch, seed=seed)
    logger.info("params %d, held-out loss at start %.4f", num_params, init_loss)
    curve = [{"step": 0, "minutes": 0.0, "train_loss": None, "eval_loss_ema": init_loss}]

    first_step = previous["steps"] if previous else 0
    budget_s = minutes * 60.0
    start = last_eval = time.monotonic()
    step, running = 0, []

    def summarise(eval_loss: float) -> dict:
        return {
            "steps": step,
            "batch_size": config.batch_size,
            "wall_minutes": round((time.monotonic() - start) / 60.0, 2),
            "threads": threads,
            "device": device,
            "num_params": num_params,
            "random_init_eval_loss": previous["random_init_eval_loss"] if previous else init_loss,
            "final_eval_loss_ema": eval_loss,
            "curve": list(curve),
            "train_config": dataclasses.asdict(config),
            "continued_from": previous,
        }

    transformer.train()
    while (elapsed := time.monotonic() - start) < budget_s:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, elapsed / budget_s, config)
        noisy, target, alpha_bar, shapes, motions, timesteps = (
            t.to(device)
            for t in _training_batch(
                first_step + step, config, data_config, cond_config.label_dropout, generator, alphas_cumprod
            )
        )
        prediction = transformer(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond(shapes, motions), return_dict=False
        )[0]
        snr = alpha_bar / (1.0 - alpha_bar)
        weight = (snr.clamp(max=config.snr_gamma) + 1.0) / (snr + 1.0)
        loss = (weight * (prediction - target).square()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        _update_ema(((ema_transformer, transformer), (ema_cond, cond)), step, config.ema_decay)
        running.append(loss.item())
        step += 1
        if step % config.log_every == 0:
            logger.info(
                "step %d  %.1f min  loss %.4f  lr %.2e  %.2f steps/s",
                step,
                elapsed / 60.0,
                sum(running[-config.log_every :]) / config.log_every,
                optimizer.param_groups[0]["lr"],
                step / max(elapsed, 1e-6),
            )
        if time.monotonic() - last_eval > config.eval_every_s:
            last_eval = time.monotonic()
            eval_loss = denoising_loss(ema_transformer, ema_cond, *eval_batch, seed=seed)
            train_loss = sum(running[-200:]) / len(running[-200:])
            curve.append(
                {
                    "step": step,
                    "minutes": round(elapsed / 60.0, 2),
                    "train_loss": train_loss,
                    "eval_loss_ema": eval_loss,
                }
            )
            logger.info("eval  step %d  train %.4f  held-out (EMA) %.4f", step, train_loss, eval_loss)
            # A checkpoint at every evaluation: a run can be sampled while it trains, and a stopped run keeps its work.
            _save(out, ema_transformer, ema_cond, data_config, model_config, cond_config, summarise(eval_loss))

    wall_s = time.monotonic() - start
    final_loss = denoising_loss(ema_transformer, ema_cond, *eval_batch, seed=seed)
    train_loss = sum(running[-200:]) / max(len(running[-200:]), 1)
    curve.append(
        {"step": step, "minutes": round(wall_s / 60.0, 2), "train_loss": train_loss, "eval_loss_ema": final_loss}
    )
    logger.info(
        "done: %d steps in %.1f min, held-out loss %.4f (init %.4f)", step, wall_s / 60.0, final_loss, init_loss
    )
    summary = summarise(final_loss)
    _save(out, ema_transformer, ema_cond, data_config, model_config, cond_config, summary)
    return summary


def _save(out: Path, transformer, cond, data_config, model_config, cond_config, summary: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v.detach().cpu().contiguous() for k, v in transformer.state_dict().items()}
    tensors.update({f"cond.{k}": v.detach().cpu().contiguous() for k, v in cond.state_dict().items()})
    save_file(tensors, str(out / "model.safetensors"))
    config = {
        "transformer": dict(transformer.config),
        "model": dataclasses.asdict(model_config),
        "cond": dataclasses.asdict(cond_config),
        "data": dataclasses.asdict(data_config),
        "scheduler": SCHEDULER_CONFIG,
        "objective": OBJECTIVE,
        "training": {k: v for k, v in summary.items() if k != "curve"},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
    (out / "MODEL_CARD.md").write_text(_model_card(summary, data_config, model_config))


def _continued_note(summary: dict) -> str:
    previous = summary["continued_from"]
    if previous is None:
        return ""
    return (
        f"- Continued from an earlier run of {previous['steps']} steps ({previous['wall_minutes']} min, final held-out"
        f" loss {previous['final_eval_loss_ema']:.4f}); the step-0 row below is that checkpoint.\n"
    )


def _timestep_note(summary: dict) -> str:
    config = summary["train_config"]
    if not config.get("focus_prob"):
        return "uniform timesteps"
    lo, hi = config["focus_range"]
    return f"timesteps uniform, or with probability {config['focus_prob']} uniform in [{lo}, {hi})"


def _model_card(summary: dict, data_config: DataConfig, model_config: ModelConfig) -> str:
    rows = "\n".join(
        "| {} | {} | {} | {:.4f} |".format(
            p["step"], p["minutes"], "-" if p["train_loss"] is None else f"{p['train_loss']:.4f}", p["eval_loss_ema"]
        )
        for p in summary["curve"]
    )
    return f"""# Testbed DiT — model card

A small diffusers `LatteTransformer3DModel` (alternating spatial / temporal blocks) trained from scratch on CPU,
in pixel space, on procedural videos of moving shapes. It is the default model of the demo, the benchmark testbed
and the model the tests load. It is a testbed for caching, not a generative model anyone should use for content.

## Model
- Latte: {model_config.num_layers} spatial + {model_config.num_layers} temporal blocks,
  {model_config.num_attention_heads} heads x {model_config.attention_head_dim} dims, patch {model_config.patch_size},
  `ada_norm_single`, in/out channels 3 (RGB pixels, no VAE).
- Conditioning: learned embedding of (shape class, motion bucket) -> 2 caption tokens of
  {model_config.caption_channels} channels, plus a learned null token per label for classifier-free guidance
  (both labels dropped together with probability 0.1 during training).
- Parameters: {summary["num_params"]:,} (transformer + conditioner); float32 weights are the EMA (decay
  {summary["train_config"]["ema_decay"]}) of the trained weights.

## Data
`adacache_compile.testbed.data`: {data_config.frames} frames at {data_config.size}x{data_config.size} RGB in [-1, 1],
layout [C, F, H, W]. Shapes: {", ".join(SHAPES)} in 7 saturated colours over a dark plain or gradient
background; motion buckets 0 static, 1 slow (0.35-0.6 px/frame), 2 medium (0.9-1.3), 3 fast (1.8-2.6), bouncing
off the borders; {data_config.second_object_prob:.0%} of clips have a second (unlabelled) object of the same motion
bucket. Each clip is a function of its seed; training used seeds below 2^30, evaluation seeds from 2^31 on.

## Training
- Objective: {OBJECTIVE} MSE, DDPM linear betas 1e-4..0.02, 1000 train timesteps, {_timestep_note(summary)};
  per-sample weight (min(SNR_t, {summary["train_config"]["snr_gamma"]}) + 1) / (SNR_t + 1) (the train loss column is
  weighted, the held-out column is not).
- AdamW lr {summary["train_config"]["lr"]} (warm-up {summary["train_config"]["warmup_steps"]} steps, cosine to 10%
  over the time budget), weight decay {summary["train_config"]["weight_decay"]}, grad clip
  {summary["train_config"]["grad_clip"]}, batch {summary["batch_size"]}.
- {summary["steps"]} steps in {summary["wall_minutes"]} min wall time, model on {summary["device"]}, {summary["threads"]}
  CPU thread(s).
{_continued_note(summary)}- Random-init loss on the held-out set: **{summary["random_init_eval_loss"]:.4f}**; final (EMA):
  **{summary["final_eval_loss_ema"]:.4f}**.

Held-out loss: {EVAL_CLIPS} clips of unseen seeds, fixed timesteps and noise (the same draws for every row). Train
loss: mean of the last 200 steps (10% of labels dropped).

| step | minutes | train loss | held-out loss (EMA) |
|---|---|---|---|
{rows}

## Sampling
`adacache_compile.testbed.sample`: DDIM, 50 steps, batched classifier-free guidance (default scale
{DEFAULT_GUIDANCE_SCALE}).
"""


def _model_config_from(args) -> ModelConfig | None:
    """The ModelConfig of the size options given on the command line, or None when none was given."""
    given = {
        field: value
        for field, value in (
            ("num_layers", args.layers),
            ("num_attention_heads", args.heads),
            ("attention_head_dim", args.head_dim),
        )
        if value is not None
    }
    return ModelConfig(**given) if given else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="checkpoint directory to write (its MODEL_CARD.md is regenerated from a template: the shipped "
        "checkpoint's card has hand-written sections, so pointing --out at it is a deliberate choice)",
    )
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--snr-gamma", type=float, default=TrainConfig.snr_gamma)
    parser.add_argument("--focus-prob", type=float, default=TrainConfig.focus_prob)
    parser.add_argument("--focus-range", type=int, nargs=2, default=TrainConfig.focus_range, metavar=("LO", "HI"))
    parser.add_argument("--seed", type=int, default=0)
    sizes = "model size of a new run (default: ModelConfig); a continued run keeps its saved size"
    parser.add_argument("--layers", type=int, default=None, help=f"spatial+temporal block pairs; {sizes}")
    parser.add_argument("--heads", type=int, default=None, help=sizes)
    parser.add_argument("--head-dim", type=int, default=None, help=sizes)
    parser.add_argument("--device", default="cpu", help='where the model runs, e.g. "cuda" (data stays on the CPU)')
    parser.add_argument("--init-from", type=Path, default=None, help="checkpoint directory to continue training from")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train(
        args.out,
        args.minutes,
        args.threads,
        TrainConfig(
            batch_size=args.batch_size,
            lr=args.lr,
            snr_gamma=args.snr_gamma,
            focus_prob=args.focus_prob,
            focus_range=tuple(args.focus_range),
        ),
        seed=args.seed,
        init_from=args.init_from,
        device=args.device,
        model_config=_model_config_from(args),
    )


if __name__ == "__main__":
    main()
