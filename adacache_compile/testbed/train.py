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

from .data import HELD_OUT_SEED_BASE, TRAIN_SEED_LIMIT
from .families import FAMILIES, Family, LatteShapes
from .model import CondConfig, LabelConditioner

__all__ = ["TrainConfig", "denoising_loss", "train", "main"]

logger = logging.getLogger(__name__)

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
    # Timesteps are drawn as the family draws them (latte-shapes: uniform; ltx-textures: logit-normal sigmas); with
    # probability ``focus_prob`` a clip's timestep is drawn uniformly from ``focus_range`` (inclusive-exclusive, in
    # timestep units) instead, which spends more of the steps on the noise levels that decide what is drawn. 0 is the
    # family's plain draw.
    focus_prob: float = 0.0
    focus_range: tuple[int, int] = (150, 650)
    log_every: int = 50
    eval_every_s: float = 120.0


def denoising_loss(
    transformer,
    cond: LabelConditioner,
    videos: torch.Tensor,
    shapes: torch.Tensor,
    motions: torch.Tensor,
    seed: int,
    family: Family | None = None,
    model_config=None,
) -> float:
    """Mean (unweighted) MSE of the family's regression target over the clips, timesteps and noise drawn from
    ``seed`` (same draws for every model); latte-shapes by default."""
    family = family or FAMILIES[LatteShapes.name]
    model_config = model_config or family.model_config()
    generator = torch.Generator().manual_seed(seed)
    timesteps = family.draw_timesteps(videos.shape[0], generator, 0.0, (0, 1000))
    noise = torch.randn(videos.shape, generator=generator)
    noisy, target, _ = family.noised(videos, timesteps, noise)
    device = next(transformer.parameters()).device
    with torch.no_grad():
        prediction = family.predict(
            transformer,
            noisy.to(device),
            timesteps.to(device),
            cond(shapes.to(device), motions.to(device)),
            model_config,
        )
    return F.mse_loss(prediction, target.to(device)).item()


def _lr_factor(step: int, fraction_done: float, config: TrainConfig) -> float:
    warmup = min(1.0, (step + 1) / config.warmup_steps)
    return warmup * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(fraction_done, 1.0))))


def _training_batch(
    batch_index: int, config: TrainConfig, family: Family, data_config, label_dropout: float, generator
):
    """``(noisy, target, weight, shapes, motions, timesteps)`` of training batch ``batch_index``, drawn on the CPU.

    A continued run passes its predecessor's step count on, so it draws clips after the ones that run saw."""
    seeds = (batch_index * config.batch_size + torch.arange(config.batch_size)) % TRAIN_SEED_LIMIT
    videos, shapes, motions = family.make_batch(seeds.tolist(), data_config)
    dropped = torch.rand(config.batch_size, generator=generator) < label_dropout
    shapes, motions = shapes.masked_fill(dropped, -1), motions.masked_fill(dropped, -1)
    timesteps = family.draw_timesteps(config.batch_size, generator, config.focus_prob, config.focus_range)
    noise = torch.randn(videos.shape, generator=generator)
    noisy, target, weight = family.noised(videos, timesteps, noise)
    return noisy, target, weight, shapes, motions, timesteps


def _initial_models(init_from: Path | None, model_config, family: Family):
    """``(transformer, cond, model_config, cond_config, data_config, previous training summary)``: new ones of
    ``model_config``'s size, or the ones saved at ``init_from`` (whose size a differing ``model_config`` may not
    change, and whose family must be ``family``)."""
    previous = saved = None
    data_config = family.data_config()
    if init_from is not None:
        from . import load_testbed

        saved = load_testbed(init_from)
        if saved.family.name != family.name:
            raise ValueError(
                f"train: init_from={str(init_from)!r} is a {saved.family.name} checkpoint, not {family.name}"
            )
        saved_config = saved.model_config
        if model_config is not None and model_config != saved_config:
            raise ValueError(
                f"train: init_from={str(init_from)!r} holds a model of {saved_config}, but model_config asks for"
                f" {model_config}; a continued run keeps its saved size (drop the size options or train from scratch)"
            )
        model_config, data_config = saved_config, saved.data_config
        previous = saved.meta["training"]
    model_config = model_config or family.model_config()
    cond_config = CondConfig(
        num_shapes=data_config.num_shapes,
        num_motion_buckets=data_config.num_motion_buckets,
        caption_channels=model_config.caption_channels,
    )
    transformer = family.build_transformer(model_config, data_config)
    cond = LabelConditioner(cond_config)
    if saved is not None:
        transformer.load_state_dict(saved.transformer.state_dict())
        cond.load_state_dict(saved.cond.state_dict())
    return transformer, cond, model_config, cond_config, data_config, previous


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
    model_config=None,
    family: str = LatteShapes.name,
) -> dict:
    """Train for ``minutes`` of wall time and save to ``out``; ``init_from`` continues from a saved checkpoint.

    Clips, timesteps and noise are always drawn on the CPU (the same draws on every device); ``device`` ("cuda")
    runs the model there. ``family`` names the testbed family (``families.FAMILIES``); ``model_config`` sizes a new model
    (default: the family's); a continued run keeps the size it was saved with, and a ``model_config`` that differs from
    it is an error."""
    config = config or TrainConfig()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    family = FAMILIES[family]
    transformer, cond, model_config, cond_config, data_config, previous = _initial_models(
        init_from, model_config, family
    )
    transformer, cond = transformer.to(device), cond.to(device)
    ema_transformer, ema_cond = copy.deepcopy(transformer).eval(), copy.deepcopy(cond).eval()
    params = list(transformer.parameters()) + list(cond.parameters())
    num_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)

    eval_batch = family.make_batch(
        range(HELD_OUT_SEED_BASE + EVAL_SEED_OFFSET, HELD_OUT_SEED_BASE + EVAL_SEED_OFFSET + EVAL_CLIPS), data_config
    )

    def held_out_loss(transformer, cond) -> float:
        return denoising_loss(transformer, cond, *eval_batch, seed=seed, family=family, model_config=model_config)

    init_loss = held_out_loss(transformer.eval(), cond)
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
        noisy, target, weight, shapes, motions, timesteps = (
            t.to(device)
            for t in _training_batch(
                first_step + step, config, family, data_config, cond_config.label_dropout, generator
            )
        )
        prediction = family.predict(transformer, noisy, timesteps, cond(shapes, motions), model_config)
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
            eval_loss = held_out_loss(ema_transformer, ema_cond)
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
            _save(out, family, ema_transformer, ema_cond, data_config, model_config, cond_config, summarise(eval_loss))

    wall_s = time.monotonic() - start
    final_loss = held_out_loss(ema_transformer, ema_cond)
    train_loss = sum(running[-200:]) / max(len(running[-200:]), 1)
    curve.append(
        {"step": step, "minutes": round(wall_s / 60.0, 2), "train_loss": train_loss, "eval_loss_ema": final_loss}
    )
    logger.info(
        "done: %d steps in %.1f min, held-out loss %.4f (init %.4f)", step, wall_s / 60.0, final_loss, init_loss
    )
    summary = summarise(final_loss)
    _save(out, family, ema_transformer, ema_cond, data_config, model_config, cond_config, summary)
    return summary


def _save(out: Path, family: Family, transformer, cond, data_config, model_config, cond_config, summary: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v.detach().cpu().contiguous() for k, v in transformer.state_dict().items()}
    tensors.update({f"cond.{k}": v.detach().cpu().contiguous() for k, v in cond.state_dict().items()})
    save_file(tensors, str(out / "model.safetensors"))
    config = {
        "family": family.name,
        "transformer": dict(transformer.config),
        "model": dataclasses.asdict(model_config),
        "cond": dataclasses.asdict(cond_config),
        "data": dataclasses.asdict(data_config),
        "scheduler": family.scheduler_config,
        "objective": family.objective,
        "training": {k: v for k, v in summary.items() if k != "curve"},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
    (out / "MODEL_CARD.md").write_text(_model_card(summary, family, data_config, model_config))


def _continued_note(summary: dict) -> str:
    previous = summary["continued_from"]
    if previous is None:
        return ""
    return (
        f"- Continued from an earlier run of {previous['steps']} steps ({previous['wall_minutes']} min, final held-out"
        f" loss {previous['final_eval_loss_ema']:.4f}); the step-0 row below is that checkpoint.\n"
    )


def _timestep_note(summary: dict, family: Family) -> str:
    config = summary["train_config"]
    plain = "uniform timesteps" if family.objective == "v_prediction" else "logit-normal sigmas (SD3's)"
    if not config.get("focus_prob"):
        return plain
    lo, hi = config["focus_range"]
    return f"{plain}, or with probability {config['focus_prob']} timesteps uniform in [{lo}, {hi})"


def _card_sections(family: Family, data_config, model_config) -> dict:
    """The family-specific text of the generated model card."""
    if family.objective == "v_prediction":
        from .data import SHAPES

        return {
            "intro": "A small diffusers `LatteTransformer3DModel` (alternating spatial / temporal blocks) trained from"
            " scratch on CPU,\nin pixel space, on procedural videos of moving shapes.",
            "model": f"- Latte: {model_config.num_layers} spatial + {model_config.num_layers} temporal blocks,\n"
            f"  {model_config.num_attention_heads} heads x {model_config.attention_head_dim} dims, patch"
            f" {model_config.patch_size},\n  `ada_norm_single`, in/out channels 3 (RGB pixels, no VAE).",
            "labels": "(shape class, motion bucket)",
            "data": f"`adacache_compile.testbed.data`: {data_config.frames} frames at {data_config.size}x"
            f"{data_config.size} RGB in [-1, 1],\nlayout [C, F, H, W]. Shapes: {', '.join(SHAPES)} in 7 saturated"
            " colours over a dark plain or gradient\nbackground; motion buckets 0 static, 1 slow (0.35-0.6 px/frame),"
            " 2 medium (0.9-1.3), 3 fast (1.8-2.6), bouncing\noff the borders;"
            f" {data_config.second_object_prob:.0%} of clips have a second (unlabelled) object of the same motion\n"
            "bucket.",
            "objective": "v_prediction MSE, DDPM linear betas 1e-4..0.02, 1000 train timesteps",
            "weight": f"per-sample weight (min(SNR_t, {family.snr_gamma}) + 1) / (SNR_t + 1) (the train loss column"
            " is\n  weighted, the held-out column is not)",
            "sampling": "DDIM, 50 steps",
        }
    from .textures import CAMERA_MOTIONS, PATTERNS

    return {
        "intro": "A small diffusers `LTXVideoTransformer3DModel` (one stream of blocks with full 3-D self-attention,"
        " rotary\npositions, cross-attention to the caption) trained from scratch on CPU, in pixel space, on procedural"
        " textures under a\nmoving camera.",
        "model": f"- LTX-Video: {model_config.num_layers} blocks, {model_config.num_attention_heads} heads x"
        f" {model_config.attention_head_dim} dims; called on packed tokens of\n  {model_config.patch_size_t} x"
        f" {model_config.patch_size} x {model_config.patch_size} RGB pixels ({model_config.token_channels} channels),"
        " as `LTXPipeline` packs a VAE latent (no VAE).",
        "labels": "(pattern, camera motion)",
        "data": f"`adacache_compile.testbed.textures`: {data_config.frames} frames at {data_config.size}x"
        f"{data_config.size} RGB in [-1, 1],\nlayout [C, F, H, W]. Full-frame patterns: {', '.join(PATTERNS)}, in"
        " two colours, period\n"
        f"{data_config.period[0]}-{data_config.period[1]} px; camera: {', '.join(CAMERA_MOTIONS)} (pan"
        f" {data_config.pan_speed[0]}-{data_config.pan_speed[1]} px/frame, rotation\n"
        f"{data_config.rotate_speed[0]}-{data_config.rotate_speed[1]} rad/frame, zoom in or out"
        f" {data_config.zoom_rate[0]}-{data_config.zoom_rate[1]}x per frame).",
        "objective": "rectified-flow velocity MSE (x_t = (1 - sigma) x0 + sigma noise, target noise - x0), timestep"
        " 1000 sigma",
        "weight": "unweighted",
        "sampling": "flow-matching Euler (`FlowMatchEulerDiscreteScheduler`, shift 1), 50 steps",
    }


def _model_card(summary: dict, family: Family, data_config, model_config) -> str:
    rows = "\n".join(
        "| {} | {} | {} | {:.4f} |".format(
            p["step"], p["minutes"], "-" if p["train_loss"] is None else f"{p['train_loss']:.4f}", p["eval_loss_ema"]
        )
        for p in summary["curve"]
    )
    text = _card_sections(family, data_config, model_config)
    return f"""# Testbed DiT `{family.name}` — model card

{text["intro"]} It is a testbed for caching, not a generative model anyone should use for content.

## Model
{text["model"]}
- Conditioning: learned embedding of {text["labels"]} -> 2 caption tokens of
  {model_config.caption_channels} channels, plus a learned null token per label for classifier-free guidance
  (both labels dropped together with probability 0.1 during training).
- Parameters: {summary["num_params"]:,} (transformer + conditioner); float32 weights are the EMA (decay
  {summary["train_config"]["ema_decay"]}) of the trained weights.

## Data
{text["data"]} Each clip is a function of its seed; training used seeds below 2^30, evaluation seeds from 2^31 on.

## Training
- Objective: {text["objective"]}, {_timestep_note(summary, family)};
  {text["weight"]}.
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
`adacache_compile.testbed.sample`: {text["sampling"]}, batched classifier-free guidance (default scale
{family.default_guidance_scale}).
"""


def _model_config_from(args):
    """The family's model config of the size options given on the command line, or None when none was given."""
    given = {
        field: value
        for field, value in (
            ("num_layers", args.layers),
            ("num_attention_heads", args.heads),
            ("attention_head_dim", args.head_dim),
        )
        if value is not None
    }
    return FAMILIES[args.family].model_config(given) if given else None


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
    parser.add_argument("--focus-prob", type=float, default=TrainConfig.focus_prob)
    parser.add_argument("--focus-range", type=int, nargs=2, default=TrainConfig.focus_range, metavar=("LO", "HI"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=sorted(FAMILIES), default=LatteShapes.name, help="testbed family")
    sizes = "model size of a new run (default: the family's); a continued run keeps its saved size"
    parser.add_argument("--layers", type=int, default=None, help=f"blocks (Latte: spatial+temporal pairs); {sizes}")
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
            focus_prob=args.focus_prob,
            focus_range=tuple(args.focus_range),
        ),
        seed=args.seed,
        init_from=args.init_from,
        device=args.device,
        model_config=_model_config_from(args),
        family=args.family,
    )


if __name__ == "__main__":
    main()
