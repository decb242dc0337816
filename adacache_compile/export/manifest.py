"""``manifest.json``: what an export directory holds and what it was made from.

The manifest records the AdaCache config, every program's I/O (names, shapes, dtypes, dynamic axes and role), the
MoReg layout, the profile ranges of the dynamic axes, the sha256 of every artifact file, a fingerprint of the source
model and the library versions. ``verify_artifacts`` refuses a directory whose files do not match it.

An export made by ``to_onnx`` (:class:`ExportManifest`) adds a ``runtime`` section, what a runtime needs to rebuild
calls: the call's pytree in/out specs (``treespec_dumps``), the non-tensor constants of the captured call, the forward
signature (to bind positional and keyword spellings the way capture did), ``num_outputs``, delta names, the tap dtype,
the block names, the tap shape as a tiny op list over input dims (see ``axes.TapShape``; no eval of manifest text) and,
after ``build_engines``, the engine files and their precision.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError
from .staging import atomic_write_text

__all__ = [
    "ENGINE_SUFFIXES",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "READABLE_FORMAT_VERSIONS",
    "ROLES",
    "SINGLE_FILE",
    "TWO_PROGRAMS",
    "ExportManifest",
    "Manifest",
    "ProgramSpec",
    "TensorSpec",
    "check_engine_environment",
    "contained_path",
    "gpu_versions",
    "hash_artifacts",
    "library_versions",
    "model_fingerprint",
    "read_export_manifest",
    "read_manifest",
    "sha256_file",
    "verify_artifacts",
    "write_manifest",
]

logger = logging.getLogger(__name__)

# 2: the metrics vector holds ||tap|| (MetricValues.tap_norm); a forecasting skip program takes delta slots and
# forecast_weights.
# 3: ``layout`` ("two_programs": full + skip; "single_file": one conditional program "cached" whose extra input
# ``compute`` has role "compute"), and ``runtime.delta_shapes`` (a shape formula per delta, for zero stand-ins).
# A version 2 manifest reads as layout "two_programs" (the only one it could hold).
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (2, 3)
MANIFEST_NAME = "manifest.json"
TWO_PROGRAMS, SINGLE_FILE = "two_programs", "single_file"
LAYOUTS = {TWO_PROGRAMS: ("full", "skip"), SINGLE_FILE: ("cached",)}  # layout -> its programs
# What each program input/output is to the runtime.
ROLES = ("model_input", "model_output", "delta", "tap", "tap_prev", "metric", "forecast_weights", "compute")
# TensorRT plans run only under the TensorRT version that built them.
ENGINE_SUFFIXES = (".plan", ".engine")
# What a TensorRT plan is tied to: the TensorRT version and the GPU (tactics and kernels are chosen per device).
ENGINE_ENVIRONMENT = ("tensorrt", "gpu", "compute_capability")
_CHUNK = 1 << 20


@dataclass
class TensorSpec:
    """One program input or output. ``shape`` holds ints for static axes and the axis name (or None) for dynamic ones;
    ``dtype`` is the torch dtype without the ``torch.`` prefix ("float32")."""

    name: str
    shape: list[int | str | None]
    dtype: str
    role: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"tensor {self.name!r}: role {self.role!r} is not one of {ROLES}")


@dataclass
class ProgramSpec:
    """One exported program: its ONNX file (relative to the export directory) and its I/O.
    ``dynamic_axes`` maps tensor names to ``{axis: axis_name}``."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)

    def names(self, role: str, *, outputs: bool = False) -> list[str]:
        """Names of the inputs (or outputs) with ``role``, in order."""
        return [t.name for t in (self.outputs if outputs else self.inputs) if t.role == role]


@dataclass
class Manifest:
    """Contents of ``manifest.json``. ``config`` and ``moreg_layout`` are owned by the runtime and stored as given;
    ``profile_ranges`` maps an axis name to ``{"min": .., "opt": .., "max": ..}``; ``files`` maps every artifact file
    (relative path, external data and engines included) to its sha256."""

    config: dict[str, Any]
    programs: dict[str, ProgramSpec]
    moreg_layout: dict[str, Any] = field(default_factory=dict)
    profile_ranges: dict[str, dict[str, int]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    layout: str = TWO_PROGRAMS

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = MANIFEST_NAME) -> Manifest:
        version = data.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ArtifactError(
                f"{source}: unknown format version {version!r}; this adacache_compile reads versions "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}, re-export with the installed version"
            )

        try:
            programs = {
                name: ProgramSpec(
                    file=spec["file"],
                    inputs=[TensorSpec(**t) for t in spec["inputs"]],
                    outputs=[TensorSpec(**t) for t in spec["outputs"]],
                    dynamic_axes={
                        tensor: {int(axis): axis_name for axis, axis_name in axes.items()}
                        for tensor, axes in spec.get("dynamic_axes", {}).items()
                    },
                )
                for name, spec in data["programs"].items()
            }
            fields = {f.name for f in dataclasses.fields(cls)} - {"programs"}
            return cls(programs=programs, **{k: v for k, v in data.items() if k in fields})
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{source}: malformed manifest: {e}") from e


@dataclass
class ExportManifest(Manifest):
    """:class:`Manifest` plus ``runtime``: what a runtime needs to rebuild calls (see the module docstring)."""

    runtime: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_artifacts(out_dir: str | os.PathLike, files: Iterable[str | os.PathLike]) -> dict[str, str]:
    """``{path relative to out_dir: sha256}`` for ``files`` (absolute or relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    hashes = {}
    for file in files:
        file = Path(file)
        absolute = file if file.is_absolute() else out_dir / file
        hashes[absolute.relative_to(out_dir).as_posix()] = sha256_file(absolute)
    return dict(sorted(hashes.items()))


def write_manifest(out_dir: str | os.PathLike, manifest: Manifest) -> Path:
    return atomic_write_text(Path(out_dir) / MANIFEST_NAME, manifest.to_json())


def read_manifest(out_dir: str | os.PathLike, cls: type[Manifest] | None = None) -> Manifest:
    """The manifest of ``out_dir`` as ``cls`` (a :class:`Manifest` subclass; default ``Manifest``), or ArtifactError."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: missing; is {out_dir} an adacache-compile export directory?") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return (cls or Manifest).from_dict(data, source=str(path))


def read_export_manifest(out_dir: str | os.PathLike) -> ExportManifest:
    """The manifest of a ``to_onnx`` export directory, or ArtifactError (also when it has no ``runtime`` section, or
    programs other than its ``layout``'s)."""
    manifest = read_manifest(out_dir, ExportManifest)
    source = Path(out_dir) / MANIFEST_NAME
    if not isinstance(manifest.runtime, dict) or not manifest.runtime:
        raise ArtifactError(f"{source}: malformed manifest: no 'runtime' section (not written by to_onnx?)")
    if manifest.layout not in LAYOUTS or set(manifest.programs) != set(LAYOUTS[manifest.layout]):
        raise ArtifactError(
            f"{source}: malformed manifest: layout {manifest.layout!r} with programs {sorted(manifest.programs)}; "
            "expected "
            + " or ".join(f"layout {name!r} with programs {list(programs)}" for name, programs in LAYOUTS.items())
        )
    return manifest


def contained_path(out_dir: str | os.PathLike, name: str, what: str) -> Path:
    """``out_dir / name`` when ``name`` is a relative path that stays inside ``out_dir`` (symbolic links resolved);
    ``ArtifactError`` naming ``what`` (a manifest field, an ONNX external-data location) otherwise. A manifest is data:
    it must not make ``load`` read a file outside the directory it was asked to load."""
    out_dir = Path(out_dir)
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{out_dir / MANIFEST_NAME}: {what}: expected a relative file name, got {name!r}")
    relative = Path(name)
    if relative.is_absolute() or name.startswith(("/", "\\")) or ".." in relative.parts or "\\" in name:
        raise ArtifactError(
            f"{out_dir / MANIFEST_NAME}: {what} is {name!r}: every file of an export directory must be named "
            "relative to the directory, without '..' (re-export the directory)"
        )
    path = out_dir / relative
    root = out_dir.resolve()
    if not path.resolve().is_relative_to(root):
        raise ArtifactError(
            f"{out_dir / MANIFEST_NAME}: {what} is {name!r}, which resolves to {path.resolve()}, outside {root} "
            "(a symbolic link out of the export directory); copy the file into the directory and re-export"
        )
    return path


def verify_artifacts(
    out_dir: str | os.PathLike, manifest: Manifest, *, same_versions: Sequence[str] | None = None
) -> None:
    """Raise ``ArtifactError`` unless every file of ``manifest`` exists with the recorded sha256, and every library in
    ``same_versions`` that is installed has the recorded version (default: tensorrt when there are engine files)."""
    out_dir = Path(out_dir)
    if manifest.format_version not in READABLE_FORMAT_VERSIONS:
        raise ArtifactError(
            f"{out_dir / MANIFEST_NAME}: unknown format version {manifest.format_version!r}; expected one of "
            f"{list(READABLE_FORMAT_VERSIONS)}"
        )
    for name in manifest.files:
        contained_path(out_dir, name, f"files[{name!r}]")
    for program_name, program in manifest.programs.items():
        contained_path(out_dir, program.file, f"programs[{program_name!r}].file")
        if program.file not in manifest.files:
            raise ArtifactError(f"{out_dir / program.file}: program {program_name!r} has no sha256 in the manifest")
    for name, expected in manifest.files.items():
        path = out_dir / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in {MANIFEST_NAME})")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{path}: sha256 mismatch: manifest has {expected}, file has {actual}; the file was changed or "
                "replaced after export, re-export the directory"
            )
    if same_versions is None:
        same_versions = ("tensorrt",) if any(name.endswith(ENGINE_SUFFIXES) for name in manifest.files) else ()
    installed = library_versions()
    for library in same_versions:
        recorded, current = manifest.versions.get(library), installed.get(library)
        if recorded is not None and current is not None and recorded != current:
            raise ArtifactError(
                f"{out_dir}: artifacts were built with {library} {recorded}, {library} {current} is installed; "
                "rebuild them with the installed version"
            )


_DISTRIBUTIONS = {
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxscript": ("onnxscript",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "polygraphy": ("polygraphy",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu12", "tensorrt_cu13"),
    "adacache_compile": ("adacache-compile",),
}


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the artifacts (absent ones omitted). Read from package
    metadata, so nothing is imported."""
    versions = {}
    for library, distributions in _DISTRIBUTIONS.items():
        for distribution in distributions:
            try:
                versions[library] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v) for v in items]
    return str(value)


def model_fingerprint(module: torch.nn.Module) -> dict[str, Any]:
    """Class, config (diffusers ``module.config`` when present) and a sha256 over the state_dict: every tensor's
    name, dtype, shape and bytes in sorted-name order, so the same weights give the same hash in any process."""
    digest = hashlib.sha256()
    num_elements = 0
    for name, tensor in sorted(module.state_dict().items()):
        if tensor.is_meta:
            raise ArtifactError(f"cannot fingerprint {type(module).__name__}: {name!r} is on the meta device")
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        num_elements += tensor.numel()
    config = getattr(module, "config", None)
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "config": _jsonable(dict(config)) if isinstance(config, Mapping) else None,
        "num_elements": num_elements,
        "weights_sha256": digest.hexdigest(),
    }


def gpu_versions() -> dict[str, str]:
    """The current CUDA GPU's name and compute capability (``{"gpu": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0"}``); empty without a CUDA GPU."""
    if not torch.cuda.is_available():
        return {}
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def check_engine_environment(recorded: Mapping[str, str], current: Mapping[str, str], source: str) -> None:
    """Raise ``ArtifactError`` naming both sides unless TensorRT engines built where ``recorded`` (a manifest's
    ``versions``) can run where ``current`` (``{**library_versions(), **gpu_versions()}``): same TensorRT version,
    same GPU, same compute capability. A manifest from before the GPU was recorded is accepted with a warning."""
    for key in ENGINE_ENVIRONMENT:
        built, here = recorded.get(key), current.get(key)
        if built is None:
            logger.warning(
                "%s: the manifest does not record the %s the engines were built for; not checked", source, key
            )
        elif here is None:
            raise ArtifactError(
                f"{source}: the TensorRT engines were built for {key} {built!r}, and none is available here "
                f"({'no CUDA GPU is visible' if key != 'tensorrt' else 'tensorrt is not installed'})"
            )
        elif built != here:
            raise ArtifactError(
                f"{source}: the TensorRT engines were built for {key} {built!r}, this machine has {key} {here!r}; "
                "engines only run on the TensorRT version and GPU they were built for: rebuild them here with "
                "build_engines()"
            )
