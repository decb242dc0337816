"""Export a cached model's full and skip programs to ONNX, build TensorRT engines, and load them back.

``to_onnx(cached, out_dir)`` writes ``full.onnx``, ``skip.onnx`` and ``manifest.json``; ``build_engines(out_dir)``
adds ``full.plan`` / ``skip.plan``; ``load(out_dir, backend)`` returns an :class:`ExportedTransformer` with the cached
module's call signature, Schedule and Session API.

What the manifest holds besides the colleague-owned fields (config, I/O specs with roles, MoReg layout, profile
ranges, sha256 of every file, model fingerprint, versions) sits under ``runtime``: the call's pytree in/out specs
(``treespec_dumps``), the non-tensor constants of the captured call, the forward signature (to bind positional and
keyword spellings the way capture did), ``num_outputs``, delta names, the tap dtype, the block names, and the tap
shape as a tiny op list over input dims (``tap_shape``: the ``Programs.tap_shape`` GraphModule, serialised op by op
and evaluated with plain ints at load; no eval of manifest text).

Dynamic axes are named per symbol of the captured program: dim 0 of any input is ``batch`` (inputs' batch dims are
one axis), the MoReg frame input's frame dim is ``frames`` and, on a 5-D frame input, the two dims after it
``height``/``width``; any other dynamic dim is ``<input>_dim<k>``. Cached tensors (tap, deltas) reuse a name where
their dim is exactly one of those, otherwise get ``tap_dim<k>`` / ``<delta>_dim<k>`` with ranges computed from their
formula. A profile range is ``min`` = the captured lower bound, ``opt`` = the example size, ``max`` = the captured
upper bound or, for an unbounded axis, the example size (pass ``max_sizes={"batch": 8}`` to widen).

Writes are atomic per directory: everything goes to a staging directory next to ``out_dir`` that is swapped in only
when complete, so an interrupted export leaves the previous artifacts loadable.
"""

from __future__ import annotations

import logging
import operator
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..errors import ArtifactError
from .manifest import (
    ENGINE_SUFFIXES,
    MANIFEST_NAME,
    Manifest,
    ProgramSpec,
    TensorSpec,
    atomic_write_bytes,
    check_engine_environment,
    gpu_versions,
    hash_artifacts,
    library_versions,
    model_fingerprint,
    read_manifest,
    verify_artifacts,
    write_manifest,
)

__all__ = ["ExportManifest", "build_engines", "load", "read_export_manifest", "to_onnx"]

logger = logging.getLogger(__name__)

PROGRAMS = ("full", "skip")
BACKENDS = ("onnxruntime", "tensorrt")
# Recorded in every ONNX file's metadata_props, so a manifest edited to claim another model is refused.
FINGERPRINT_KEY = "adacache.weights_sha256"
_aten = torch.ops.aten

# The ops a tap-shape graph uses (sizes of inputs and integer arithmetic), by name in the manifest.
_SHAPE_OPS = {
    "mul": operator.mul,
    "floordiv": operator.floordiv,
    "add": operator.add,
    "sub": operator.sub,
    "mod": operator.mod,
    "neg": operator.neg,
}
_SHAPE_OP_NAMES = {fn: name for name, fn in _SHAPE_OPS.items()}


@dataclass
class ExportManifest(Manifest):
    """:class:`Manifest` plus ``runtime``: what a runtime needs to rebuild calls (see the module docstring)."""

    runtime: dict[str, Any] = field(default_factory=dict)


def read_export_manifest(out_dir: str | os.PathLike) -> ExportManifest:
    path = Path(out_dir) / MANIFEST_NAME
    manifest = read_manifest(out_dir, ExportManifest)
    if not isinstance(manifest.runtime, dict) or not manifest.runtime:
        raise ArtifactError(f"{path}: malformed manifest: no 'runtime' section (not written by to_onnx?)")
    return manifest


# --- axis naming and shape formulas --------------------------------------------------------------------------------
def _sym(size):
    """The sympy expression of a dim, or None for a static one."""
    if isinstance(size, torch.SymInt):
        if size.node.maybe_as_int() is not None:
            return None
        return size.node.expr
    return None


def _safe(name: str) -> str:
    return name.replace(".", "_")


class _Axes:
    """Names the symbols of the captured program and computes profile ranges of any dim formula."""

    def __init__(self, captured, plan, max_sizes: Mapping[str, int] | None, keep: frozenset[str] | None = None):
        import sympy

        self._sympy = sympy
        self.name_of: dict[Any, str] = {}  # symbol -> axis name
        self.canonical: dict[str, Any] = {}  # axis name -> the symbol that stands for it
        self.bounds: dict[Any, tuple[int, int, int]] = {}  # symbol -> (min, opt, max)
        self.pinned: dict[Any, int] = {}  # symbols of axes exported static: their example size
        layout = plan.moreg_layout
        frame_at = (layout.frame_input, layout.frame_dim) if layout is not None else (None, None)
        placeholders = [n for n in plan.programs.full.graph.nodes if n.op == "placeholder"]
        self.input_axes: list[dict[int, str]] = []
        for index, (name, node, example) in enumerate(zip(captured.input_names, placeholders, plan.example_inputs)):
            spec = captured.input_specs[index]
            axes = {}
            for dim, size in enumerate(node.meta["val"].shape):
                expr = _sym(size)
                if expr is None:
                    continue
                if not isinstance(expr, sympy.Symbol):
                    axes[dim] = self._derived(f"{_safe(name)}_dim{dim}", expr)
                    continue
                axis = self._axis_name(name, dim, index, frame_at, example.dim())
                if keep is not None and axis not in keep:
                    self.pinned[expr] = int(example.shape[dim])
                    continue
                if expr in self.name_of:
                    axis = self.name_of[expr]
                elif axis in self.canonical:  # a second symbol for the same axis (e.g. timestep's batch): merged
                    self.name_of[expr] = axis
                else:
                    self.name_of[expr] = axis
                    self.canonical[axis] = expr
                    low, high = spec.ranges.get(dim, (1, None))
                    opt = int(example.shape[dim])
                    high = (max_sizes or {}).get(axis, high if high is not None else opt)
                    if not 1 <= max(1, low) <= opt <= high:
                        raise ValueError(f"axis {axis!r}: need min <= example size {opt} <= max, got {low}..{high}")
                    self.bounds[expr] = (max(1, low), opt, int(high))
                axes[dim] = self.name_of[expr]
            self.input_axes.append(axes)
        self.derived: dict[str, tuple[int, int, int]] = {}

    @staticmethod
    def _axis_name(name: str, dim: int, index: int, frame_at, rank: int) -> str:
        if dim == 0:
            return "batch"
        frame_input, frame_dim = frame_at
        if index == frame_input:
            if dim == frame_dim:
                return "frames"
            if rank == 5 and frame_dim == 2 and dim in (3, 4):
                return ("height", "width")[dim - 3]
        return f"{_safe(name)}_dim{dim}"

    def _canonical_expr(self, expr):
        expr = expr.xreplace(self.pinned)
        return expr.xreplace({s: self.canonical[self.name_of[s]] for s in expr.free_symbols if s in self.name_of})

    def _evaluate(self, expr, which: int) -> int:
        expr = self._canonical_expr(expr)
        unknown = [s for s in expr.free_symbols if s not in self.bounds]
        if unknown:
            raise ArtifactError(f"shape formula {expr} uses symbols {unknown} that no model input dim defines")
        return int(expr.xreplace({s: self.bounds[s][which] for s in expr.free_symbols}))

    def _derived(self, axis: str, expr) -> str:
        low, opt, high = (self._evaluate(expr, i) for i in range(3))
        self.derived[axis] = (max(1, low), opt, high)
        return axis

    def name_dims(self, prefix: str, shape) -> tuple[list[int | str], dict[int, str]]:
        """Manifest shape and dynamic axes of a cached tensor from its symbolic shape."""
        dims, axes = [], {}
        for dim, size in enumerate(shape):
            expr = _sym(size)
            if expr is None:
                dims.append(int(size))
                continue
            expr = self._canonical_expr(expr)
            if expr.is_number:
                dims.append(int(expr))
                continue
            if isinstance(expr, self._sympy.Symbol) and expr in self.name_of:
                axes[dim] = self.name_of[expr]
            else:
                axes[dim] = self._derived(f"{prefix}_dim{dim}", expr)
            dims.append(axes[dim])
        return dims, axes

    def profile_ranges(self) -> dict[str, dict[str, int]]:
        ranges = {self.name_of[s]: b for s, b in self.bounds.items()}
        ranges.update(self.derived)
        return {axis: {"min": lo, "opt": opt, "max": hi} for axis, (lo, opt, hi) in sorted(ranges.items())}


def _serialise_tap_shape(tap_shape: fx.GraphModule) -> dict[str, Any]:
    """The tap-shape graph as ``{"ops": [[op, arg, ...]], "output": [arg, ...]}``; an arg is an int or ``"%k"``
    (the k-th op's value); ``["size", input_index, dim]`` reads an input's size."""
    inputs = {n: i for i, n in enumerate(n for n in tap_shape.graph.nodes if n.op == "placeholder")}
    index: dict[fx.Node, str] = {}
    ops: list[list] = []

    def ref(a):
        if isinstance(a, fx.Node):
            return index[a]
        if isinstance(a, int):
            return a
        raise ArtifactError(f"tap shape: cannot serialise argument {a!r}")

    for node in tap_shape.graph.nodes:
        if node.op == "call_function" and node.target is _aten.sym_size.int:
            ops.append(["size", inputs[node.args[0]], int(node.args[1])])
        elif node.op == "call_function" and node.target in _SHAPE_OP_NAMES:
            ops.append([_SHAPE_OP_NAMES[node.target], *(ref(a) for a in node.args)])
        elif node.op in ("placeholder", "output"):
            continue
        else:
            raise ArtifactError(f"tap shape: node {node.name} ({node.target}) is not a size or integer op")
        index[node] = f"%{len(ops) - 1}"
    output = tap_shape.graph.output_node().args[0]
    return {"ops": ops, "output": [ref(a) for a in output]}


class TapShape:
    """``tap_shape(*inputs) -> tuple[int, ...]`` from the serialised op list (see ``_serialise_tap_shape``)."""

    def __init__(self, formula: Mapping[str, Any]):
        self.ops = [list(op) for op in formula["ops"]]
        self.output = list(formula["output"])
        for op in self.ops:
            if op[0] != "size" and op[0] not in _SHAPE_OPS:
                raise ArtifactError(f"{MANIFEST_NAME}: tap shape op {op[0]!r} is not one of size/{list(_SHAPE_OPS)}")

    def __call__(self, *inputs: torch.Tensor) -> tuple[int, ...]:
        values: list[int] = []

        def arg(a):
            return values[int(a[1:])] if isinstance(a, str) else a

        for op, *args in self.ops:
            if op == "size":
                values.append(int(inputs[args[0]].shape[args[1]]))
            else:
                values.append(_SHAPE_OPS[op](*(arg(a) for a in args)))
        return tuple(arg(a) for a in self.output)


# --- the call signature ----------------------------------------------------------------------------------------------
def _jsonable_default(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _serialise_forward_signature(signature) -> list[dict] | None:
    import inspect

    if signature is None:
        return None
    params = []
    for p in signature.parameters.values():
        entry = {"name": p.name, "kind": p.kind.name}
        if p.default is not inspect.Parameter.empty and _jsonable_default(p.default):
            entry["default"] = p.default
        params.append(entry)
    return params


def forward_signature_from(params: list[dict] | None):
    import inspect

    if params is None:
        return None
    return inspect.Signature(
        [
            inspect.Parameter(
                p["name"], inspect._ParameterKind[p["kind"]], default=p.get("default", inspect.Parameter.empty)
            )
            for p in params
        ]
    )


def _runtime_section(cached, entry, tap_shape_formula) -> dict[str, Any]:
    from torch.utils._pytree import treespec_dumps

    captured, plan, programs = entry.captured, entry.plan, entry.programs
    return {
        "model_class": captured.model_class,
        "in_spec": treespec_dumps(captured.signature.in_spec),
        "out_spec": treespec_dumps(captured.out_spec),
        "constants": [[i, v] for i, v in captured.signature.constants],
        "tensor_leaves": list(captured.signature.tensor_leaves),
        "forward_signature": _serialise_forward_signature(captured.model_forward_signature),
        "input_names": list(captured.input_names),
        "output_names": list(captured.output_names),
        "num_outputs": programs.num_outputs,
        "delta_names": list(programs.delta_names),
        "tap_dtype": str(programs.tap_dtype).removeprefix("torch."),
        "moreg_strides": list(programs.moreg_strides),
        "tap_shape": tap_shape_formula,
        "blocks": list(plan.blocks),
        "region": list(plan.region),
        "tap": plan.tap,
        "describe": plan.describe(),
        "engines": {},
    }


# --- to_onnx ---------------------------------------------------------------------------------------------------------
def _io_names(entry) -> dict[str, tuple[list[str], list[str]]]:
    programs = entry.programs
    model_inputs = [_safe(n) for n in entry.captured.input_names]
    outputs = [f"output.{i}" for i in range(programs.num_outputs)]
    deltas = [_safe(n) for n in programs.delta_names]
    return {
        "full": (model_inputs + ["tap_prev"], outputs + deltas + ["tap", "metrics"]),
        "skip": (model_inputs + deltas, outputs),
    }


def _latest_entry(cached, example_inputs):
    if example_inputs is not None:
        if isinstance(example_inputs, Mapping):
            return cached.capture((), dict(example_inputs))
        return cached.capture(tuple(example_inputs), {})
    if not cached._entries:
        raise ValueError("to_onnx: the module has captured nothing yet; pass example_inputs (kwargs dict or tuple)")
    return cached._entries[-1]


def _stage_dir(out_dir: Path) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists():
        raise ArtifactError(
            f"{out_dir}: exists, is not empty and holds no {MANIFEST_NAME}; refusing to replace a directory that is "
            "not an adacache-compile export"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the complete ``staging`` directory (two renames; the old one is restored on failure)."""
    backup = None
    if out_dir.exists():
        backup = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, backup)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        if backup is not None:
            os.replace(backup, out_dir)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _stamp_fingerprint(path: Path, fingerprint: str) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = model.metadata_props.add()
    entry.key, entry.value = FINGERPRINT_KEY, fingerprint
    atomic_write_bytes(path, model.SerializeToString())


def _onnx_fingerprint(path: Path) -> str | None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not a whole ONNX model
        raise ArtifactError(
            f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "the file is truncated or corrupt, re-export the directory"
        ) from e
    return next((p.value for p in model.metadata_props if p.key == FINGERPRINT_KEY), None)


def to_onnx(
    cached,
    out_dir: str | os.PathLike,
    *,
    example_inputs: Mapping[str, Any] | Sequence[Any] | None = None,
    dynamic: bool | Sequence[str] = True,
    opset: int | None = None,
    single_file: bool = False,
    max_sizes: Mapping[str, int] | None = None,
    verify: bool = True,
) -> Path:
    """Export the latest capture's full and skip programs of ``cached`` (a :class:`CachedTransformer`) to ``out_dir``.

    ``example_inputs`` (kwargs dict or positional tuple) captures first. ``dynamic``: True keeps every axis the
    capture found dynamic, a list of axis names (``["batch"]``) keeps only those, False exports the example's static
    shapes. ``max_sizes`` sets the profile maximum of named axes (``{"batch": 8}``). With ``verify`` (and
    onnxruntime installed) each program is run once on the example and compared with the torch program; a fully
    dynamic export that fails this (the exporter mistranslates some size arithmetic, seen on Latte) is redone with
    only ``batch`` dynamic, with a warning. Returns ``out_dir``.
    """
    from .onnx_export import export_program, onnx_artifact_files

    if single_file:
        raise NotImplementedError(
            "to_onnx(single_file=True): the one-file cond.onnx (torch.cond -> ONNX If) is not implemented; export the "
            "two programs (the default) and pick between them on the host"
        )
    out_dir = Path(out_dir)
    entry = _latest_entry(cached, example_inputs)
    plan, programs, captured = entry.plan, entry.programs, entry.captured
    keep = None if dynamic is True else frozenset(dynamic or ())
    axes = _Axes(captured, plan, max_sizes, keep)
    io_names = _io_names(entry)
    fingerprint = model_fingerprint(cached._orig_mod)

    example = list(plan.example_inputs)
    examples, expected = program_examples(programs, example)
    full_results = expected["full"]
    tap_prev, deltas = examples["full"][-1], examples["skip"][len(example) :]

    tap_node = next(n for n in programs.full.graph.nodes if n.op == "placeholder" and n.name == "tap_prev")
    skip_placeholders = [n for n in programs.skip.graph.nodes if n.op == "placeholder"]
    cached_specs: dict[str, tuple[list, dict[int, str]]] = {
        "tap_prev": axes.name_dims("tap", tap_node.meta["val"].shape)
    }
    for name, node in zip(io_names["skip"][0][len(example) :], skip_placeholders[len(example) :]):
        cached_specs[name] = axes.name_dims(name, node.meta["val"].shape)

    def model_input_specs() -> list[TensorSpec]:
        return [
            TensorSpec(
                _safe(name),
                [axes.input_axes[i].get(d, int(s)) for d, s in enumerate(t.shape)],
                str(t.dtype).removeprefix("torch."),
                "model_input",
            )
            for i, (name, t) in enumerate(zip(captured.input_names, example))
        ]

    def cached_spec(name: str, tensor: torch.Tensor, role: str) -> TensorSpec:
        shape = cached_specs[name][0] if name in cached_specs else list(tensor.shape)
        return TensorSpec(name, list(shape), str(tensor.dtype).removeprefix("torch."), role)

    delta_names = io_names["skip"][0][len(example) :]
    outputs = full_results[: programs.num_outputs]
    output_specs = []
    for i, t in enumerate(outputs):
        # The outputs' leading dims follow the frame input's layout; recorded as the example's shape with batch named.
        shape = ["batch" if d == 0 and "batch" in axes.canonical else int(s) for d, s in enumerate(t.shape)]
        output_specs.append(TensorSpec(f"output.{i}", shape, str(t.dtype).removeprefix("torch."), "model_output"))
    delta_in = [cached_spec(n, t, "delta") for n, t in zip(delta_names, deltas)]
    tap_in = cached_spec("tap_prev", tap_prev, "tap_prev")
    tap_out = TensorSpec("tap", list(tap_in.shape), tap_in.dtype, "tap")
    metrics = full_results[-1]
    metrics_out = TensorSpec("metrics", list(metrics.shape), str(metrics.dtype).removeprefix("torch."), "metric")
    specs = {
        "full": (model_input_specs() + [tap_in], output_specs + delta_in_as_outputs(delta_in) + [tap_out, metrics_out]),
        "skip": (model_input_specs() + delta_in, output_specs),
    }

    staging = _stage_dir(out_dir)
    try:
        program_specs, files = {}, []
        for name, program in (("full", programs.full), ("skip", programs.skip)):
            input_specs, output_specs_ = specs[name]
            dynamic_axes = _dynamic_axes(input_specs)
            logger.info("exporting the %s program to ONNX", name)
            path = export_program(
                program,
                tuple(examples[name]),
                staging / f"{name}.onnx",
                input_names=io_names[name][0],
                output_names=io_names[name][1],
                dynamic_axes=dynamic_axes,
                opset=opset,
            )
            if verify and not _matches_torch(path, program, examples[name]):
                if dynamic is not True:
                    raise ArtifactError(f"{path.name}: onnxruntime disagrees with the torch {name} program")
                logger.warning(
                    "%s: onnxruntime disagrees with torch with every axis dynamic; only batch stays dynamic", name
                )
                shutil.rmtree(staging, ignore_errors=True)
                return to_onnx(cached, out_dir, dynamic=["batch"], opset=opset, max_sizes=max_sizes, verify=verify)
            _stamp_fingerprint(path, fingerprint["weights_sha256"])
            files += onnx_artifact_files(path)
            program_specs[name] = ProgramSpec(
                file=path.name,
                inputs=input_specs,
                outputs=output_specs_,
                dynamic_axes={**dynamic_axes, **_dynamic_axes(output_specs_)},
            )
        manifest = ExportManifest(
            config=cached.adacache_config.to_dict(),
            programs=program_specs,
            moreg_layout=plan.moreg_layout.to_dict() if plan.moreg_layout is not None else {},
            profile_ranges=axes.profile_ranges() if dynamic is not False else {},
            files=hash_artifacts(staging, files),
            model=fingerprint,
            versions=library_versions(),
            runtime=_runtime_section(cached, entry, _serialise_tap_shape(programs.tap_shape)),
        )
        write_manifest(staging, manifest)
        _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %s to %s", captured.model_class, out_dir)
    return out_dir


def _matches_torch(path: Path, program: fx.GraphModule, inputs: list[torch.Tensor], rtol: float = 1e-4) -> bool:
    """Run the exported file once with onnxruntime on the example and compare every output with the torch program."""
    try:
        from .ort_backend import OrtProgram
    except ImportError:
        return True
    try:
        actual = OrtProgram(path, providers=["CPUExecutionProvider"])(*inputs)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
        logger.warning("%s: onnxruntime failed on the example inputs: %s", path.name, str(e).splitlines()[0])
        return False
    with torch.no_grad():
        expected = program(*inputs)
    for a, e in zip(actual, expected):
        scale = float(e.abs().max()) if e.numel() else 0.0
        if a.shape != e.shape or float((a - e).abs().max()) > rtol * max(scale, 1e-6):
            logger.warning("%s: onnxruntime output differs from torch (shape %s vs %s)", path.name, a.shape, e.shape)
            return False
    return True


def delta_in_as_outputs(delta_specs: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec(t.name, list(t.shape), t.dtype, "delta") for t in delta_specs]


def _dynamic_axes(specs: Sequence[TensorSpec]) -> dict[str, dict[int, str]]:
    return {
        t.name: {d: s for d, s in enumerate(t.shape) if isinstance(s, str)}
        for t in specs
        if any(isinstance(s, str) for s in t.shape)
    }


# --- engines ---------------------------------------------------------------------------------------------------------
def build_engines(
    out_dir: str | os.PathLike,
    *,
    precision: str = "fp16",
    profiles: Mapping[str, Mapping[str, Mapping[str, int]]] | None = None,
    timing_cache: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Build ``<program>.plan`` for every program of the export in ``out_dir`` and record them in the manifest.

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


# --- load ------------------------------------------------------------------------------------------------------------
def program_examples(programs, example_inputs) -> tuple[dict[str, list], dict[str, tuple]]:
    """Inputs and torch outputs of both programs for one call: ``full`` gets a random ``tap_prev`` (so the metric
    norms are not trivially zero), ``skip`` the deltas that ``full`` emitted."""
    example = list(example_inputs)
    tap_prev = torch.randn(programs.tap_shape(*example), dtype=programs.tap_dtype, device=example[0].device)
    with torch.no_grad():
        full = tuple(programs.full(*example, tap_prev))
        deltas = list(full[programs.num_outputs : -2])
        skip = tuple(programs.skip(*example, *deltas))
    return {"full": example + [tap_prev], "skip": example + deltas}, {"full": full, "skip": skip}


def verify_export(out_dir: str | os.PathLike, manifest: ExportManifest, *, model: torch.nn.Module | None = None):
    """Refuse (``ArtifactError``) a directory whose files, model fingerprint or library versions do not match."""
    out_dir = Path(out_dir)
    verify_artifacts(out_dir, manifest, same_versions=("tensorrt",) if manifest.runtime.get("engines") else ())
    recorded = manifest.model.get("weights_sha256")
    for program in manifest.programs.values():
        stamped = _onnx_fingerprint(out_dir / program.file)
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
    format version or a TensorRT version other than the engines'.
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
        from .tensorrt import load_trt_programs

        engines = manifest.runtime.get("engines") or {}
        if set(engines) != set(manifest.programs):
            raise ArtifactError(f"{out_dir}: no TensorRT engines recorded in the manifest; run build_engines first")
        check_engine_environment(manifest.versions, {**library_versions(), **gpu_versions()}, str(out_dir))
        io_names = {
            name: ([t.name for t in spec.inputs], [t.name for t in spec.outputs])
            for name, spec in manifest.programs.items()
        }
        programs = load_trt_programs(
            {name: out_dir / file for name, file in engines.items()}, io_names=io_names, cuda_graphs=cuda_graphs
        )
    return ExportedTransformer(manifest, programs, backend=backend, source=out_dir)
