"""adacache-compile: AdaCache (adaptive caching + MoReg) for video diffusion transformers as torch.fx passes.

Entry points: :func:`optimize` (a drop-in cached module), :func:`apply` / :func:`remove` (diffusers pipelines),
:func:`load` (exported ONNX / TensorRT programs), :func:`calibrate` (a config for your own pipeline),
:class:`AdaCacheConfig`.
"""

from .config import AdaCacheConfig, MoRegConfig
from .errors import (
    AdaCacheError,
    ArtifactError,
    CaptureError,
    InputMismatchError,
    PassError,
    UnsupportedModelError,
)
from .runtime import CachedTransformer, Session, optimize

__version__ = "0.1.0"

__all__ = [
    "AdaCacheConfig",
    "MoRegConfig",
    "CachedTransformer",
    "Session",
    "optimize",
    "apply",
    "remove",
    "load",
    "calibrate",
    "calibrate_loop",
    "AdaCacheError",
    "ArtifactError",
    "CaptureError",
    "InputMismatchError",
    "PassError",
    "UnsupportedModelError",
]


def apply(pipe, config=None, **kwargs):
    """Swap a diffusers pipeline's transformer(s) for cached ones; undo with :func:`remove`."""
    from .diffusers_integration import apply as _apply

    return _apply(pipe, config, **kwargs)


def remove(pipe):
    """Undo :func:`apply`: the pipeline gets its original transformer(s) and scheduler back."""
    from .diffusers_integration import remove as _remove

    return _remove(pipe)


def calibrate(pipe, prompts, **kwargs):
    """Calibrate a config on your own diffusers pipeline (see :func:`adacache_compile.pipeline_calibration.calibrate`)."""
    from .pipeline_calibration import calibrate as _calibrate

    return _calibrate(pipe, prompts, **kwargs)


def calibrate_loop(cached, generate, num_runs, **kwargs):
    """Calibrate on a hand-written loop (see :func:`adacache_compile.pipeline_calibration.calibrate_loop`)."""
    from .pipeline_calibration import calibrate_loop as _calibrate_loop

    return _calibrate_loop(cached, generate, num_runs, **kwargs)


def load(out_dir, backend: str = "onnxruntime", **kwargs):
    """Load exported programs (see :mod:`adacache_compile.export`) as a runtime with the same call signature."""
    from .export import load as _load

    return _load(out_dir, backend=backend, **kwargs)
