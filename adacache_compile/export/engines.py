"""``build_engines``: a TensorRT engine per program of an export directory, recorded in its manifest."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from .manifest import (
    ENGINE_SUFFIXES,
    gpu_versions,
    hash_artifacts,
    library_versions,
    read_export_manifest,
    verify_artifacts,
    write_manifest,
)

__all__ = ["build_engines"]

logger = logging.getLogger(__name__)


def build_engines(
    out_dir: str | os.PathLike,
    *,
    precision: str = "fp16",
    profiles: Mapping[str, Mapping[str, Mapping[str, int]]] | None = None,
    timing_cache: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Build ``<program>.plan`` for every program of the export in ``out_dir`` and record them in the manifest
    (with the TensorRT version and GPU they run on).

    ``profiles`` overrides the manifest's profile ranges per bound: ``{"max": {"batch": 4}, "opt": {...}}``.
    ``timing_cache`` defaults to ``out_dir/timing.cache``, so the skip build reuses the full build's tactics.
    """
    from .tensorrt import build_engine, derive_profiles

    out_dir = Path(out_dir)
    manifest = read_export_manifest(out_dir)
    verify_artifacts(out_dir, manifest, same_versions=())
    overrides = dict(profiles or {})
    unknown = set(overrides) - {"min", "opt", "max"}
    if unknown:
        raise ValueError(f"build_engines(profiles=...): keys {sorted(unknown)} are not min/opt/max")
    trt_profiles = derive_profiles(manifest, **overrides)
    timing_cache = Path(timing_cache) if timing_cache is not None else out_dir / "timing.cache"
    engines = {}
    for name, program in manifest.programs.items():
        logger.info("building the TensorRT engine of the %s program (%s)", name, precision)
        engines[name] = build_engine(
            out_dir / program.file,
            out_dir / f"{name}.plan",
            profiles=trt_profiles[name],
            precision=precision,
            timing_cache=timing_cache,
        )
    files = [f for f in manifest.files if not f.endswith(ENGINE_SUFFIXES)] + [p.name for p in engines.values()]
    manifest.files = hash_artifacts(out_dir, files)
    manifest.versions = {**library_versions(), **gpu_versions()}
    manifest.runtime["engines"] = {name: path.name for name, path in engines.items()}
    manifest.runtime["precision"] = precision
    write_manifest(out_dir, manifest)
    return engines
