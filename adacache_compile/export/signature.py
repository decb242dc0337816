"""The manifest's ``runtime`` section: what an exported runtime needs to rebuild the captured call (pytree specs,
constants, the forward signature, output and delta names, the tap dtype, the tap's and the deltas' shape formulas,
the plan's blocks)."""

from __future__ import annotations

import inspect
from typing import Any

from .axes import serialise_tap_shape

__all__ = ["forward_signature_from", "runtime_section", "serialise_forward_signature"]


def _jsonable_default(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def serialise_forward_signature(signature: inspect.Signature | None) -> list[dict] | None:
    """``[{"name", "kind", "default"?}]`` per parameter; defaults that are not JSON scalars are left out."""
    if signature is None:
        return None
    params = []
    for p in signature.parameters.values():
        entry = {"name": p.name, "kind": p.kind.name}
        if p.default is not inspect.Parameter.empty and _jsonable_default(p.default):
            entry["default"] = p.default
        params.append(entry)
    return params


def forward_signature_from(params: list[dict] | None) -> inspect.Signature | None:
    """The inverse of :func:`serialise_forward_signature`."""
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


def runtime_section(entry) -> dict[str, Any]:
    """The ``runtime`` section of the manifest for one compiled entry (capture, plan and programs)."""
    from torch.utils._pytree import treespec_dumps

    captured, plan, programs = entry.captured, entry.plan, entry.programs
    return {
        "model_class": captured.model_class,
        "in_spec": treespec_dumps(captured.signature.in_spec),
        "out_spec": treespec_dumps(captured.out_spec),
        "constants": [[i, v] for i, v in captured.signature.constants],
        "tensor_leaves": list(captured.signature.tensor_leaves),
        "forward_signature": serialise_forward_signature(captured.model_forward_signature),
        "input_names": list(captured.input_names),
        "output_names": list(captured.output_names),
        "num_outputs": programs.num_outputs,
        "delta_names": list(programs.delta_names),
        "tap_dtype": str(programs.tap_dtype).removeprefix("torch."),
        "moreg_strides": list(programs.moreg_strides),
        "tap_shape": serialise_tap_shape(programs.tap_shape),
        "delta_shapes": [serialise_tap_shape(shape) for shape in programs.delta_shapes],
        "blocks": list(plan.blocks),
        "region": list(plan.region),
        "tap": plan.tap,
        "describe": plan.describe(),
        "engines": {},
        "output_forms": output_forms(entry),
    }


# Arguments that only choose how the model wraps its outputs: the exported programs compute the same tensors either
# way, so the runtime honours the caller's value on the host instead of refusing it.
OUTPUT_FORM_ARGUMENTS = ("return_dict",)


def output_forms(entry) -> dict[str, dict[str, Any]]:
    """``{argument: {"leaf": i, "forms": {json value: out_spec}}}`` for the output-form arguments of the captured
    call: the model is run once (no_grad, the capture's example inputs) with each other value of a boolean argument,
    to record the output structure it returns then. An argument whose other value gives another number of output
    tensors, or a structure pytree cannot serialise, is left out (a call with it is refused, naming it)."""
    import torch
    import torch.utils._pytree as pytree
    from torch.utils._pytree import treespec_dumps

    from ..capture import _leaf_names

    captured, plan = entry.captured, entry.plan
    signature = captured.signature
    names = _leaf_names(signature.in_spec, signature.in_spec.num_leaves)
    constants = dict(signature.constants)
    forms = {}
    for leaf, value in constants.items():
        name = names[leaf].removeprefix("args.")
        if name not in OUTPUT_FORM_ARGUMENTS or not isinstance(value, bool):
            continue
        leaves = [None] * signature.in_spec.num_leaves
        for i, tensor in zip(signature.tensor_leaves, plan.example_inputs):
            leaves[i] = tensor
        for i, constant in constants.items():
            leaves[i] = (not constant) if i == leaf else constant
        args, kwargs = pytree.tree_unflatten(leaves, signature.in_spec)
        with torch.no_grad():
            other = plan.model(*args, **kwargs)
        other_leaves, other_spec = pytree.tree_flatten(other)
        if len(other_leaves) != captured.out_spec.num_leaves:
            continue
        try:
            forms[name] = {
                "leaf": leaf,
                "forms": {
                    json_key(value): treespec_dumps(captured.out_spec),
                    json_key(not value): treespec_dumps(other_spec),
                },
            }
        except (TypeError, NotImplementedError):  # an output type pytree cannot serialise
            continue
    return forms


def json_key(value: bool) -> str:
    return "true" if value else "false"
