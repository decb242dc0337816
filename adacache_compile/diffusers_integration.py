"""Put cached transformers into a diffusers pipeline, and take them out again.

:func:`apply` swaps ``pipe.transformer`` (and ``pipe.transformer_2`` where the pipeline has one) for
:class:`~adacache_compile.runtime.CachedTransformer` modules and wraps the scheduler's ``set_timesteps`` on the
instance, so each pipeline call tells the cached modules its schedule (how many steps the generation has: all of
them, or the tail a video-to-video pipeline runs from its first call's timestep on) and starts a new one.
Pipelines that name branch and step with ``cache_context`` (Wan, HunyuanVideo) would not need the hook, but the ones
that do not (Latte, Allegro) would otherwise never learn N, and then never reach the forced last steps N-1 and N.
:func:`remove` puts back exactly the objects :func:`apply` replaced.

diffusers is never imported here: a pipeline is only read through attributes it is known to have.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from .config import AdaCacheConfig
from .runtime import ProgramRuntime, optimize

__all__ = ["apply", "remove", "is_applied", "TRANSFORMER_ATTRIBUTES"]

logger = logging.getLogger(__name__)

# Pipeline attributes that may hold a denoiser; Wan 2.2 switches from the first to the second at a boundary timestep.
TRANSFORMER_ATTRIBUTES = ("transformer", "transformer_2")
_RECORD_ATTRIBUTE = "_adacache_applied"
_MISSING = object()


@dataclass
class _Applied:
    """What :func:`apply` changed on one pipeline, so that :func:`remove` can undo exactly that."""

    originals: dict[str, Any]
    cached: dict[str, ProgramRuntime]
    scheduler: Any
    # The scheduler's own instance attribute ``set_timesteps`` before wrapping (_MISSING: it used its class method).
    instance_set_timesteps: Any = _MISSING
    calls: list[int] = field(default_factory=list)


def apply(pipe, config: AdaCacheConfig | str | None = None, *, runtime=None, **optimize_kwargs):
    """Swap ``pipe``'s transformer(s) for cached ones (see :func:`~adacache_compile.optimize`); returns ``pipe``.

    ``config`` and ``optimize_kwargs`` go to ``optimize`` for every transformer. ``runtime``: run an exported
    runtime instead (``adacache_compile.load(dir, "onnxruntime")``; a dict ``{"transformer": ..., "transformer_2":
    ...}`` for a pipeline with two), with ``config`` switched in by ``use_config`` when given. N is learnt per
    pipeline call from the scheduler (``num_steps`` need not be given). The pipeline's config is left naming the
    original classes, so ``save_pretrained`` still writes loadable components. Undo with :func:`remove`.
    """
    if is_applied(pipe):
        raise RuntimeError(
            f"adacache is already applied to this {type(pipe).__name__}; call adacache_compile.remove(pipe) first"
        )
    present = {name: getattr(pipe, name, None) for name in TRANSFORMER_ATTRIBUTES}
    present = {name: module for name, module in present.items() if module is not None}
    if not present:
        raise ValueError(
            f"{type(pipe).__name__} has no transformer to cache: expected a module at "
            f"{' or '.join('pipe.' + name for name in TRANSFORMER_ATTRIBUTES)} (UNet pipelines are not supported)"
        )
    for name, module in present.items():
        if isinstance(module, ProgramRuntime):
            raise RuntimeError(
                f"pipe.{name} is already a {type(module).__name__}; pass the pipeline its original transformer "
                "(cached._orig_mod) before apply(), or use the cached module directly"
            )
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not callable(getattr(scheduler, "set_timesteps", None)):
        raise ValueError(
            f"{type(pipe).__name__}.scheduler has no set_timesteps(): adacache reads the step count from it"
        )

    if isinstance(config, str):
        config = AdaCacheConfig.preset(config)
    cached = _runtimes(runtime, present, config) if runtime is not None else None
    cached = cached or {name: optimize(module, config, **optimize_kwargs) for name, module in present.items()}
    record = _Applied(
        originals=present,
        cached=cached,
        scheduler=scheduler,
        instance_set_timesteps=vars(scheduler).get("set_timesteps", _MISSING),
    )
    scheduler.set_timesteps = _announcing_set_timesteps(pipe, scheduler, record)
    # object.__setattr__: DiffusionPipeline.__setattr__ would rewrite the pipeline config to name CachedTransformer.
    for name, module in cached.items():
        object.__setattr__(pipe, name, module)
    object.__setattr__(pipe, _RECORD_ATTRIBUTE, record)
    logger.info("adacache applied to %s: %s", type(pipe).__name__, ", ".join(f"pipe.{name}" for name in cached))
    return pipe


def _runtimes(runtime, present: dict[str, Any], config: AdaCacheConfig | None) -> dict[str, ProgramRuntime]:
    runtimes = dict(runtime) if isinstance(runtime, dict) else {"transformer": runtime}
    if set(runtimes) != set(present):
        raise ValueError(
            f"apply(runtime=...): the pipeline has {sorted(present)} but runtimes were given for {sorted(runtimes)}; "
            "pass a dict with one runtime per transformer"
        )
    for name, module in runtimes.items():
        if not isinstance(module, ProgramRuntime):
            raise TypeError(f"apply(runtime=...): {name} is a {type(module).__name__}, not adacache_compile.load(...)")
        if config is not None:
            module.use_config(config)
    return runtimes


def remove(pipe):
    """Undo :func:`apply`: the original transformer(s) and the scheduler's ``set_timesteps`` are put back; returns
    ``pipe``."""
    record = vars(pipe).get(_RECORD_ATTRIBUTE)
    if record is None:
        raise RuntimeError(
            f"adacache is not applied to this {type(pipe).__name__}: nothing to remove (apply it with "
            "adacache_compile.apply(pipe))"
        )
    for name, module in record.originals.items():
        if getattr(pipe, name, None) is not record.cached[name]:
            logger.warning("pipe.%s was replaced after apply(); restoring the original transformer anyway", name)
        object.__setattr__(pipe, name, module)
    scheduler = record.scheduler
    if record.instance_set_timesteps is _MISSING:
        vars(scheduler).pop("set_timesteps", None)
    else:
        scheduler.set_timesteps = record.instance_set_timesteps
    if getattr(pipe, "scheduler", None) is not scheduler:
        logger.warning(
            "pipe.scheduler was replaced after apply(); the new scheduler was never wrapped and is left as it is"
        )
    for cached in record.cached.values():
        cached._reset_stateful_cache()
    delattr(pipe, _RECORD_ATTRIBUTE)
    logger.info("adacache removed from %s", type(pipe).__name__)
    return pipe


def is_applied(pipe) -> bool:
    """Whether :func:`apply` has changed ``pipe`` and :func:`remove` has not undone it."""
    return _RECORD_ATTRIBUTE in vars(pipe)


def _announcing_set_timesteps(pipe, scheduler, record: _Applied):
    original = scheduler.set_timesteps

    @functools.wraps(original)
    def set_timesteps(*args, **kwargs):
        result = original(*args, **kwargs)
        num_steps = _calls_per_generation(scheduler)
        record.calls.append(num_steps)
        for cached in record.cached.values():
            # A pipeline calls set_timesteps once, before its loop: whatever ran before is a finished generation.
            cached._reset_stateful_cache()
            # N is the tail the loop runs: all of it, or from the first call's timestep on (strength pipelines).
            cached.announce_timesteps(scheduler.timesteps)
        logger.debug("adacache: %s generation of %d steps", type(pipe).__name__, num_steps)
        return result

    return set_timesteps


def _calls_per_generation(scheduler) -> int:
    """How many times a pipeline loop calls each transformer branch: once per entry of ``scheduler.timesteps``.

    Not ``len(timesteps) // scheduler.order``: second-order schedulers (Heun, KDPM2) interleave their extra
    timesteps into ``timesteps`` and the pipeline calls the model on each, and the runtime counts calls.
    """
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        raise RuntimeError(
            f"{type(scheduler).__name__}.set_timesteps() left no timesteps; adacache cannot tell the step count"
        )
    return len(timesteps)
