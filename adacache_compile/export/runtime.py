"""The runtime of an export directory: the cached module's call signature, Schedule and Sessions over ONNX/TensorRT.

:class:`ExportedTransformer` is a :class:`~adacache_compile.runtime.CachedTransformer` whose one entry runs the
exported programs (``OrtProgram`` or ``TrtProgram``) instead of fx GraphModules; the schedule, sessions,
``generation()``, ``cache_context()`` and ``stats`` are the torch runtime's own. A call is checked against the
manifest before any program runs: structure and non-tensor arguments, rank, static dims, dtype, device, every dynamic
dim inside its profile range and dims sharing an axis name equal (``InputMismatchError`` naming the input and axis).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..capture import CallSignature, Captured
from ..capture import TensorSpec as InputSpec
from ..config import AdaCacheConfig
from ..errors import ArtifactError, InputMismatchError
from ..plan import Block, CachePlan, MoRegLayout, Programs
from ..runtime import CachedTransformer, CompiledEntry

__all__ = ["ExportedCall", "ExportedTransformer"]

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


class ExportedTransformer(CachedTransformer):
    """Drop-in runtime of an export directory (see :func:`adacache_compile.export.load`)."""

    def __init__(self, manifest, programs: dict[str, Any], *, backend: str, source: Path):
        runtime = manifest.runtime
        super().__init__(_ExportedModel(manifest.model), AdaCacheConfig.from_dict(manifest.config))
        self.backend = backend
        self.manifest = manifest
        self.source = Path(source)
        self._entries.append(_entry(manifest, runtime, programs))

    def __repr__(self) -> str:
        return f"ExportedTransformer({self.manifest.runtime['model_class']}, backend={self.backend!r}, {self.source})"

    def describe(self) -> str:
        """The plan of the model the programs were exported from, as ``CachePlan.describe()`` printed it."""
        return self.manifest.runtime.get("describe", "")

    def _runs_uncached(self, args, kwargs) -> bool:
        return False  # no source model to fall back to; the exported programs carry no autograd or training mode

    def capture(self, args: tuple = (), kwargs: dict | None = None) -> CompiledEntry:
        raise InputMismatchError(f"{self.source}: an exported runtime cannot capture; re-export for a new signature")

    def _entry_for(self, args, kwargs) -> tuple[CompiledEntry, list[torch.Tensor]]:
        entry = self._entries[-1]
        return entry, entry.captured.flatten(args, kwargs)

    def forward(self, *args, **kwargs):
        if self.adacache_config.enabled:
            return super().forward(*args, **kwargs)
        entry, inputs = self._entry_for(args, kwargs)  # no caching: the full program on every call
        programs = entry.programs
        tap_prev = torch.zeros(programs.tap_shape(*inputs), dtype=programs.tap_dtype, device=inputs[0].device)
        return entry.captured.unflatten(entry.run_full(*inputs, tap_prev)[: programs.num_outputs])


def _entry(manifest, runtime: dict[str, Any], programs: dict[str, Any]) -> CompiledEntry:
    from . import TapShape, forward_signature_from

    where = "manifest.json"
    try:
        full_inputs = [t for t in manifest.programs["full"].inputs if t.role == "model_input"]
        device = getattr(programs["full"], "device", torch.device("cpu"))
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
        )
        blocks = [_block(name) for name in runtime["blocks"]]
        region = set(runtime["region"])
        layout = dict(manifest.moreg_layout)
        plan = CachePlan(
            model=None,
            config=AdaCacheConfig.from_dict(manifest.config),
            input_names=list(runtime["input_names"]),
            all_blocks=blocks,
            region_blocks=[b for b in blocks if b.name in region],
            moreg_layout=MoRegLayout(**{**layout, "view": tuple(layout["view"])}) if layout else None,
            programs=Programs(
                full=programs["full"],
                skip=programs["skip"],
                tap_shape=TapShape(runtime["tap_shape"]),
                tap_dtype=_dtype(runtime["tap_dtype"], where),
                moreg_strides=tuple(runtime["moreg_strides"]),
                num_outputs=int(runtime["num_outputs"]),
                delta_names=list(runtime["delta_names"]),
                skip_input_indices=list(range(len(input_specs))),
            ),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: malformed runtime section: {type(e).__name__}: {e}") from e
    return CompiledEntry(captured, plan, programs["full"], programs["skip"])


def _block(name: str) -> Block:
    stack, _, index = name.rpartition(".")
    return Block(name=name, stack=stack, index=int(index) if index.isdigit() else 0, module_type="")
