"""Your own model for the CLI: a MODEL_SPEC names the model, and the example inputs come from its pipeline's first
transformer call, a safetensors file of named inputs, or shape flags.

MODEL_SPEC is one of
- a model directory written by ``save_pretrained`` (the class is the ``_class_name`` of its ``config.json``, a
  diffusers class);
- a pipeline directory (``model_index.json``): its ``transformer`` (``--transformer transformer_2`` for the second);
- ``package.module:factory``: a callable taking no arguments that returns a model, or ``(model, example_inputs)``.

Every source is described by a small JSON-ready dict that the export manifest records (``runtime.example_inputs``).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ModelSource",
    "load_model_spec",
    "inputs_from_safetensors",
    "inputs_from_shapes",
    "record_first_call",
    "parse_dtype",
    "load_pipeline",
]

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelSource:
    """A model named by a MODEL_SPEC, with its pipeline (when the spec is a pipeline directory) and, where the spec
    supplies them, example inputs."""

    model: torch.nn.Module
    description: dict[str, Any]
    pipeline: Any = None
    example_inputs: dict[str, Any] | None = None


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``fp32`` / ``fp16`` / ``bf16`` (or a torch dtype name such as ``float16``) → torch dtype; None stays None."""
    if name is None:
        return None
    dtype = _DTYPES.get(name) or getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r}: expected one of {sorted(_DTYPES)} or a torch dtype name")
    return dtype


def load_model_spec(
    spec: str, *, transformer: str = "transformer", device: str = "cpu", dtype: torch.dtype | None = None
) -> ModelSource:
    """Load the model a MODEL_SPEC names (see the module docstring), on ``device`` in ``dtype``, in eval mode."""
    path = Path(spec)
    if path.is_dir() and (path / "model_index.json").is_file():
        source = _from_pipeline_dir(path, transformer, dtype)
    elif path.is_dir() and (path / "config.json").is_file():
        source = _from_model_dir(path, dtype)
    elif ":" in spec and not path.exists():
        source = _from_factory(spec)
    else:
        raise ValueError(
            f"MODEL_SPEC {spec!r}: expected a directory written by save_pretrained (with config.json), a pipeline "
            "directory (with model_index.json) or package.module:factory"
        )
    source.model = source.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if source.pipeline is not None:
        source.pipeline.to(device)
    return source


def _from_model_dir(path: Path, dtype) -> ModelSource:
    import diffusers

    config = json.loads((path / "config.json").read_text())
    class_name = config.get("_class_name")
    cls = getattr(diffusers, class_name or "", None)
    if cls is None:
        raise ValueError(
            f"{path / 'config.json'}: _class_name {class_name!r} is not a diffusers class; pass the model as "
            "package.module:factory instead"
        )
    model = cls.from_pretrained(path, torch_dtype=dtype)
    return ModelSource(model, {"kind": "model_dir", "path": str(path), "class": class_name})


def load_pipeline(path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None, **components):
    """A pipeline directory written by ``save_pretrained``, on ``device`` in ``dtype``, its progress bar off;
    ``components`` (e.g. ``transformer=model``) are used instead of loading those."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, **components)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_pipeline_dir(path: Path, transformer: str, dtype) -> ModelSource:
    pipe = load_pipeline(path, dtype=dtype)
    model = getattr(pipe, transformer, None)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{path}: the {type(pipe).__name__} has no {transformer!r} module (--transformer)")
    description = {
        "kind": "pipeline_dir",
        "path": str(path),
        "pipeline": type(pipe).__name__,
        "transformer": transformer,
    }
    return ModelSource(model, description, pipeline=pipe)


def _from_factory(spec: str) -> ModelSource:
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"MODEL_SPEC {spec!r}: cannot import {attribute!r} from {module_name!r}: {e}") from e
    made = factory()
    model, inputs = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"MODEL_SPEC {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return ModelSource(model, {"kind": "factory", "factory": spec}, example_inputs=inputs)


def inputs_from_safetensors(path: str | Path, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file, as the model's keyword arguments."""
    from safetensors.torch import load_file

    return load_file(str(path), device=device)


def inputs_from_shapes(items: Sequence[str], *, device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0):
    """``NAME=D0,D1,...[:DTYPE]`` items → random tensors (normal floats; integers in [0, 1000), e.g. timesteps)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for item in items:
        name, sep, rest = item.partition("=")
        dims, _, dtype_name = rest.partition(":")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d)
        except ValueError:
            shape = None
        if not sep or not name or not shape:
            raise ValueError(f"--shape {item!r}: expected NAME=D0,D1,...[:DTYPE], e.g. hidden_states=1,16,5,8,8")
        tensor_dtype = parse_dtype(dtype_name) if dtype_name else (dtype or torch.float32)
        if tensor_dtype.is_floating_point:
            tensor = torch.randn(shape, generator=generator).to(tensor_dtype)
        else:
            tensor = torch.randint(0, 1000, shape, generator=generator).to(tensor_dtype)
        inputs[name] = tensor.to(device)
    return inputs


class _Recorded(Exception):
    """Stops a pipeline at its first transformer call, once the call is recorded."""


def record_first_call(pipe, transformer: str = "transformer", **pipeline_kwargs) -> dict[str, Any]:
    """Run ``pipe(**pipeline_kwargs)`` up to its first call of ``pipe.<transformer>`` and return that call's keyword
    arguments (positional ones are bound to the forward signature's names); the pipeline stops there."""
    import inspect

    module = getattr(pipe, transformer)
    recorded: dict[str, Any] = {}

    def hook(mod, args, kwargs):
        signature = inspect.signature(mod.forward)
        bound = signature.bind_partial(*args, **kwargs).arguments
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                bound.update(bound.pop(name))
        recorded.update({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in bound.items()})
        raise _Recorded

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(**pipeline_kwargs)
    except _Recorded:
        pass
    finally:
        handle.remove()
    if not recorded:
        raise ValueError(f"{type(pipe).__name__}: the pipeline finished without calling pipe.{transformer}")
    return recorded
