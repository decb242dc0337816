"""Running and timing: every method on every video, in rounds, with the peers' compute measured on the first video
and what must be calibrated for a peer calibrated first (untimed).

Wall time is measured in rounds: each round runs every method still due a repeat, so slow drift of a shared machine
hits all methods alike; a method's time is the median of its rounds.
"""

from __future__ import annotations

import contextlib
import logging
import statistics

import torch

from adacache_compile.testbed.demo import build_cached, generate
from adacache_compile.testbed.timing import timed_runs

from .adapters import layer_stack, peer_spec
from .cache_dit_peer import apply_cache_dit, cache_dit_candidates
from .diffusers_hooks import HookCandidate, HookedDenoiser, captured_warnings
from .methods import BenchMethod
from .scoring import score

__all__ = ["run_bench", "generate_peer"]

logger = logging.getLogger(__name__)


class _LinearFlops:
    """Counts multiply-adds of the nn.Linear layers inside the transformer blocks while active (context manager).

    A hook that skips a block, an attention layer or a batch half skips its linears, so the count of a hooked run
    over the count of the uncached run estimates the fraction of block compute it kept (attention score matmuls are
    not counted)."""

    def __init__(self, transformer: torch.nn.Module):
        self.linears = _block_linears(transformer)
        self.total = 0
        self._handles = []

    def _count(self, module, args):
        self.total += args[0].numel() // module.in_features * module.in_features * module.out_features

    def __enter__(self):
        self.total = 0
        self._handles = [linear.register_forward_pre_hook(self._count) for linear in self.linears]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False


def _block_linears(transformer: torch.nn.Module) -> list[torch.nn.Linear]:
    return [
        module
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name
    ]


class _LastBlockRuns:
    """Counts the calls of the last linear layer of the last block while active: a block-stack hook that skips a step
    does not run the last block, so per generation (one transformer call per step) the count is the steps on which
    the whole stack ran. A forward pre-hook on that one module: one Python call per computed step."""

    def __init__(self, transformer: torch.nn.Module):
        self.linear = _block_linears(transformer)[-1]
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0

    def _count(self, module, args):
        self.calls += 1

    def __enter__(self):
        self.calls = 0
        self._handle = self.linear.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def _sample(module, testbed, video, num_steps: int, progress: bool) -> torch.Tensor:
    from adacache_compile.testbed.sample import sample

    return sample(module, testbed, [video[:2]], [video[2]], num_steps=num_steps, progress=progress)


def generate_peer(testbed, method: BenchMethod, videos, num_steps: int, progress: bool = False):
    """``(seconds, videos)`` of a peer method (diffusers hook or cache-dit), applied to the model for this run only;
    ``method.peer_computed`` gets its per-video computed steps where they are known (cache-dit's own record; the
    last-block count of a block-stack hook)."""
    if method.cache_dit is not None:
        cache_config, calibrator_config = method.cache_dit(num_steps)
        with apply_cache_dit(testbed, cache_config, calibrator_config) as run:
            runs = timed_runs(
                lambda video: _sample(run.module, testbed, video, num_steps, progress),
                videos,
                before=run.reset,
                after=lambda: num_steps - len(run.cached_steps()),
            )
        method.peer_computed = runs.records
        return runs.total, runs.results
    module = layer_stack(testbed) if method.on_layers else testbed.transformer
    denoiser = HookedDenoiser(module, testbed, num_steps)
    counter = _LastBlockRuns(testbed.transformer) if method.on_layers else None
    module.enable_cache(method.hook(denoiser))
    denoiser.uncond_first = method.uncond_first
    try:
        with counter if counter is not None else contextlib.nullcontext():
            runs = timed_runs(
                lambda video: _sample(denoiser, testbed, video, num_steps, progress),
                videos,
                before=denoiser.reset if counter is None else lambda: (denoiser.reset(), counter.reset()),
                after=None if counter is None else lambda: counter.calls,
            )
        method.peer_computed = runs.records
        return runs.total, runs.results
    finally:
        module.disable_cache()


def _peer_compute(testbed, probe: BenchMethod, video, num_steps, reference_flops, reference_video):
    """``(fraction of block linear FLOPs, None, warnings)`` of a peer method on one video, or ``(None, reason,
    warnings)`` when it does not apply: it raises, or it runs and changes neither compute nor output. ``warnings``:
    what diffusers' hooks logged meanwhile."""
    counter = _LinearFlops(testbed.transformer)
    with captured_warnings() as warnings:
        try:
            with counter:
                _, (output,) = generate_peer(testbed, probe, [video], num_steps)
        except Exception as e:  # noqa: BLE001 - any failure of a foreign hook means "does not apply"; the message says why
            return None, f"raises {type(e).__name__}: {str(e).splitlines()[0]}", warnings
    fraction = counter.total / reference_flops
    if fraction == 1.0 and torch.equal(output, reference_video):
        return None, "runs but hooks nothing / skips nothing (output identical to uncached)", warnings
    return fraction, None, warnings


def _with_warnings(reason: str, warnings: list[str]) -> str:
    """A reason, with what the hook warned when it ran without applying (an exception says why by itself)."""
    if not warnings or reason.startswith("raises"):
        return reason
    return f"{reason}; it warned: {' | '.join(dict.fromkeys(warnings))}"


def _probe_peers(testbed, methods, videos, num_steps, candidates) -> dict[str, str]:
    """Calibrate what must be (untimed), measure each peer's compute on video 1, and probe what does not apply;
    returns ``{setting: reason}`` of what does not."""
    not_applicable = {}
    video = videos[0]
    counter = _LinearFlops(testbed.transformer)
    with counter:
        reference_video = _sample(testbed.transformer, testbed, video, num_steps, progress=False)
    for candidate in candidates or []:
        probe = BenchMethod("probe", None, family="hook", hook=candidate.make)
        _, reason, warnings = _peer_compute(testbed, probe, video, num_steps, counter.total, reference_video)
        if reason is not None:
            not_applicable[candidate.name] = _with_warnings(f"{reason} (needs {candidate.needs})", warnings)
        else:
            logger.warning("%s applies to this model but has no sweep in the bench", candidate.name)
    if candidates:
        spec = peer_spec(testbed.name)
        families = {m.family for m in methods}
        for name, reason in spec.not_applicable.items():
            if ("cache-dit" if name.startswith("cache-dit") else "hook") in families:
                not_applicable[name] = reason
        if "cache-dit" in families:
            not_applicable.update(cache_dit_candidates(testbed, video, num_steps, reference_video))
    for method in [m for m in methods if m.peer]:
        fraction, reason, warnings = _peer_compute(testbed, method, video, num_steps, counter.total, reference_video)
        method.peer_warnings = list(dict.fromkeys(warnings))
        if reason is not None and reason.startswith("raises"):
            raise RuntimeError(f"bench: peer method {method.name!r} does not apply: {_with_warnings(reason, warnings)}")
        if reason is not None:  # a mild setting may skip nothing on the first video (few steps, warm-up)
            logger.warning("bench: %s %s on video 1", method.name, reason)
            fraction = 1.0
        method.compute_fraction, method.compute_source = fraction, "linear FLOPs (video 1)"
    return not_applicable


def _calibrate_peers(testbed, methods, num_steps) -> dict[str, dict]:
    """Run each distinct ``method.calibration`` once (untimed) before anything is measured; returns their records."""
    records = {}
    for calibration in dict.fromkeys(m.calibration for m in methods if m.calibration is not None):
        logger.info("calibrating %s on %d videos", calibration.name, len(calibration.videos))
        records[calibration.name] = calibration.run(
            lambda method, videos: generate_peer(testbed, method, videos, num_steps), num_steps
        )
    return records


def run_bench(
    testbed,
    methods: list[BenchMethod],
    videos,
    num_steps: int = 50,
    candidates: list[HookCandidate] | None = None,
    progress: bool = False,
) -> dict:
    """Run every method on every video of ``testbed``; the first method must be the uncached reference.

    Returns ``scoring.score``'s record (``{"testbed": ..., "rows": [...], "not_applicable": {hook: reason}, ...}``).
    With `candidates` (diffusers hooks tried on the transformer itself), what does not apply is probed and recorded,
    with the testbed's known reasons (``PeerSpec.not_applicable``).
    """
    if methods[0].family != "uncached":
        raise ValueError("run_bench: the first method must be the uncached reference")
    calibrations = _calibrate_peers(testbed, methods, num_steps)
    not_applicable = {}
    if any(m.peer for m in methods) or candidates:
        not_applicable = _probe_peers(testbed, methods, videos, num_steps, candidates)

    cached = build_cached(testbed, methods, num_steps)
    for round_index in range(max(m.repeats for m in methods)):
        for method in methods:
            if round_index >= method.repeats:
                continue
            logger.info("round %d: %s", round_index + 1, method.name)
            if method.peer:
                seconds, outputs = generate_peer(testbed, method, videos, num_steps, progress)
                schedules = []
            else:
                # Untimed first: switching to a config with other MoReg strides or another forecast order
                # re-captures the programs lazily.
                generate(testbed, method, videos[:1], num_steps, cached, progress=False)
                seconds, outputs, schedules = generate(testbed, method, videos, num_steps, cached, progress)
            method.round_seconds.append(seconds)
            if round_index == 0:
                method.videos, method.schedules = outputs, schedules
    for method in methods:
        method.seconds = statistics.median(method.round_seconds)
    return score(testbed, methods, videos, num_steps, not_applicable, calibrations)
