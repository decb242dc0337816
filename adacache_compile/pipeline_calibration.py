"""Calibrate AdaCache on your own model: record its per-step metrics on a few generations, then choose the codebook
with the least measured error at a target compute fraction (:func:`adacache_compile.calibration.select_config`).

Two entry points share :func:`calibrate_runs`:
- :func:`calibrate` for a diffusers pipeline: every transformer of the pipeline (Wan 2.2's two) and every CFG branch
  is recorded through :func:`adacache_compile.apply`, the pipeline is run on the calibration prompts and seeds, and
  the error of a candidate is measured on the pipeline's own output against the uncached output.
- :func:`calibrate_loop` for any sampling loop: a :class:`~adacache_compile.runtime.CachedTransformer` and a
  ``generate(index) -> tensor`` that runs one generation with it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .calibration import Calibration, base_config, metrics_from_stats, recorder_config, select_config
from .config import AdaCacheConfig

__all__ = ["calibrate", "calibrate_loop", "calibrate_runs", "TARGETS", "target_fraction"]

logger = logging.getLogger(__name__)

# Named targets: the compute fractions of the shipped 50-step fast / slow presets' calibration.
TARGETS = {"fast": 0.28, "slow": 0.45}
_IDENTICAL_PSNR = 100.0


def target_fraction(target: str | float) -> float:
    """``"fast"`` / ``"slow"`` or a fraction in (0, 1] of the steps to compute."""
    if isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(f"target {target!r}: expected one of {sorted(TARGETS)} or a fraction in (0, 1]")
        return TARGETS[target]
    if not 0 < float(target) <= 1:
        raise ValueError(f"target {target!r}: expected a fraction in (0, 1] of the steps to compute")
    return float(target)


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB) of ``output`` against ``reference`` over the reference's value range; identical counts 100 dB."""
    output, reference = output.detach().float().cpu(), reference.detach().float().cpu()
    mse = float((output - reference).square().mean())
    value_range = float(reference.max() - reference.min()) or 1.0
    return _IDENTICAL_PSNR if mse == 0 else min(_IDENTICAL_PSNR, 10 * math.log10(value_range**2 / mse))


def calibrate_runs(
    modules: Sequence,
    run: Callable[[int], torch.Tensor],
    num_runs: int,
    num_steps: int,
    target: str | float,
    *,
    base: AdaCacheConfig | None = None,
    progress: bool = True,
    **select_kwargs: Any,
) -> Calibration:
    """Record ``num_runs`` generations (``run(i)``, i < num_runs) with the rate-1 recorder of ``base`` on every
    cached module of ``modules``, then :func:`~adacache_compile.calibration.select_config` with ``evaluate`` running the
    same generations with a candidate: error = minus the mean PSNR against the recorded (uncached) outputs, fraction =
    computed steps / steps over every session of every module."""
    base = base or AdaCacheConfig(codebook=((1e6, 1),))
    fraction = target_fraction(target)

    def generate(config: AdaCacheConfig) -> tuple[list[torch.Tensor], list[dict]]:
        for module in modules:
            module.use_config(config)
        outputs, histories = [], []
        for i in _progress(range(num_runs), progress, "calibration runs"):
            starts = [module.generations_finished for module in modules]
            outputs.append(run(i))
            for module, start in zip(modules, starts):
                module.reset()  # the generation's sessions go to history (a pipeline call also ends with a reset)
                histories += module.history_since(start)
        return outputs, histories

    # Motion is recorded only when the target uses MoReg: not every model's tap has a frame layout MoReg can read.
    references, recorded = generate(recorder_config(base, record_motion=base.moreg is not None))
    runs = [metrics_from_stats(history) for history in recorded]
    logger.info("calibration: recorded %d sessions of %d runs", len(runs), num_runs)

    def evaluate(config: AdaCacheConfig):
        outputs, histories = generate(config)
        psnrs = [psnr(out, ref) for out, ref in zip(outputs, references)]
        computed = sum(len(h["computed_steps"]) for h in histories)
        steps = sum(h["steps_run"] for h in histories)
        mean_psnr = sum(psnrs) / len(psnrs)
        return -mean_psnr, computed / max(steps, 1), {"psnr": mean_psnr, "psnr_per_run": psnrs}

    return select_config(runs, num_steps, fraction, evaluate, base, log=logger.info, **select_kwargs)


def calibrate(
    pipe,
    prompts: Sequence[str] | str,
    *,
    num_inference_steps: int,
    target: str | float = "fast",
    seeds: Sequence[int] = (0,),
    forecast_order: int = 0,
    decision_metric: str = "change",
    progress: bool = True,
    report: bool = False,
    max_candidates: int = 5,
    max_evaluations: int = 10,
    **pipeline_kwargs: Any,
) -> AdaCacheConfig | Calibration:
    """An :class:`AdaCacheConfig` calibrated on ``pipe`` (a diffusers pipeline): the codebook with the least measured
    error at ``target`` (``"fast"``, ``"slow"`` or a compute fraction) for the given forecast order and decision
    metric, from ``len(prompts) * len(seeds)`` uncached generations of ``num_inference_steps`` steps and the same
    generations with each measured candidate. ``pipeline_kwargs`` go to every pipeline call (``height``, ``width``,
    ``num_frames``, ``guidance_scale``, ...; ``output_type`` defaults to ``"latent"``: the error is measured on the
    latents, which skips the VAE). ``report=True`` returns the whole :class:`~adacache_compile.calibration.Calibration`
    (``.config``, candidates, measured errors; ``.to_dict()`` is JSON-ready). The pipeline is left as it was."""
    from .diffusers_integration import apply, remove

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not seeds:
        raise ValueError("calibrate: needs at least one prompt and one seed")
    calls = [(prompt, seed) for prompt in prompts for seed in seeds]
    kwargs = {"output_type": "latent", **pipeline_kwargs}
    base = base_config(forecast_order, decision_metric)
    apply(pipe, base)  # calibrate_runs switches every module to the recorder, then to each candidate
    try:
        modules = list(vars(pipe)["_adacache_applied"].cached.values())

        def run(index: int) -> torch.Tensor:
            prompt, seed = calls[index]
            generator = torch.Generator().manual_seed(seed)
            result = pipe(prompt=prompt, num_inference_steps=num_inference_steps, generator=generator, **kwargs)
            return _output_tensor(result)

        calibration = calibrate_runs(
            modules,
            run,
            len(calls),
            num_inference_steps,
            target,
            base=base,
            progress=progress,
            max_candidates=max_candidates,
            max_evaluations=max_evaluations,
        )
    finally:
        remove(pipe)
    return calibration if report else calibration.config


def calibrate_loop(
    cached,
    generate: Callable[[int], torch.Tensor],
    num_runs: int,
    *,
    num_steps: int,
    target: str | float = "fast",
    base: AdaCacheConfig | None = None,
    progress: bool = True,
    report: bool = False,
    **select_kwargs: Any,
) -> AdaCacheConfig | Calibration:
    """:func:`calibrate` for a hand-written sampling loop: ``generate(i)`` runs generation ``i`` (``i < num_runs``,
    same inputs every time it is called with ``i``) calling ``cached`` once per step and returns its output; each
    call runs inside ``cached.generation(num_steps)``. ``base`` carries the forecast order and decision metric."""

    def run(index: int) -> torch.Tensor:
        with cached.generation(num_steps):
            return generate(index)

    calibration = calibrate_runs(
        [cached], run, num_runs, num_steps, target, base=base, progress=progress, **select_kwargs
    )
    return calibration if report else calibration.config


def _output_tensor(result) -> torch.Tensor:
    for name in ("frames", "images", "latents"):
        value = getattr(result, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        return result[0]
    raise TypeError(
        f"calibrate: the pipeline returned {type(result).__name__} without a tensor (.frames); pass output_type='pt' "
        "or 'latent'"
    )


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)
