"""Calibrate AdaCache on your own model: record a few generations, then choose the config with the least measured
error at a target compute — forecast order, policy (the AdaCache rule's codebook, a fixed grid, the input or the gap
policy) and placement searched jointly (:func:`adacache_compile.calibration.search_config`), any of them pinnable.

Two entry points share :func:`calibrate_runs`:
- :func:`calibrate` for a diffusers pipeline: every transformer of the pipeline (Wan 2.2's two) and every CFG branch
  is recorded through :func:`adacache_compile.apply`, the pipeline is run on the calibration prompts and seeds, and
  the error of a candidate is measured on the pipeline's own output against the uncached output.
- :func:`calibrate_loop` for any sampling loop: a :class:`~adacache_compile.runtime.CachedTransformer` and a
  ``generate(index) -> tensor`` that runs one generation with it.

Cost: one uncached generation per calibration input (the recording; its outputs are the references) and one cached
generation per input for every measured candidate; ``Calibration.cost`` counts them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .calibration import (
    KINDS,
    SEARCH_ORDERS,
    Calibration,
    CalibrationError,
    base_config,
    recorded_runs,
    recorder_config,
    search_config,
)
from .config import PRESETS, AdaCacheConfig

__all__ = [
    "calibrate",
    "calibrate_loop",
    "calibrate_runs",
    "record_runs",
    "CalibrationRecording",
    "TARGETS",
    "target_fraction",
    "DELTA_SAMPLES",
]

logger = logging.getLogger(__name__)

# Named targets: the compute fractions of the shipped 50-step fast / slow presets' calibration.
TARGETS = {"fast": 0.28, "slow": 0.45}
_IDENTICAL_PSNR = 100.0
# Elements of each fused delta kept per recorded step (the gap policy and the error proxy are simulated on them).
DELTA_SAMPLES = 16384


def target_fraction(target: str | float) -> float:
    """``"fast"`` / ``"slow"`` or a fraction in (0, 1] of the steps to compute (a preset name is measured by
    :func:`calibrate_runs`)."""
    if isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(
                f"target {target!r}: expected one of {sorted(TARGETS)}, a preset name or a fraction in (0, 1]"
            )
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


def _search_space(forecast_order, policy, decision_metric: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The (orders, kinds) a search covers: all, or the pinned ones (an int or a sequence of them; a name or a
    sequence of names)."""
    orders = SEARCH_ORDERS if forecast_order is None else tuple(_as_sequence(forecast_order))
    kinds = KINDS if policy is None else tuple(_as_sequence(policy))
    if decision_metric != "change" and (len(orders) != 1 or set(kinds) != {"adacache"}):
        raise CalibrationError(
            f"decision_metric={decision_metric!r} is recorded at one forecast order for the AdaCache rule: pin "
            "forecast_order=<0..2> and policy='adacache' (the default search uses the 'change' metric)"
        )
    return tuple(orders), kinds


@dataclass
class CalibrationRecording:
    """A rate-1 recording of the calibration inputs and what measures candidates on them: ``runs`` (one
    :class:`~adacache_compile.calibration.RecordedRun` per session), ``references`` (the uncached outputs),
    ``num_steps`` (the sessions' length) and :meth:`evaluate`; :meth:`calibrate` searches a target on it. A config is
    measured once (the runs are deterministic) and every target reuses the measurements."""

    modules: Sequence
    run: Callable[[int], torch.Tensor]
    num_runs: int
    runs: list
    references: list
    num_steps: int
    score: Callable[[torch.Tensor, torch.Tensor], float] = psnr
    progress: bool = True
    decision_metric: str = "change"
    measured: dict = field(default_factory=dict)

    def generate(self, config: AdaCacheConfig) -> tuple[list[torch.Tensor], list[dict]]:
        return _generate(self.modules, self.run, self.num_runs, config, self.progress)

    def evaluate(self, config: AdaCacheConfig) -> tuple[float, float, dict]:
        """``(-mean score, computed fraction, info)`` of ``config`` on the calibration inputs (score: PSNR against
        the references; fraction: computed steps / steps over every session of every module)."""
        key = config.to_json()
        if key not in self.measured:
            outputs, histories = self.generate(config)
            scores = [self.score(out, ref) for out, ref in zip(outputs, self.references)]
            computed = sum(len(h["computed_steps"]) for h in histories)
            total = sum(h["steps_run"] for h in histories)
            mean = sum(scores) / len(scores)
            self.measured[key] = (-mean, computed / max(total, 1), {"psnr": mean, "psnr_per_run": scores})
        return self.measured[key]

    def calibrate(
        self,
        target: str | float,
        *,
        forecast_order: int | None = None,
        policy: str | Sequence[str] | None = None,
        max_candidates: int = 6,
        max_evaluations: int = 12,
        tolerance: float | None = None,
        extra: dict[str, AdaCacheConfig] | None = None,
        log: Callable[[str], object] | None = None,
    ) -> Calibration:
        """The search (:func:`~adacache_compile.calibration.search_config`) for ``target``: a fraction, ``"fast"`` /
        ``"slow"``, or a preset name (its compute measured on these runs, and the preset itself a candidate);
        ``forecast_order`` and ``policy`` pin the search. ``Calibration.cost`` counts the generations this target
        needed on its own: the recording and every config it measured."""
        orders, kinds = _search_space(forecast_order, policy, self.decision_metric)
        extra = dict(extra or {})
        before = set(self.measured)
        asked: set[str] = set()

        def evaluate(config: AdaCacheConfig):
            asked.add(config.to_json())
            return self.evaluate(config)

        if isinstance(target, str) and target in PRESETS:
            _, fraction, _ = evaluate(PRESETS[target])
            extra[f"preset:{target}"] = PRESETS[target]
            logger.info("calibration: preset %s computes %.3f of the steps on these runs", target, fraction)
        else:
            fraction = target_fraction(target)
        calibration = search_config(
            self.runs,
            self.num_steps,
            fraction,
            evaluate,
            orders=orders,
            kinds=kinds,
            decision_metric=self.decision_metric,
            extra=extra,
            max_candidates=max_candidates,
            max_evaluations=max_evaluations,
            tolerance=tolerance,
            log=log or logger.info,
        )
        calibration.cost = {
            "uncached_generations": self.num_runs,
            "cached_generations": self.num_runs * len(asked),
            "new_cached_generations": self.num_runs * len(asked - before),
            "note": "generations of the calibration inputs: the recording (uncached), then each config measured for "
            "this target (new: not measured for an earlier target of the same recording)",
        }
        return calibration


def _generate(modules, run, num_runs: int, config: AdaCacheConfig, progress: bool, recordings: list | None = None):
    for module in modules:
        module.use_config(config)
    outputs, histories = [], []
    for i in _progress(range(num_runs), progress, "calibration runs"):
        starts = [module.generations_finished for module in modules]
        outputs.append(run(i))
        for module, start in zip(modules, starts):
            module.reset()  # the generation's sessions go to history (a pipeline call also ends with a reset)
            histories += module.history_since(start)
            if recordings is not None:
                recordings += module.take_recordings()
    return outputs, histories


def record_runs(
    modules: Sequence,
    run: Callable[[int], torch.Tensor],
    num_runs: int,
    *,
    forecast_order: int | None = None,
    decision_metric: str = "change",
    samples: int = DELTA_SAMPLES,
    score: Callable[[torch.Tensor, torch.Tensor], float] = psnr,
    progress: bool = True,
) -> CalibrationRecording:
    """Record ``num_runs`` generations (``run(i)``, i < num_runs) at rate 1 on every cached module of ``modules``:
    every step computed, so the outputs are the uncached references; per session the AdaCache metric, the latent
    input's change and ``samples`` elements of each fused delta per step. ``decision_metric="forecast"`` records the
    forecast metric at the pinned ``forecast_order``."""
    if decision_metric != "change" and forecast_order is None:
        raise CalibrationError(f"decision_metric={decision_metric!r} is recorded at one forecast order: pin it")
    order = _as_sequence(forecast_order)[0] if decision_metric != "change" else 0
    recorder = recorder_config(base_config(order, decision_metric), record_motion=False)
    recordings: list = []
    with contextlib.ExitStack() as stack:
        for module in modules:
            module.use_config(recorder)
            stack.enter_context(module.recording(samples))
        references, recorded = _generate(modules, run, num_runs, recorder, progress, recordings)
    runs = recorded_runs(recorded, recordings)
    lengths = sorted({r.num_steps for r in runs})
    if len(lengths) != 1:
        raise CalibrationError(f"the recorded sessions ran {lengths} steps; calibrate generations of one length")
    logger.info("calibration: recorded %d sessions of %d runs, %d steps each", len(runs), num_runs, lengths[0])
    return CalibrationRecording(
        list(modules), run, num_runs, runs, references, lengths[0], score, progress, decision_metric
    )


def _as_sequence(value) -> list:
    return [value] if isinstance(value, (int, str)) else list(value)


def calibrate_runs(
    modules: Sequence,
    run: Callable[[int], torch.Tensor],
    num_runs: int,
    num_steps: int,
    target: str | float,
    *,
    forecast_order: int | None = None,
    policy: str | Sequence[str] | None = None,
    decision_metric: str = "change",
    progress: bool = True,
    samples: int = DELTA_SAMPLES,
    **search_kwargs: Any,
) -> Calibration:
    """:func:`record_runs`, then :meth:`CalibrationRecording.calibrate` for ``target``: forecast order (0, 1, 2),
    policy (``"adacache"``, ``"grid"``, ``"input"``, ``"gap"``, or several) and placement searched jointly, unless
    ``forecast_order`` / ``policy`` pin them. ``num_steps`` is the generation's N; a pipeline that runs only a tail
    (video-to-video) is calibrated on the steps its sessions ran."""
    _search_space(forecast_order, policy, decision_metric)  # refuse a bad pin before recording anything
    recording = record_runs(
        modules,
        run,
        num_runs,
        forecast_order=forecast_order,
        decision_metric=decision_metric,
        samples=samples,
        progress=progress,
    )
    if recording.num_steps != num_steps:
        logger.info("calibration: the sessions run %d of the %d steps", recording.num_steps, num_steps)
    return recording.calibrate(target, forecast_order=forecast_order, policy=policy, **search_kwargs)


def calibrate(
    pipe,
    prompts: Sequence[str] | str,
    *,
    num_inference_steps: int,
    target: str | float = "fast",
    seeds: Sequence[int] = (0,),
    forecast_order: int | None = None,
    policy: str | Sequence[str] | None = None,
    decision_metric: str = "change",
    progress: bool = True,
    report: bool = False,
    max_candidates: int = 6,
    max_evaluations: int = 12,
    **pipeline_kwargs: Any,
) -> AdaCacheConfig | Calibration:
    """An :class:`AdaCacheConfig` calibrated on ``pipe`` (a diffusers pipeline): the config with the least measured
    error at ``target`` (``"fast"``, ``"slow"``, a preset name or a compute fraction) over forecast orders, policies
    and placements (pin them with ``forecast_order`` / ``policy``), from ``len(prompts) * len(seeds)`` uncached
    generations of ``num_inference_steps`` steps and the same generations with each measured candidate.
    ``pipeline_kwargs`` go to every pipeline call (``height``, ``width``, ``num_frames``, ``guidance_scale``, ...;
    ``output_type`` defaults to ``"latent"``: the error is measured on the latents, which skips the VAE).
    ``report=True`` returns the whole :class:`~adacache_compile.calibration.Calibration` (``.config``, candidates,
    measured errors, ``.landed``, ``.achieved_fraction``, ``.cost``; ``.to_dict()`` is JSON-ready). The pipeline is
    left as it was."""
    from .diffusers_integration import apply, remove

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not seeds:
        raise ValueError("calibrate: needs at least one prompt and one seed")
    calls = [(prompt, seed) for prompt in prompts for seed in seeds]
    kwargs = {"output_type": "latent", **pipeline_kwargs}
    apply(pipe, base_config(0))  # calibrate_runs switches every module to the recorder, then to each candidate
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
            forecast_order=forecast_order,
            policy=policy,
            decision_metric=decision_metric,
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
    forecast_order: int | None = None,
    policy: str | Sequence[str] | None = None,
    base: AdaCacheConfig | None = None,
    progress: bool = True,
    report: bool = False,
    **search_kwargs: Any,
) -> AdaCacheConfig | Calibration:
    """:func:`calibrate` for a hand-written sampling loop: ``generate(i)`` runs generation ``i`` (``i < num_runs``,
    same inputs every time it is called with ``i``) calling ``cached`` once per step and returns its output; each
    call runs inside ``cached.generation(num_steps)``. ``base`` (e.g. ``calibration.base_config(2)``) pins the
    forecast order and decision metric as ``forecast_order`` / ``decision_metric`` would."""
    if base is not None:
        if forecast_order is not None and forecast_order != base.forecast_order:
            raise CalibrationError(
                f"calibrate_loop: forecast_order={forecast_order} and base.forecast_order={base.forecast_order} "
                "disagree; give one"
            )
        forecast_order = base.forecast_order
        search_kwargs.setdefault("decision_metric", base.decision_metric)

    def run(index: int) -> torch.Tensor:
        with cached.generation(num_steps):
            return generate(index)

    calibration = calibrate_runs(
        [cached],
        run,
        num_runs,
        num_steps,
        target,
        forecast_order=forecast_order,
        policy=policy,
        progress=progress,
        **search_kwargs,
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
