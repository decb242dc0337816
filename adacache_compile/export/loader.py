"""``load``: an export directory, verified against its manifest, as an ``ExportedTransformer`` running the
onnxruntime or TensorRT programs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ArtifactError
from .fingerprint import onnx_header
from .manifest import (
    MANIFEST_NAME,
    ExportManifest,
    check_engine_environment,
    contained_path,
    gpu_versions,
    library_versions,
    model_fingerprint,
    read_export_manifest,
    verify_artifacts,
)

__all__ = ["BACKENDS", "load", "verify_export"]

BACKENDS = ("onnxruntime", "tensorrt")


def verify_export(out_dir: str | os.PathLike, manifest: ExportManifest, *, model: torch.nn.Module | None = None):
    """Refuse (``ArtifactError``) a directory whose files, model fingerprint or library versions do not match."""
    out_dir = Path(out_dir)
    verify_artifacts(out_dir, manifest, same_versions=("tensorrt",) if manifest.runtime.get("engines") else ())
    recorded = manifest.model.get("weights_sha256")
    for name, program in manifest.programs.items():
        program_dir = Path(program.file).parent.as_posix()
        stamped, locations = onnx_header(out_dir / program.file)
        for location in locations:
            # onnxruntime reads external data relative to the ONNX file: it must stay inside and be hashed.
            relative = location if program_dir == "." else f"{program_dir}/{location}"
            contained_path(out_dir, relative, f"program {name!r}: the ONNX external-data location {location!r}")
            if Path(relative).as_posix() not in manifest.files:
                raise ArtifactError(
                    f"{out_dir / program.file}: external data {location!r} has no sha256 in {MANIFEST_NAME}; a file "
                    "that load() reads must be listed and hashed in `files` (re-export the directory)"
                )
        if stamped != recorded:
            raise ArtifactError(
                f"{out_dir / MANIFEST_NAME}: model fingerprint {recorded} does not match the one {program.file} was "
                f"exported from ({stamped}); the manifest belongs to another model or was edited"
            )
    if model is not None:
        actual = model_fingerprint(model)
        if actual["weights_sha256"] != recorded:
            raise ArtifactError(
                f"{out_dir}: exported from another model ({manifest.model.get('class')}, weights {recorded}); the "
                f"given {actual['class']} has weights {actual['weights_sha256']}"
            )


def load(
    out_dir: str | os.PathLike,
    backend: str = "onnxruntime",
    providers: Sequence[str | tuple[str, dict]] | None = None,
    *,
    model: torch.nn.Module | None = None,
    cuda_graphs: bool = True,
    session_options=None,
):
    """Load an export directory as an :class:`~adacache_compile.export.runtime.ExportedTransformer`.

    ``backend``: ``"onnxruntime"`` (``providers`` and ``session_options`` as for an InferenceSession) or
    ``"tensorrt"`` (needs :func:`build_engines` first). ``model``: also check that the export was made from this model's weights.
    Raises ``ArtifactError`` naming the problem for a changed file, an edited or foreign manifest, an unknown
    format version or engines built for another TensorRT version or GPU (checked before TensorRT is imported).
    """
    from .runtime import ExportedTransformer

    if backend not in BACKENDS:
        raise ValueError(f"load(backend={backend!r}): expected one of {BACKENDS}")
    out_dir = Path(out_dir)
    manifest = read_export_manifest(out_dir)
    verify_export(out_dir, manifest, model=model)
    if backend == "onnxruntime":
        from .ort_backend import OrtProgram

        programs = {
            name: OrtProgram(out_dir / spec.file, providers=providers, session_options=session_options)
            for name, spec in manifest.programs.items()
        }
    else:
        programs = _trt_programs(out_dir, manifest, cuda_graphs)
    return ExportedTransformer(manifest, programs, backend=backend, source=out_dir)


def _trt_programs(out_dir: Path, manifest: ExportManifest, cuda_graphs: bool) -> dict:
    engines = manifest.runtime.get("engines") or {}
    if set(engines) != set(manifest.programs):
        raise ArtifactError(f"{out_dir}: no TensorRT engines recorded in the manifest; run build_engines first")
    paths = {}
    for name, file in engines.items():
        paths[name] = contained_path(out_dir, file, f"runtime.engines[{name!r}]")
        if file not in manifest.files:
            raise ArtifactError(
                f"{out_dir / file}: the {name} engine has no sha256 in {MANIFEST_NAME}; run build_engines again"
            )
    check_engine_environment(manifest.versions, {**library_versions(), **gpu_versions()}, str(out_dir))
    from .tensorrt import load_trt_programs

    io_names = {
        name: ([t.name for t in spec.inputs], [t.name for t in spec.outputs])
        for name, spec in manifest.programs.items()
    }
    return load_trt_programs(paths, io_names=io_names, cuda_graphs=cuda_graphs)
