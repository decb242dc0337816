"""diffusers' cache hooks as peers: the denoiser wrapper that gives them what a pipeline would, their sweeps per
testbed, MagCache's calibration, and the hooks tried only to record why they do not apply.

Block-stack hooks (FirstBlockCache, MagCache, SeaCache) are enabled on the testbed's one list of whole layers
(``adapters.layer_stack``: a view of Latte, LTX-Video's transformer itself); attention- and module-level hooks (PAB,
FasterCache, TaylorSeer) on the transformer.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adapters import noise_levels, peer_spec, raw_vision_callback
from .methods import BenchMethod

__all__ = [
    "HookedDenoiser",
    "HookCandidate",
    "MagCacheCalibration",
    "hook_methods",
    "hook_candidates",
    "captured_warnings",
]

logger = logging.getLogger(__name__)

# Main knob of each hook, swept from mild to aggressive.
FASTER_CACHE_SKIP_RANGES = (2, 3, 4)  # spatial (and temporal) attention block skip range
TAYLORSEER_INTERVALS = (2, 3, 4, 6)  # cache_interval
FIRST_BLOCK_CACHE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)  # relative change of the first block's residual (0.05: default)
# SeaCache (threshold, max_consecutive_cached): the accumulated relative L1 change of its filtered input that triggers
# a computed step, and the cap on consecutive cached steps (default 0.25, 2). What issue 22 measured on an LTX-Video
# model (thr 0.1 K2 ... 2.0 K6: 33.9 ... 26.9 dB) plus one step between.
SEA_CACHE_SETTINGS = ((0.1, 2), (0.25, 2), (0.5, 3), (1.0, 4), (2.0, 6))
# MagCache (threshold, max_skip_steps): the accumulated magnitude-ratio error allowed before a computed step, and the
# cap on consecutive skipped steps (default 0.06, 3); its retention_ratio stays at its default 0.2.
MAG_CACHE_SETTINGS = ((0.03, 3), (0.06, 3), (0.12, 3), (0.24, 3), (0.48, 6))
# Batch-leading inputs of a transformer call, swapped when the unconditional half goes first (FasterCache).
_BATCHED_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask")


@dataclass(frozen=True)
class HookCandidate:
    """A diffusers cache hook tried on the transformer (not a view) before the sweep, only to record why it does not
    apply there; ``needs`` says what it requires."""

    name: str
    make: Callable[[HookedDenoiser], object]
    needs: str


class HookedDenoiser(torch.nn.Module):
    """``module`` (the transformer or a view of it) called the way the sampler calls it, plus what the diffusers cache
    hooks need from a pipeline.

    ``current_timestep`` is the timestep of the call in progress (PyramidAttentionBroadcast and FasterCache read it);
    ``step_index`` counts calls since :meth:`reset`. Each call runs inside ``module.cache_context("cfg",
    step_index=i, sigma=sigmas[i], num_inference_steps=N)``, as a pipeline enters it (SeaCache reads ``sigma``:
    ``adapters.noise_levels``). ``testbed`` is at hand for the hooks' config factories.
    """

    def __init__(self, module: torch.nn.Module, testbed, num_steps: int):
        super().__init__()
        self.transformer = module
        self.testbed = testbed
        self.num_steps = num_steps
        self.sigmas = noise_levels(testbed, num_steps)
        self.uncond_first = False
        self.current_timestep: float | None = None
        self.step_index = 0

    def reset(self) -> None:
        """Start a new generation: step counter and every stateful hook back to their initial state."""
        self.step_index = 0
        self.current_timestep = None
        self.transformer._reset_stateful_cache()

    def forward(self, **kwargs):
        self.current_timestep = float(kwargs["timestep"].flatten()[0])
        if self.uncond_first:
            kwargs = {k: _swap_halves(v) if k in _BATCHED_INPUTS and v is not None else v for k, v in kwargs.items()}
        if self.step_index >= self.num_steps:
            raise RuntimeError(
                f"HookedDenoiser: call {self.step_index + 1} of a {self.num_steps}-step generation; call reset() "
                "before each generation"
            )
        context = self.transformer.cache_context(
            "cfg",
            step_index=self.step_index,
            sigma=self.sigmas[self.step_index],
            num_inference_steps=self.num_steps,
        )
        with context:
            output = self.transformer(**kwargs)
        self.step_index += 1
        if self.uncond_first:
            output = (_swap_halves(output[0]), *output[1:])
        return output


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


@contextlib.contextmanager
def captured_warnings(logger_name: str = "diffusers.hooks"):
    """Collect the messages that ``logger_name`` (and its children) log at WARNING and above while the block runs:
    how diffusers' hooks say they fell back to running everything (SeaCache's "fail-open")."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    target = logging.getLogger(logger_name)
    target.addHandler(handler)
    try:
        yield messages
    finally:
        target.removeHandler(handler)


@dataclass(eq=False)  # one object shared by the settings of a sweep, told apart by identity
class MagCacheCalibration:
    """MagCache's magnitude ratios for one testbed and step count, obtained as its docs say: generations with
    ``MagCacheConfig(calibrate=True)`` (nothing skipped; at the end of each it logs one ratio per step), here on
    ``videos`` (``videos.peer_calibration_videos``, disjoint from the benchmark's), averaged per step over them, then
    passed back as ``mag_ratios``. :meth:`run` runs once per bench run; every MagCache setting shares the result."""

    videos: list
    ratios: list[float] | None = None
    per_video: list[list[float]] = field(default_factory=list)

    name = "MagCache"
    PREFIX = "MagCache Calibration Results: "

    def config(self, denoiser: HookedDenoiser, **settings):
        from diffusers.hooks import MagCacheConfig

        if self.ratios is None:
            raise RuntimeError("MagCache: mag_ratios not calibrated yet; run_bench calls MagCacheCalibration.run first")
        return MagCacheConfig(num_inference_steps=denoiser.num_steps, mag_ratios=list(self.ratios), **settings)

    def run(self, generate: Callable[[BenchMethod, list], object], num_steps: int) -> dict:
        """Calibrate with ``generate(method, videos)`` (runs a hook method on videos); returns the record."""
        from diffusers.hooks import MagCacheConfig

        probe = BenchMethod(
            "MagCache calibration",
            None,
            family="hook",
            hook=lambda d: MagCacheConfig(calibrate=True, num_inference_steps=d.num_steps),
            on_layers=True,
        )
        mag_logger = logging.getLogger("diffusers.hooks.mag_cache")
        level, propagate = mag_logger.level, mag_logger.propagate
        results: list[list[float]] = []

        class Collect(logging.Handler):
            def emit(self, record):
                message = record.getMessage()
                if message.startswith(MagCacheCalibration.PREFIX):
                    results.append(ast.literal_eval(message[len(MagCacheCalibration.PREFIX) :]))

        handler = Collect(level=logging.INFO)
        mag_logger.addHandler(handler)
        mag_logger.setLevel(logging.INFO)
        mag_logger.propagate = False
        try:
            # It also prints the list for a user to copy; the log record above is what is read.
            with contextlib.redirect_stdout(io.StringIO()):
                generate(probe, self.videos)
        finally:
            mag_logger.removeHandler(handler)
            mag_logger.setLevel(level)
            mag_logger.propagate = propagate
        if len(results) != len(self.videos) or any(len(r) != num_steps for r in results):
            raise RuntimeError(
                f"MagCache calibration: expected {len(self.videos)} lists of {num_steps} ratios (one per video, one "
                f"ratio per step), got lengths {[len(r) for r in results]}"
            )
        self.per_video = results
        self.ratios = [statistics.mean(step) for step in zip(*results)]
        return self.record()

    def record(self) -> dict:
        return {"videos": [list(v) for v in self.videos], "mag_ratios": self.ratios, "per_video": self.per_video}


def _pab_methods(spec) -> list[BenchMethod]:
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    methods = []
    for spatial, temporal, cross in spec.pab_ranges:

        def make(denoiser, spatial=spatial, temporal=temporal, cross=cross):
            return PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=spatial,
                temporal_attention_block_skip_range=temporal,
                cross_attention_block_skip_range=cross,
                current_timestep_callback=lambda: denoiser.current_timestep,
                **spec.pab_identifiers,
            )

        label = "/".join(f"{kind}{n}" for kind, n in zip("stc", (spatial, temporal, cross)) if n is not None)
        methods.append(BenchMethod(f"PAB {label}", None, family="hook", hook=make, group="PAB"))
    return methods


def _faster_cache_methods() -> list[BenchMethod]:
    from diffusers.hooks import FasterCacheConfig

    methods = []
    for skip in FASTER_CACHE_SKIP_RANGES:

        def make(denoiser, skip=skip):
            return FasterCacheConfig(
                spatial_attention_block_skip_range=skip,
                temporal_attention_block_skip_range=skip,
                current_timestep_callback=lambda: denoiser.current_timestep,
                tensor_format="BCFHW",
            )

        methods.append(
            BenchMethod(f"FasterCache s{skip}", None, family="hook", hook=make, uncond_first=True, group="FasterCache")
        )
    return methods


def _taylorseer_methods(spec) -> list[BenchMethod]:
    from diffusers.hooks import TaylorSeerCacheConfig

    methods = []
    for unit, identifiers in spec.taylorseer_units:
        for interval in TAYLORSEER_INTERVALS:

            def make(denoiser, interval=interval, identifiers=identifiers):
                return TaylorSeerCacheConfig(
                    cache_interval=interval, taylor_factors_dtype=torch.float32, cache_identifiers=list(identifiers)
                )

            methods.append(
                BenchMethod(
                    f"TaylorSeer {unit} interval={interval}",
                    None,
                    family="hook",
                    hook=make,
                    group=f"TaylorSeer ({unit})",
                )
            )
    return methods


def _block_stack_method(name: str, group: str, make, calibration=None) -> BenchMethod:
    return BenchMethod(name, None, family="hook", hook=make, on_layers=True, calibration=calibration, group=group)


def _first_block_cache_methods() -> list[BenchMethod]:
    from diffusers.hooks import FirstBlockCacheConfig

    return [
        _block_stack_method(
            f"FirstBlockCache r={threshold:g}",
            "FirstBlockCache",
            lambda d, t=threshold: FirstBlockCacheConfig(threshold=t),
        )
        for threshold in FIRST_BLOCK_CACHE_THRESHOLDS
    ]


def _sea_cache_methods(settings=SEA_CACHE_SETTINGS) -> list[BenchMethod]:
    from diffusers.hooks import SeaCacheConfig

    def make(denoiser, threshold, consecutive):
        return SeaCacheConfig(
            threshold=threshold,
            max_consecutive_cached=consecutive,
            raw_vision_callback=raw_vision_callback(denoiser.testbed),
        )

    return [
        _block_stack_method(
            f"SeaCache thr={threshold:g} K={consecutive}",
            "SeaCache",
            lambda d, t=threshold, k=consecutive: make(d, t, k),
        )
        for threshold, consecutive in settings
    ]


def _mag_cache_methods(calibration: MagCacheCalibration, settings=MAG_CACHE_SETTINGS) -> list[BenchMethod]:
    return [
        _block_stack_method(
            f"MagCache thr={threshold:g} K={skips}",
            "MagCache",
            lambda d, t=threshold, k=skips: calibration.config(d, threshold=t, max_skip_steps=k),
            calibration=calibration,
        )
        for threshold, skips in settings
    ]


def hook_methods(
    testbed_name: str = "latte-shapes",
    calibration_videos=None,
    sea_cache_settings=SEA_CACHE_SETTINGS,
    mag_cache_settings=MAG_CACHE_SETTINGS,
) -> list[BenchMethod]:
    """The diffusers hooks that apply to the testbed, each at a sweep of its main knob: PAB and TaylorSeer (and
    FasterCache where its denoiser hook can read the output as frames) on the transformer; FirstBlockCache, SeaCache
    and MagCache on its one list of layers. MagCache is calibrated on ``calibration_videos`` (default
    ``videos.peer_calibration_videos``) before its sweep runs."""
    from adacache_compile.testbed.families import FAMILIES

    from .videos import peer_calibration_videos

    spec = peer_spec(testbed_name)
    if calibration_videos is None:
        calibration_videos = peer_calibration_videos(FAMILIES[testbed_name])
    return [
        *_pab_methods(spec),
        *(_faster_cache_methods() if spec.faster_cache else []),
        *_taylorseer_methods(spec),
        *_first_block_cache_methods(),
        *_sea_cache_methods(sea_cache_settings),
        *_mag_cache_methods(MagCacheCalibration(list(calibration_videos)), mag_cache_settings),
    ]


def hook_candidates(testbed_name: str = "latte-shapes") -> list[HookCandidate]:
    """The hooks tried on the transformer itself to record why they do not apply there (``PeerSpec.candidates``):
    on Latte the block-stack hooks (the bench runs them on ``adapters.LatteLayers``), and on either testbed what its
    structure rules out."""
    from diffusers import hooks

    layers = "; the bench runs it on LatteLayers, one list of whole Latte layers"
    candidates = {
        "FirstBlockCache": HookCandidate(
            "FirstBlockCache", lambda d: hooks.FirstBlockCacheConfig(), "one residual from first block to last" + layers
        ),
        "MagCache": HookCandidate(
            "MagCache",
            lambda d: hooks.MagCacheConfig(calibrate=True, num_inference_steps=d.num_steps),
            "one residual from first block to last (calibration run)" + layers,
        ),
        "SeaCache": HookCandidate(
            "SeaCache",
            lambda d: hooks.SeaCacheConfig(raw_vision_callback=raw_vision_callback(d.testbed)),
            "one residual from first block to last, with the raw_vision_callback of the latents" + layers,
        ),
        "TextKVCache": HookCandidate(
            "TextKVCache", lambda d: hooks.TextKVCacheConfig(), "NucleusMoEImageTransformerBlock blocks"
        ),
        "FasterCache": HookCandidate(
            "FasterCache",
            lambda d: hooks.FasterCacheConfig(
                spatial_attention_block_skip_range=2,
                current_timestep_callback=lambda: d.current_timestep,
                tensor_format="BSC",
            ),
            "the transformer's output as frames (tensor_format BCFHW, BFCHW or BCHW), which its denoiser hook splits "
            "into spatial frequencies; LTX-Video's transformer returns packed tokens [B, S, C] (diffusers' own note: "
            "'TODO: Support BSC for LTX Video')",
        ),
    }
    return [candidates[name] for name in peer_spec(testbed_name).candidates]
