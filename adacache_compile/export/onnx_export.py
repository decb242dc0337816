"""Export one flat-tensor program (a torch.fx GraphModule or any nn.Module) to an ONNX file.

The path is ``torch.export.export(strict=False)`` → ``torch.onnx.export(dynamo=True)`` (the TorchScript exporter does
not handle the rewritten programs), with the onnxscript optimizer run by the exporter, graph inputs/outputs renamed to
the caller's names and symbolic dims renamed to the caller's axis names. Before export, ``PRE_EXPORT_REWRITES`` fix
fx patterns whose ONNX translation onnxruntime or TensorRT reject.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.fx

from ..errors import ArtifactError
from .staging import publish, staging_dir

__all__ = [
    "DEFAULT_OPSET",
    "EXTERNAL_DATA_THRESHOLD_BYTES",
    "PRE_EXPORT_REWRITES",
    "apply_pre_export_rewrites",
    "cast_bool_ops_for_onnxruntime",
    "cast_nonzero_input_to_float",
    "drop_non_unit_squeeze_dims",
    "export_program",
    "onnx_artifact_files",
    "prepared_program",
]

logger = logging.getLogger(__name__)

# TensorRT 10's ONNX parser accepts opsets 9-20; 20 is the newest both it and onnxruntime read.
DEFAULT_OPSET = 20
# A single protobuf cannot exceed 2 GiB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = int(1.5 * 2**30)

_aten = torch.ops.aten


def _static_int(size) -> int | None:
    """The value of a dim if it is known at export time, else None."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        return size.node.maybe_as_int()
    return None


def _tensor_meta(node: torch.fx.Node) -> tuple[torch.dtype, tuple] | None:
    """(dtype, shape) recorded on a node by torch.export / FakeTensorProp / ShapeProp, or None."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype, tuple(val.shape)
    tensor_meta = node.meta.get("tensor_meta")
    if tensor_meta is not None and hasattr(tensor_meta, "dtype"):
        return tensor_meta.dtype, tuple(tensor_meta.shape)
    return None


def _clean_up(gm: torch.fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def drop_non_unit_squeeze_dims(gm: torch.fx.GraphModule) -> bool:
    """``aten.squeeze.dim(s)`` on a dim whose size is not statically 1 is a no-op in PyTorch, but the exporter emits
    an ONNX ``Squeeze`` on that axis, which onnxruntime rejects (seen on Allegro: Squeeze of a size-32 dim). Keep
    only the axes of size 1; a squeeze left with no axis is replaced by its input."""
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (_aten.squeeze.dim, _aten.squeeze.dims):
            continue
        source = node.args[0]
        meta = _tensor_meta(source) if isinstance(source, torch.fx.Node) else None
        if meta is None:
            logger.debug("drop_non_unit_squeeze_dims: %s: input shape unknown, left as is", node.name)
            continue
        shape = meta[1]
        dims = [node.args[1]] if node.target is _aten.squeeze.dim else list(node.args[1])
        if not shape:  # squeezing a 0-d tensor is the identity in PyTorch and in ONNX alike
            continue
        dims = [d % len(shape) for d in dims]
        unit_dims = [d for d in dims if _static_int(shape[d]) == 1]
        if unit_dims == dims:
            continue
        logger.debug("drop_non_unit_squeeze_dims: %s: axes %s -> %s (shape %s)", node.name, dims, unit_dims, shape)
        if unit_dims:
            with gm.graph.inserting_before(node):
                replacement = gm.graph.call_function(_aten.squeeze.dims, (source, unit_dims))
            replacement.meta = dict(node.meta)
        else:
            replacement = source
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        modified = True
    if modified:
        _clean_up(gm)
    return modified


# ops whose onnxruntime CPU kernels have no bool type, with the argument positions that carry bool data (the
# condition of ``where`` and the mask of ``masked_fill`` stay bool: onnxruntime and TensorRT take them as is).
# ``masked_fill`` is exported as a ``Where`` over its data (seen on HunyuanVideo: ``mask.masked_fill(idx, False)``).
_BOOL_DATA_ARGS: dict = {
    _aten.where.self: (1, 2),
    _aten.where.ScalarOther: (1,),
    _aten.where.ScalarSelf: (2,),
    _aten.masked_fill.Scalar: (0,),
    _aten.masked_fill.Tensor: (0, 2),
    # onnxruntime runs these on bool, but TensorRT's ScatterElements / ScatterND take no BOOL data (HunyuanVideo
    # builds its attention mask with ``mask[i, :n] = True``, a select_scatter).
    _aten.select_scatter.default: (0, 1),
    _aten.slice_scatter.default: (0, 1),
    _aten.index_put.default: (0, 2),
    # TensorRT's Pad takes no BOOL (Mochi pads its attention mask)
    _aten.constant_pad_nd.default: (0,),
    _aten.pad.default: (0,),
    _aten.maximum.default: (0, 1),
    _aten.minimum.default: (0, 1),
}
# int32, not uint8: TensorRT accepts UINT8 only as a network input/output type.
_BOOL_STAND_IN = torch.int32


def _cast(
    gm: torch.fx.GraphModule, value: torch.fx.Node, dtype: torch.dtype, meta_from: torch.fx.Node
) -> torch.fx.Node:
    cast = gm.graph.call_function(_aten._to_copy.default, (value,), {"dtype": dtype})
    cast.meta = dict(meta_from.meta)
    val = value.meta.get("val")
    if isinstance(val, torch.Tensor):
        cast.meta["val"] = val.to(dtype)
    return cast


def cast_bool_ops_for_onnxruntime(gm: torch.fx.GraphModule) -> bool:
    """Ops on bool data that onnxruntime's CPU provider has no kernel for (``Where`` on bool branches, also as
    ``masked_fill``, seen on HunyuanVideo; ``Max``/``Min``) run on int32 stand-ins: cast the bool operands, compute,
    cast the result back."""
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _BOOL_DATA_ARGS:
            continue
        meta = _tensor_meta(node)
        if meta is None or meta[0] != torch.bool:
            continue
        args = list(node.args)
        with gm.graph.inserting_before(node):
            for position in _BOOL_DATA_ARGS[node.target]:
                arg = args[position]
                if isinstance(arg, torch.fx.Node) and (_tensor_meta(arg) or (None,))[0] == torch.bool:
                    args[position] = _cast(gm, arg, _BOOL_STAND_IN, meta_from=arg)
            stand_in = gm.graph.call_function(node.target, tuple(args), dict(node.kwargs))
            stand_in.meta = dict(node.meta)
            if isinstance(node.meta.get("val"), torch.Tensor):
                stand_in.meta["val"] = node.meta["val"].to(_BOOL_STAND_IN)
            result = _cast(gm, stand_in, torch.bool, meta_from=node)
        logger.debug("cast_bool_ops_for_onnxruntime: %s (%s) runs on %s", node.name, node.target, _BOOL_STAND_IN)
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        modified = True
    if modified:
        _clean_up(gm)
    return modified


# TensorRT's NonZero reads only FP32/FP16; a cast to float32 keeps every non-zero bool or integer non-zero.
_NONZERO_STAND_IN = torch.float32
_NONZERO_OPS = (_aten.nonzero.default, _aten.nonzero_static.default)


def cast_nonzero_input_to_float(gm: torch.fx.GraphModule) -> bool:
    """``nonzero`` on a bool or integer tensor (Mochi: the indices of a prompt's valid tokens) exports as an ONNX
    ``NonZero`` that TensorRT's parser rejects for those types; cast its input to float32 first."""
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _NONZERO_OPS:
            continue
        source = node.args[0]
        meta = _tensor_meta(source) if isinstance(source, torch.fx.Node) else None
        if meta is None or meta[0].is_floating_point:
            continue
        with gm.graph.inserting_before(node):
            node.replace_input_with(source, _cast(gm, source, _NONZERO_STAND_IN, meta_from=source))
        logger.debug("cast_nonzero_input_to_float: %s reads %s as %s", node.name, meta[0], _NONZERO_STAND_IN)
        modified = True
    if modified:
        _clean_up(gm)
    return modified


# Order matters only where rewrites interact; these do not. Each is GraphModule -> bool (modified).
PRE_EXPORT_REWRITES: list[Callable[[torch.fx.GraphModule], bool]] = [
    drop_non_unit_squeeze_dims,
    cast_bool_ops_for_onnxruntime,
    cast_nonzero_input_to_float,
]


def _ensure_tensor_meta(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Rewrites read dtypes/shapes from ``node.meta``; graphs not produced by torch.export (symbolic_trace, or nodes a
    pass added without meta) get them from a fake-tensor run, which costs no compute or memory. A graph with an op
    whose output shape depends on data (``nonzero``, seen on Mochi) cannot run on fake tensors without a ShapeEnv;
    it gets its meta from one real run on the example inputs instead."""
    missing = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function") and _tensor_meta(n) is None]
    if not missing:
        return
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    from torch.fx.passes.shape_prop import ShapeProp

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [fake_mode.from_tensor(t) for t in example_inputs]
    try:
        FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*fake_inputs)
    except DynamicOutputShapeException as e:
        logger.debug("_ensure_tensor_meta: fake run failed (%s); propagating shapes with the example inputs", e)
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)


def apply_pre_export_rewrites(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    rewrites: Sequence[Callable[[torch.fx.GraphModule], bool]] = PRE_EXPORT_REWRITES,
) -> list[str]:
    """Run ``rewrites`` on ``gm`` in place; returns the names of those that changed it."""
    _ensure_tensor_meta(gm, example_inputs)
    applied = []
    for rewrite in rewrites:
        if rewrite(gm):
            applied.append(rewrite.__name__)
    return applied


def prepared_program(
    program: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], name: str
) -> torch.fx.GraphModule:
    """A copy of ``program`` (sharing parameters) with :data:`PRE_EXPORT_REWRITES` applied; ``name`` is for the log."""
    program = _copy_graph_module(program)
    applied = apply_pre_export_rewrites(program, example_inputs)
    if applied:
        logger.info("pre-export rewrites applied to %s: %s", name, ", ".join(applied))
    return program


def _copy_graph_module(program: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with its own graph (rewrites must not touch the caller's) sharing parameters and buffers."""
    graph = torch.fx.Graph()
    output = graph.graph_copy(program.graph, {}, return_output_node=True)
    graph.output(output[0] if isinstance(output, tuple) else output)
    return torch.fx.GraphModule(program, graph)


def _dynamic_shapes(
    input_names: Sequence[str], dynamic_axes: dict[str, dict[int, str]], example_inputs: Sequence[torch.Tensor], auto
):
    from torch.export import Dim

    dims: dict[str, object] = {}
    specs = []
    for name, tensor in zip(input_names, example_inputs):
        axes = dynamic_axes.get(name)
        if not axes:
            specs.append(None)
            continue
        spec = {}
        for axis, axis_name in axes.items():
            if tensor.shape[axis] < 2:
                raise ValueError(
                    f"input {name!r} axis {axis} ({axis_name!r}) is dynamic but has size {tensor.shape[axis]} in the "
                    "example inputs; torch.export specialises sizes 0 and 1, use an example of size >= 2"
                )
            spec[axis] = Dim.AUTO if auto else dims.setdefault(axis_name, Dim(axis_name))
        specs.append(spec)
    return tuple(specs)


def _torch_export(program, example_inputs, input_names, dynamic_axes):
    """Named Dims first (they make torch.export check that the axes really are free); if the program relates or
    specialises them (e.g. frames fixed by a positional embedding), Dim.AUTO lets export decide per axis."""
    try:
        return torch.export.export(
            program,
            tuple(example_inputs),
            dynamic_shapes=_dynamic_shapes(input_names, dynamic_axes, example_inputs, auto=False),
            strict=False,
        )
    except torch._dynamo.exc.UserError as e:
        logger.warning("named dynamic axes rejected by torch.export, retrying with Dim.AUTO: %s", str(e).split("\n")[0])
        return torch.export.export(
            program,
            tuple(example_inputs),
            dynamic_shapes=_dynamic_shapes(input_names, dynamic_axes, example_inputs, auto=True),
            strict=False,
        )


def _all_values(graph):
    import onnx_ir as ir

    yield from graph.inputs
    yield from graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


def _rename_io(model, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    import onnx_ir as ir

    graph = model.graph
    if len(graph.inputs) != len(input_names) or len(graph.outputs) != len(output_names):
        raise ArtifactError(
            f"exported ONNX graph has {len(graph.inputs)} inputs / {len(graph.outputs)} outputs, names were given for "
            f"{len(input_names)} / {len(output_names)}"
        )
    # One ONNX value can be listed once under one name: an output that is also an input or an earlier output
    # (a program returning an input, or the same tensor twice) gets its own Identity.
    seen = set(graph.inputs)
    for index, value in enumerate(list(graph.outputs)):
        if value in seen:
            identity = ir.Node("", "Identity", inputs=[value], num_outputs=1)
            graph.append(identity)
            identity.outputs[0].shape, identity.outputs[0].type = value.shape, value.type
            graph.outputs[index] = identity.outputs[0]
        seen.add(graph.outputs[index])

    targets = dict(zip(list(graph.inputs) + list(graph.outputs), list(input_names) + list(output_names)))
    if len(set(targets.values())) != len(targets):
        raise ValueError(f"input/output names must be unique: {list(input_names) + list(output_names)}")
    taken = {v.name for v in _all_values(graph) if v.name}
    for value in _all_values(graph):
        if value not in targets and value.name in targets.values():
            suffix = 1
            while f"{value.name}_{suffix}" in taken:
                suffix += 1
            value.name = f"{value.name}_{suffix}"
            taken.add(value.name)
    for value, name in targets.items():
        value.name = name


_SYMBOL = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")


def _rename_dims(model, input_names: Sequence[str], dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Exporter dims are named s0, s52, ...; name them after the caller's axes ("batch", "frames") everywhere,
    including in expressions like ``2*s52`` on intermediate values."""
    import onnx_ir as ir

    graph = model.graph
    symbol_names: dict[str, str] = {}
    for value, name in zip(graph.inputs, input_names):
        for axis, axis_name in dynamic_axes.get(name, {}).items():
            dim = value.shape[axis] if value.shape is not None else None
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                symbol_names.setdefault(dim.value, axis_name)
            else:
                logger.warning("input %r axis %d (%r) was exported as static size %s", name, axis, axis_name, dim)
    if not symbol_names:
        return

    def rename(dim):
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            return ir.SymbolicDim(_SYMBOL.sub(lambda m: symbol_names.get(m.group(0), m.group(0)), dim.value))
        return dim

    for value in list(_all_values(graph)) + list(graph.outputs):
        if value.shape is not None and value.shape.is_dynamic():
            value.shape = ir.Shape([rename(d) for d in value.shape.dims])


def _external_data_name(path: Path) -> str:
    return f"{path.name}.data"


def export_program(
    program: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
    opset: int | None = None,
    external_data: bool | None = None,
    rewrite: bool = True,
) -> Path:
    """Export ``program`` (flat tensor inputs, flat tuple of tensor outputs) to ``path``; returns the path.

    A GraphModule gets :data:`PRE_EXPORT_REWRITES` first, on a copy; ``rewrite=False`` when the caller has applied
    them already (``to_onnx(single_file=True)`` applies them to the two programs its conditional program wraps: the
    rewrites see one flat graph, not ``cond`` branch subgraphs).

    ``dynamic_axes`` maps input names to ``{axis: axis_name}``; inputs sharing an axis name share one dim. Output dims
    follow from the graph and carry the same names. The file goes to a temporary name in the same directory, is
    checked with ``onnx.checker``, and is renamed into place; with external data (``external_data=True`` or weights
    over 1.5 GiB) the weights go to ``<name>.data`` next to it. ``onnx_artifact_files(path)`` lists what was written.
    """
    try:
        import onnx
        import onnx_ir  # noqa: F401  (the dynamo exporter's IR; fail here with the install hint)
    except ImportError as e:
        raise ImportError(
            "ONNX export needs onnx, onnxscript and onnxruntime: pip install adacache-compile[onnx]"
        ) from e

    path = Path(path)
    dynamic_axes = dict(dynamic_axes or {})
    if len(input_names) != len(example_inputs):
        raise ValueError(f"{len(input_names)} input names for {len(example_inputs)} example inputs")
    unknown = set(dynamic_axes) - set(input_names) - set(output_names)
    if unknown:
        raise ValueError(f"dynamic_axes names {sorted(unknown)} are neither inputs nor outputs")
    input_axes = {name: axes for name, axes in dynamic_axes.items() if name in input_names}

    if rewrite and isinstance(program, torch.fx.GraphModule):
        program = prepared_program(program, example_inputs, path.name)

    exported = _torch_export(program, example_inputs, input_names, input_axes)
    onnx_program = torch.onnx.export(
        exported, dynamo=True, opset_version=opset or DEFAULT_OPSET, optimize=True, verbose=False
    )
    model = onnx_program.model
    _rename_io(model, input_names, output_names)
    _rename_dims(model, input_names, input_axes)

    if external_data is None:
        weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        external_data = weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES

    data_name = _external_data_name(path)
    with staging_dir(path) as staging:
        staged = staging / path.name
        onnx_ir.save(model, staged, external_data=data_name if external_data else None)
        onnx.checker.check_model(str(staged))
        staged_data = staging / data_name
        # onnx_ir keeps tensors under its size threshold inline, so the data file may be empty.
        if staged_data.exists() and staged_data.stat().st_size > 0:
            publish(staged_data, path.parent / data_name)
        publish(staged, path)
    stale = path.parent / data_name
    if stale.exists() and stale not in onnx_artifact_files(path):
        stale.unlink()  # weights of an earlier export of this file, now embedded
    logger.info("exported %s (%s)", path, "external data" if external_data else "embedded weights")
    return path


def onnx_artifact_files(path: str | os.PathLike) -> list[Path]:
    """The ONNX file and every external-data file it references (to hash or copy them together)."""
    from .fingerprint import onnx_header

    path = Path(path)
    return [path] + [path.parent / location for location in onnx_header(path).external_locations]
