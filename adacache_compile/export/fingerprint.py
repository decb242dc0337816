"""The model fingerprint stamped into every exported ONNX file's ``metadata_props``, so a manifest edited to claim
another model is refused (the manifest's ``model.weights_sha256`` must equal the stamp of each file)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..errors import ArtifactError
from .staging import atomic_write_bytes

__all__ = ["FINGERPRINT_KEY", "OnnxHeader", "onnx_fingerprint", "onnx_header", "stamp_fingerprint"]

FINGERPRINT_KEY = "adacache.weights_sha256"


def stamp_fingerprint(path: Path, fingerprint: str) -> None:
    """Record ``fingerprint`` (the weights' sha256) in the ONNX file at ``path`` (rewritten atomically)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = model.metadata_props.add()
    entry.key, entry.value = FINGERPRINT_KEY, fingerprint
    atomic_write_bytes(path, model.SerializeToString())


class OnnxHeader(NamedTuple):
    """What ``load`` reads of an ONNX file before any session: its stamped fingerprint (None if none) and the
    external-data locations its initializers name (relative to the file, as onnxruntime resolves them)."""

    fingerprint: str | None
    external_locations: list[str]


def onnx_header(path: Path) -> OnnxHeader:
    """The :class:`OnnxHeader` of ``path``, or ArtifactError when the file is not a whole ONNX model."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not a whole ONNX model
        raise ArtifactError(
            f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "the file is truncated or corrupt, re-export the directory"
        ) from e
    locations = {
        entry.value
        for tensor in _get_all_tensors(model)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    fingerprint = next((p.value for p in model.metadata_props if p.key == FINGERPRINT_KEY), None)
    return OnnxHeader(fingerprint, sorted(locations))


def onnx_fingerprint(path: Path) -> str | None:
    """The fingerprint stamped in ``path`` (None if none), or ArtifactError when the file is not a whole ONNX model."""
    return onnx_header(path).fingerprint
