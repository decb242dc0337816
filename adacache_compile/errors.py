"""Exceptions raised by adacache-compile. Every message names the module / node / input / field at fault."""

__all__ = ["AdaCacheError", "UnsupportedModelError", "CaptureError", "PassError", "InputMismatchError", "ArtifactError"]


class AdaCacheError(Exception):
    """Base class of every error this package raises on purpose."""


class UnsupportedModelError(AdaCacheError):
    """The model has no structure AdaCache can cache (no block stack, non-residual blocks, ...)."""


class CaptureError(UnsupportedModelError):
    """torch.export could not capture the model with the given inputs."""


class PassError(AdaCacheError):
    """A graph pass failed; the message names the pass and the node."""


class InputMismatchError(AdaCacheError, ValueError):
    """A call's inputs do not match what the captured programs were built for."""


class ArtifactError(AdaCacheError):
    """An exported artifact (ONNX file, manifest, engine) is missing, corrupt or does not match."""
