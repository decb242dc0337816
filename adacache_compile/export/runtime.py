"""The runtime of an export directory: the cached module's call signature, Schedule and Sessions over ONNX/TensorRT.

:class:`ExportedTransformer` is a :class:`~adacache_compile.runtime.ProgramRuntime` over one fixed capture
(:class:`ExportedCapture`) whose programs are the exported ones (``OrtProgram`` or ``TrtProgram``) instead of fx
GraphModules; the schedule, sessions, ``generation()``, ``cache_context()`` and ``stats`` are the torch runtime's own. A call is checked against the
manifest before any program runs: structure and non-tensor arguments, rank, static dims, dtype, device, every dynamic
dim inside its profile range and dims sharing an axis name equal (``InputMismatchError`` naming the input and axis).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..capture import CallSignature, Captured, InputSpec, normalize_call
from ..capture_cache import programs_serve
from ..config import AdaCacheConfig
from ..errors import ArtifactError, InputMismatchError
from ..programs import Programs, SingleProgram
from ..runtime import ProgramRuntime
from ..step import next_serial

__all__ = ["ExportedCall", "ExportedEntry", "ExportedCapture", "ExportedTransformer"]

logger = logging.getLogger(__name__)


def _dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"{where}: unknown dtype {name!r}")
    return dtype


@dataclass
class ExportedCall(Captured):
    """A :class:`Captured` rebuilt from a manifest (no graph), checking calls against the exported profile."""

    axes: list[dict[int, str]] = field(default_factory=list)
    profile_ranges: dict[str, dict[str, int]] = field(default_factory=dict)
    # Output-form arguments (``return_dict``) honoured on the host: name -> (leaf index, {value: out_spec}).
    output_forms: dict[str, tuple[int, dict[bool, pytree.TreeSpec]]] = field(default_factory=dict)

    def host_side(self, signature: CallSignature) -> CallSignature:
        """A call whose ``return_dict`` differs from the exported call runs the same programs: compare it as if it
        had the exported value (:meth:`unflatten` wraps the outputs as it asked)."""
        constants = dict(signature.constants)
        for leaf, forms in self.output_forms.values():
            if constants.get(leaf) in forms:
                constants[leaf] = dict(self.signature.constants)[leaf]
        return dataclasses.replace(signature, constants=tuple(constants.items()))

    def unflatten(self, outputs, args: tuple = (), kwargs: dict | None = None):
        spec = self.out_spec
        if self.output_forms:
            _, bound = normalize_call(self.model_forward_signature, args, dict(kwargs or {}))
            for name, (_, forms) in self.output_forms.items():
                spec = forms.get(bound.get(name), spec)
        return pytree.tree_unflatten(list(outputs), spec)

    def flatten(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        tensors = super().flatten(args, kwargs)
        sizes: dict[str, tuple[str, int, int]] = {}
        for name, axes, tensor in zip(self.input_names, self.axes, tensors):
            for dim, axis in axes.items():
                size = int(tensor.shape[dim])
                bounds = self.profile_ranges.get(axis)
                if bounds is not None and not bounds["min"] <= size <= bounds["max"]:
                    raise InputMismatchError(
                        f"input {name!r}: dim {dim} ({axis!r}) = {size} is outside the exported profile "
                        f"[{bounds['min']}, {bounds['max']}] (shape {tuple(tensor.shape)}); re-export with "
                        f"max_sizes={{{axis!r}: {size}}} to serve it"
                    )
                first = sizes.setdefault(axis, (name, dim, size))
                if first[2] != size:
                    raise InputMismatchError(
                        f"input {name!r}: dim {dim} ({axis!r}) = {size}, but input {first[0]!r} dim {first[1]} "
                        f"({axis!r}) = {first[2]}; the exported programs need them equal"
                    )
        return tensors


class _ExportedModel(torch.nn.Module):
    """Stands in for the source model: the manifest's fingerprint (class, weights hash) and the diffusers config,
    which pipelines read through the runtime (``transformer.config.patch_size``)."""

    def __init__(self, model_info: dict[str, Any]):
        super().__init__()
        self.model_info = model_info
        self.config = _AttributeDict(model_info.get("config") or {})

    def forward(self, *args, **kwargs):
        raise RuntimeError("an exported runtime has no source model to run; it runs only its exported programs")


class _AttributeDict(dict):
    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class ExportedEntry:
    """The exported capture: the call it takes and the step's contract
    (:class:`~adacache_compile.step.StepPrograms`) over the exported programs."""

    captured: ExportedCall
    programs: Programs
    run_full: Any
    run_skip: Any
    config: AdaCacheConfig  # the config the programs were exported with
    region_fraction: float
    serial: int = field(default_factory=next_serial)

    @property
    def input_names(self) -> list[str]:
        return self.captured.input_names


class ExportedCapture:
    """The capture source of an exported runtime: one fixed capture, no re-capture, no source model to fall back
    to (see :mod:`adacache_compile.capture_cache` for the methods a runtime reads)."""

    def __init__(self, entry: ExportedEntry, source: Path):
        self.entry = entry
        self.source = source
        self.entries = [entry]

    def latest(self) -> ExportedEntry:
        return self.entry

    def lookup(self, args, kwargs, config) -> tuple[ExportedEntry, list[torch.Tensor]]:
        # flatten() raises InputMismatchError naming the input for a call the exported profile cannot serve.
        return self.entry, self.entry.captured.flatten(args, kwargs)

    def accept(self, config) -> None:
        if not programs_serve(self.entries, config):
            exported = self.entry.config
            raise ArtifactError(
                f"{self.source}: the exported programs were built for region={exported.region}, tap={exported.tap!r}, "
                f"norm_ord={exported.norm_ord}, MoReg strides {list(self.entry.programs.moreg_strides)}, "
                f"forecast_order={exported.forecast_order}; this config needs other programs: re-export with it"
            )

    def refresh(self) -> bool:
        return False  # the exported programs are their own model: nothing can change them after export

    def bypass_reason(self, args, kwargs) -> str | None:
        return None  # the exported programs carry no autograd and no training mode

    def run_uncached(self, args, kwargs):
        """Caching disabled: the full program on every call."""
        entry, inputs = self.lookup(args, kwargs, None)
        programs = entry.programs
        outputs = programs.decode_full(entry.run_full(*inputs, programs.zero_tap(inputs))).outputs
        return entry.captured.unflatten(outputs, args, kwargs)


class ExportedTransformer(ProgramRuntime):
    """Drop-in runtime of an export directory (see :func:`adacache_compile.export.load`)."""

    def __init__(self, manifest, programs: dict[str, Any], *, backend: str, source: Path):
        captures = ExportedCapture(_entry(manifest, manifest.runtime, programs), Path(source))
        super().__init__(_ExportedModel(manifest.model), captures, AdaCacheConfig.from_dict(manifest.config))
        self.manifest = manifest
        self.backend = backend
        self.source = Path(source)

    def __repr__(self) -> str:
        return f"ExportedTransformer({self.manifest.runtime['model_class']}, backend={self.backend!r}, {self.source})"

    def describe(self) -> str:
        """The plan of the model the programs were exported from, as ``CachePlan.describe()`` printed it."""
        return self.manifest.runtime.get("describe", "")

    # What a diffusers pipeline reads of its transformer besides ``config`` (``transformer.dtype`` for the latents,
    # ``pipe.device`` / ``_execution_device`` from its components' ``device``).
    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first model input (the latents) the programs were exported for."""
        return self._captures.entry.captured.input_specs[0].dtype

    @property
    def device(self) -> torch.device:
        """Where the programs run (onnxruntime: ``cpu`` or ``cuda``; TensorRT: ``cuda``)."""
        return self._captures.entry.captured.input_specs[0].device


def _output_forms(recorded: dict[str, Any]) -> dict[str, tuple[int, dict[bool, pytree.TreeSpec]]]:
    """The manifest's ``runtime.output_forms``; a form whose output type is not importable here (a diffusers output
    class without diffusers imported) is left out, so a call asking for it is refused naming the argument."""
    forms = {}
    for name, entry in recorded.items():
        specs = {}
        for value, dumped in entry["forms"].items():
            _import_output_module(dumped)
            try:
                specs[value == "true"] = pytree.treespec_loads(dumped)
            except (KeyError, NotImplementedError, ValueError, TypeError):
                continue
        forms[name] = (int(entry["leaf"]), specs)
    return forms


def _import_output_module(dumped: str) -> None:
    """Import diffusers when a serialised output structure names one of its classes (pytree knows a class only once
    its module registered it); nothing else is imported on a manifest's word."""
    if '"diffusers.' in dumped:
        try:
            import diffusers.models.modeling_outputs  # noqa: F401  (registers diffusers' BaseOutput classes)
        except ImportError:
            pass  # the form stays unavailable: a call asking for it is refused, naming the argument


def _entry(manifest, runtime: dict[str, Any], programs: dict[str, Any]) -> ExportedEntry:
    from .axes import TapShape
    from .manifest import SINGLE_FILE
    from .signature import forward_signature_from

    where = "manifest.json"
    try:
        main = "cached" if manifest.layout == SINGLE_FILE else "full"  # the program whose I/O describes the call
        full_inputs = [t for t in manifest.programs[main].inputs if t.role == "model_input"]
        delta_outputs = [t for t in manifest.programs[main].outputs if t.role == "delta"]
        device = getattr(programs[main], "device", torch.device("cpu"))
        input_specs, axes = [], []
        for name, spec in zip(runtime["input_names"], full_inputs):
            input_specs.append(
                InputSpec(
                    name,
                    tuple(None if isinstance(s, str) or s is None else int(s) for s in spec.shape),
                    _dtype(spec.dtype, where),
                    device,
                )
            )
            axes.append({d: s for d, s in enumerate(spec.shape) if isinstance(s, str)})
        signature = CallSignature(
            in_spec=pytree.treespec_loads(runtime["in_spec"]),
            constants=tuple((int(i), v) for i, v in runtime["constants"]),
            tensor_leaves=tuple(runtime["tensor_leaves"]),
        )
        captured = ExportedCall(
            graph_module=None,
            signature=signature,
            out_spec=pytree.treespec_loads(runtime["out_spec"]),
            input_specs=input_specs,
            input_names=list(runtime["input_names"]),
            output_names=list(runtime["output_names"]),
            model_class=runtime["model_class"],
            model_forward_signature=forward_signature_from(runtime["forward_signature"]),
            axes=axes,
            profile_ranges=dict(manifest.profile_ranges),
            output_forms=_output_forms(runtime.get("output_forms", {})),
        )
        config = AdaCacheConfig.from_dict(manifest.config)
        contract = Programs(
            full=programs.get("full"),
            skip=programs.get("skip"),
            tap_shape=TapShape(runtime["tap_shape"]),
            tap_dtype=_dtype(runtime["tap_dtype"], where),
            moreg_strides=tuple(runtime["moreg_strides"]),
            num_outputs=int(runtime["num_outputs"]),
            delta_names=list(runtime["delta_names"]),
            forecast_order=config.forecast_order,
            # Written from format version 3 on; only the single-file layout needs them (zero stand-ins).
            delta_shapes=[TapShape(formula) for formula in runtime.get("delta_shapes", [])],
            delta_dtypes=[_dtype(t.dtype, where) for t in delta_outputs],
            cond=programs.get("cached"),
        )
        region_fraction = len(runtime["region"]) / max(1, len(runtime["blocks"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: malformed runtime section: {type(e).__name__}: {e}") from e
    run_full, run_skip = contract.full, contract.skip
    if contract.cond is not None:
        single = SingleProgram(contract, contract.cond)
        run_full, run_skip = single.full, single.skip
    return ExportedEntry(captured, contract, run_full, run_skip, config, region_fraction)
