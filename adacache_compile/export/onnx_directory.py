"""``to_onnx``: a cached model's full and skip programs to an export directory (``full.onnx``, ``skip.onnx``,
``manifest.json``), each program checked against torch with onnxruntime on the example. With ``single_file=True``
the directory holds one ``cached.onnx`` instead: the conditional program (an ONNX ``If`` of the two, see
:mod:`adacache_compile.passes.insert_cond`), checked on both branches.

The directory is written atomically: everything goes to a staging directory next to ``out_dir`` that is swapped in
only when complete, so an interrupted export leaves the previous artifacts loadable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..errors import ArtifactError, UnsupportedModelError
from ..forecast import extrapolation_weights
from ..parallel import context_parallel_of
from ..passes.insert_cond import build_cond_program
from ..programs import COMPUTE, FORECAST_WEIGHTS, FullResult
from . import onnx_export, ort_backend
from .axes import Axes, safe_name
from .fingerprint import stamp_fingerprint
from .manifest import (
    MANIFEST_NAME,
    SINGLE_FILE,
    TWO_PROGRAMS,
    ExportManifest,
    ProgramSpec,
    TensorSpec,
    hash_artifacts,
    library_versions,
    model_fingerprint,
    write_manifest,
)
from .signature import runtime_section
from .single_file import drop_skip_passthrough
from .staging import replace_dir, staging_dir

__all__ = ["cond_examples", "program_examples", "to_onnx"]

logger = logging.getLogger(__name__)

CACHED_PREFIX = "cached_"  # the conditional program's cached-delta inputs: cached_delta_stream0, ...
_ONNXRUNTIME_HINT = (
    "to_onnx(verify=True) runs each exported program once with onnxruntime, which is not installed: "
    "pip install 'adacache-compile[onnx]' (or pass verify=False to export unchecked)"
)


def program_examples(programs, example_inputs) -> tuple[dict[str, list], dict[str, tuple]]:
    """Inputs and torch outputs of both programs for one call: ``full`` gets a random ``tap_prev`` (so the metric
    norms are not trivially zero), ``skip`` the deltas that ``full`` emitted."""
    example = list(example_inputs)
    tap_prev = torch.randn(programs.tap_shape(*example), dtype=programs.tap_dtype, device=example[0].device)
    with torch.no_grad():
        full = tuple(programs.full(*example, tap_prev))
        deltas = programs.decode_full(full).deltas
        # A forecasting skip program gets distinct slots and weights, so every slot and weight is checked.
        slots = programs.forecast_order + 1
        history = [tuple(d * (1.0 - 0.25 * j) for d in deltas) for j in range(slots)]
        cached = programs.skip_cached_inputs(
            history, extrapolation_weights(list(range(slots, 0, -1)), slots + 2, slots)
        )
        skip = tuple(programs.skip(*example, *cached))
    return {"full": example + [tap_prev], "skip": example + cached}, {"full": full, "skip": skip}


def cond_examples(examples: Mapping[str, list]) -> list[list]:
    """The conditional program's inputs for :func:`program_examples`' ``examples``: ``compute`` true (the full
    program's inputs, the skip program's cached ones unread) and false (the other way round)."""
    n = len(examples["full"]) - 1
    model_inputs, tap_prev, cached = examples["full"][:n], examples["full"][-1], examples["skip"][n:]
    return [[*model_inputs, torch.tensor(flag), *cached, tap_prev] for flag in (True, False)]


def to_onnx(
    cached,
    out_dir: str | os.PathLike,
    *,
    example_inputs: Mapping[str, Any] | Sequence[Any] | None = None,
    dynamic: bool | Sequence[str] = True,
    opset: int | None = None,
    max_sizes: Mapping[str, int] | None = None,
    verify: bool = True,
    example_source: Mapping[str, Any] | None = None,
    single_file: bool = False,
) -> Path:
    """Export the latest capture's full and skip programs of ``cached`` (a :class:`CachedTransformer`) to ``out_dir``.

    ``example_inputs`` (kwargs dict or positional tuple) captures first. ``dynamic``: True keeps every axis the
    capture found dynamic, a list of axis names (``["batch"]``) keeps only those, False exports the example's static
    shapes. ``max_sizes`` sets the profile maximum of named axes (``{"batch": 8}``). With ``verify`` (needs
    onnxruntime) each program is run once on the example and compared with the torch program; a fully dynamic export
    that fails this (the exporter mistranslates some size arithmetic, seen on Latte) is redone with only ``batch``
    dynamic, with a warning. ``example_source`` describes where the example inputs came from (the CLI's MODEL_SPEC
    and input source); the manifest records it under ``runtime.example_inputs``. ``single_file``: one
    ``cached.onnx`` holding an ONNX ``If`` of the two programs (the manifest's ``layout`` is ``"single_file"``)
    instead of ``full.onnx`` and ``skip.onnx``. Returns ``out_dir``.
    """
    _refuse_context_parallel(cached)
    if verify:
        try:
            ort_backend._onnxruntime()
        except ImportError as e:
            raise ImportError(_ONNXRUNTIME_HINT) from e
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    entry = _latest_entry(cached, example_inputs)
    axes = Axes(entry.captured, entry.plan, max_sizes, None if dynamic is True else frozenset(dynamic or ()))
    examples, expected = program_examples(entry.programs, entry.plan.example_inputs)
    specs = _io_specs(entry, axes, examples["full"], entry.programs.decode_full(expected["full"]))
    fingerprint = model_fingerprint(cached._orig_mod)
    with staging_dir(out_dir) as staging:
        jobs = _program_jobs(entry.programs, examples, single_file)
        written = _write_programs(jobs, specs, staging, fingerprint, opset=opset, verify=verify, dynamic=dynamic)
        if written is not None:
            program_specs, files = written
            manifest = ExportManifest(
                config=cached.adacache_config.to_dict(),
                programs=program_specs,
                moreg_layout=entry.plan.moreg_layout.to_dict() if entry.plan.moreg_layout is not None else {},
                profile_ranges=axes.profile_ranges() if dynamic is not False else {},
                files=hash_artifacts(staging, files),
                model=fingerprint,
                versions=library_versions(),
                runtime={**runtime_section(entry), "example_inputs": dict(example_source or {})},
                layout=SINGLE_FILE if single_file else TWO_PROGRAMS,
            )
            write_manifest(staging, manifest)
            replace_dir(staging, out_dir)
            logger.info("exported %s to %s", entry.captured.model_class, out_dir)
            return out_dir
    return to_onnx(
        cached,
        out_dir,
        dynamic=["batch"],
        opset=opset,
        max_sizes=max_sizes,
        verify=verify,
        example_source=example_source,
        single_file=single_file,
    )


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists():
        raise ArtifactError(
            f"{out_dir}: exists, is not empty and holds no {MANIFEST_NAME}; refusing to replace a directory that is "
            "not an adacache-compile export"
        )


def _refuse_context_parallel(cached) -> None:
    """A context-parallel model's programs hold torch.distributed collectives (Ulysses all-to-all, the output
    all-gather) that ONNX has no ops for, and a rank's programs compute only its sequence shard: refused, with the
    way out named."""
    model = getattr(cached, "_orig_mod", None)
    cp = context_parallel_of(model)
    if cp is None:
        return
    raise UnsupportedModelError(
        f"to_onnx: {type(model).__name__} runs with context parallelism ({cp.describe()}; enabled by diffusers' "
        "enable_parallelism): its full and skip programs hold torch.distributed collectives (all_to_all_single in "
        "the blocks' attention, all_gather_into_tensor at the output) that ONNX cannot express, and each rank's "
        "programs compute only its shard of the sequence. Export a model without context parallelism (load or build "
        "it again and do not call enable_parallelism); run the context-parallel model with adacache_compile."
        "optimize / apply (backend 'eager' or 'inductor')."
    )


def _latest_entry(cached, example_inputs):
    if example_inputs is not None:
        if isinstance(example_inputs, Mapping):
            return cached.capture((), dict(example_inputs))
        return cached.capture(tuple(example_inputs), {})
    if not cached.captures.entries:
        raise ValueError("to_onnx: the module has captured nothing yet; pass example_inputs (kwargs dict or tuple)")
    return cached.captures.latest()


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _placeholders(program: fx.GraphModule) -> list[fx.Node]:
    return [n for n in program.graph.nodes if n.op == "placeholder"]


def _io_specs(entry, axes: Axes, full_inputs: list[torch.Tensor], full: FullResult):
    """``{program: (input specs, output specs)}``: names, shapes with axis names, dtypes and roles."""
    captured, programs = entry.captured, entry.programs
    n = len(captured.input_names)

    def cached_spec(name: str, prefix: str, node: fx.Node, tensor: torch.Tensor, role: str) -> TensorSpec:
        return TensorSpec(name, axes.name_dims(prefix, node.meta["val"].shape)[0], _dtype_name(tensor), role)

    model_inputs = [
        TensorSpec(
            safe_name(name),
            [axes.input_axes[i].get(d, int(s)) for d, s in enumerate(t.shape)],
            _dtype_name(t),
            "model_input",
        )
        for i, (name, t) in enumerate(zip(captured.input_names, full_inputs))
    ]
    tap_node = next(n for n in _placeholders(programs.full) if n.name == "tap_prev")
    tap_in = cached_spec("tap_prev", "tap", tap_node, full_inputs[-1], "tap_prev")
    deltas = [
        cached_spec(safe_name(d), safe_name(d), node, t, "delta")
        for d, node, t in zip(programs.delta_names, _placeholders(programs.skip)[n:], full.deltas)
    ]
    skip_cached = [
        TensorSpec(safe_name(name), list(node.meta["val"].shape), _dtype_name(node.meta["val"]), FORECAST_WEIGHTS)
        if name == FORECAST_WEIGHTS
        else cached_spec(safe_name(name), safe_name(name), node, node.meta["val"], "delta")
        for name, node in zip(programs.skip_cached_names, _placeholders(programs.skip)[n:])
    ]
    # The outputs' leading dims follow the frame input's layout; recorded as the example's shape with batch named.
    batch = "batch" in axes.canonical
    outputs = [
        TensorSpec(
            f"output.{i}",
            ["batch" if d == 0 and batch else int(s) for d, s in enumerate(t.shape)],
            _dtype_name(t),
            "model_output",
        )
        for i, t in enumerate(full.outputs)
    ]
    tap_out = TensorSpec("tap", list(tap_in.shape), tap_in.dtype, "tap")
    metrics = TensorSpec("metrics", list(full.metrics.shape), _dtype_name(full.metrics), "metric")
    # One graph takes the cached deltas and returns the new ones: the inputs get a prefix.
    cond_cached = [
        dataclasses.replace(t, name=f"{CACHED_PREFIX}{t.name}") if t.role == "delta" else t for t in skip_cached
    ]
    compute = TensorSpec(COMPUTE, [], "bool", "compute")
    return {
        "full": (model_inputs + [tap_in], outputs + deltas + [tap_out, metrics]),
        "skip": (model_inputs + skip_cached, outputs),
        "cached": (model_inputs + [compute] + cond_cached + [tap_in], outputs + deltas + [tap_out, metrics]),
    }


def _dynamic_axes(specs: Sequence[TensorSpec]) -> dict[str, dict[int, str]]:
    return {
        t.name: {d: s for d, s in enumerate(t.shape) if isinstance(s, str)}
        for t in specs
        if any(isinstance(s, str) for s in t.shape)
    }


def _program_jobs(programs, examples, single_file: bool) -> list[tuple[str, fx.GraphModule, list[list], bool]]:
    """``(name, program, example input lists, rewrite)`` per ONNX file: the full and the skip program, or the one
    conditional program, built from pre-export-rewritten copies of the two (so the rewrites reach its branches)."""
    if not single_file:
        return [(name, getattr(programs, name), [examples[name]], True) for name in ("full", "skip")]
    branches = {
        name: onnx_export.prepared_program(getattr(programs, name), examples[name], f"the {name} branch")
        for name in ("full", "skip")
    }
    cond = build_cond_program(programs, branches)
    return [("cached", cond, cond_examples(examples), False)]


def _write_programs(jobs, specs, staging: Path, fingerprint, *, opset, verify, dynamic):
    """Export, check and stamp each program of ``jobs`` into ``staging``: ``(program specs, files)``, or None when
    onnxruntime disagrees with torch on a fully dynamic export (the caller retries with only ``batch`` dynamic)."""
    program_specs, files = {}, []
    for name, program, example_sets, rewrite in jobs:
        inputs, outputs = specs[name]
        logger.info("exporting the %s program to ONNX", name)
        path = onnx_export.export_program(
            program,
            tuple(example_sets[0]),
            staging / f"{name}.onnx",
            input_names=[t.name for t in inputs],
            output_names=[t.name for t in outputs],
            dynamic_axes=_dynamic_axes(inputs),
            opset=opset,
            rewrite=rewrite,
        )
        passthrough = None
        if name == "cached":
            # A skipped step of the one file returns empty deltas and tap instead of copies of the cached ones.
            passthrough = [i for i, t in enumerate(outputs) if t.role in ("delta", "tap")]
            drop_skip_passthrough(path, [outputs[i].name for i in passthrough], COMPUTE)
        checks = [(example, _empty_on_skip(example, inputs, passthrough)) for example in example_sets]
        if verify and not all(_matches_torch(path, program, example, empty=empty) for example, empty in checks):
            if dynamic is not True:
                raise ArtifactError(f"{path.name}: onnxruntime disagrees with the torch {name} program")
            logger.warning(
                "%s: onnxruntime disagrees with torch with every axis dynamic; only batch stays dynamic", name
            )
            return None
        stamp_fingerprint(path, fingerprint["weights_sha256"])
        files += onnx_export.onnx_artifact_files(path)
        program_specs[name] = ProgramSpec(
            file=path.name,
            inputs=inputs,
            outputs=outputs,
            dynamic_axes={**_dynamic_axes(inputs), **_dynamic_axes(outputs)},
        )
    return program_specs, files


def _empty_on_skip(example: list, inputs, passthrough: list[int] | None) -> frozenset[int]:
    """The outputs of the one file that are empty for ``example`` (its ``compute`` input false): ``passthrough``."""
    if passthrough is None:
        return frozenset()
    compute = next(i for i, t in enumerate(inputs) if t.role == "compute")
    return frozenset() if bool(example[compute]) else frozenset(passthrough)


def _matches_torch(
    path: Path, program: fx.GraphModule, inputs: list[torch.Tensor], rtol: float = 1e-4, empty=frozenset()
) -> bool:
    """Run the exported file once with onnxruntime on the example and compare every output with the torch program;
    the outputs ``empty`` (the one file's deltas and tap on a skipped step) must instead hold no element."""
    try:
        actual = ort_backend.OrtProgram(path, providers=["CPUExecutionProvider"])(*inputs)
    except ImportError as e:
        raise ImportError(_ONNXRUNTIME_HINT) from e
    except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
        logger.warning("%s: onnxruntime failed on the example inputs: %s", path.name, str(e).splitlines()[0])
        return False
    with torch.no_grad():
        expected = program(*inputs)
    for index, (a, e) in enumerate(zip(actual, expected)):
        if index in empty:
            if a.numel():
                logger.warning(
                    "%s: output %d should be empty on a skipped step, has shape %s", path.name, index, a.shape
                )
                return False
            continue
        scale = float(e.abs().max()) if e.numel() else 0.0
        if a.shape != e.shape or float((a - e).abs().max()) > rtol * max(scale, 1e-6):
            logger.warning("%s: onnxruntime output differs from torch (shape %s vs %s)", path.name, a.shape, e.shape)
            return False
    return True
