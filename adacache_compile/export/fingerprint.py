"""The model fingerprint stamped into every exported ONNX file's ``metadata_props``, so a manifest edited to claim
another model is refused (the manifest's ``model.weights_sha256`` must equal the stamp of each file)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ArtifactError
from .staging import atomic_write_bytes

__all__ = ["FINGERPRINT_KEY", "onnx_fingerprint", "stamp_fingerprint"]

FINGERPRINT_KEY = "adacache.weights_sha256"


def stamp_fingerprint(path: Path, fingerprint: str) -> None:
    """Record ``fingerprint`` (the weights' sha256) in the ONNX file at ``path`` (rewritten atomically)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = model.metadata_props.add()
    entry.key, entry.value = FINGERPRINT_KEY, fingerprint
    atomic_write_bytes(path, model.SerializeToString())


def onnx_fingerprint(path: Path) -> str | None:
    """The fingerprint stamped in ``path`` (None if none), or ArtifactError when the file is not a whole ONNX model."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not a whole ONNX model
        raise ArtifactError(
            f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "the file is truncated or corrupt, re-export the directory"
        ) from e
    return next((p.value for p in model.metadata_props if p.key == FINGERPRINT_KEY), None)
