"""The one-file program's skipped step without copies: the ``If``'s else branch returns empty cached values.

In the exported ``cached.onnx`` the else branch (the skip program) returns the newest cached deltas and ``tap_prev``
as the ``If``'s delta and tap outputs, because both branches of an ``If`` produce the same outputs. An ``If`` output
cannot alias an outer-scope input, so onnxruntime copies those tensors on every skipped step (and the caller fetches
them), although the runtime never reads them: on a skipped step it keeps its own cached values
(:meth:`~adacache_compile.programs.SingleProgram.skip` returns the model outputs only). :func:`drop_skip_passthrough`
rewrites the file so that the else branch returns empty tensors there instead:

- each passed-through else-branch output becomes a constant 1-D tensor of zero elements (same dtype and rank as the
  then branch's flattened value: TensorRT's ``If`` needs the same rank in both branches);
- the ``Reshape`` after the ``If`` that restores its shape gets ``shape * compute`` (``allowzero=1``), so a skipped
  step reshapes the empty value to an all-zero shape and a computed step to the real one;
- those graph outputs' declared dims become free (``dim_param``), as their size now depends on ``compute``.

The model outputs and ``metrics`` are unchanged; a computed step is bitwise the same program.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import ArtifactError

__all__ = ["drop_skip_passthrough", "SKIPPED_DIM_PREFIX"]

# dim_param of the declared dims of an output that is empty on a skipped step.
SKIPPED_DIM_PREFIX = "computed_only_"


def drop_skip_passthrough(path: Path, output_names: Sequence[str], compute_name: str) -> None:
    """Rewrite ``path`` (a ``cached.onnx`` with one top-level ``If`` on ``compute_name``) so that the graph outputs
    ``output_names`` (the deltas and the tap) are empty on a skipped step (see the module docstring)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    ifs = [n for n in graph.node if n.op_type == "If"]
    if len(ifs) != 1 or list(ifs[0].input) != [compute_name]:
        raise ArtifactError(f"{path.name}: expected one top-level If on {compute_name!r}, found {len(ifs)} If nodes")
    if_node = ifs[0]
    else_branch = next(a.g for a in if_node.attribute if a.name == "else_branch")
    producers = {out: node for node in graph.node for out in node.output}
    wanted = set(output_names)
    flag = f"{compute_name}_as_int64"
    new_nodes = [helper.make_node("Cast", [compute_name], [flag], to=TensorProto.INT64, name=f"{flag}_cast")]
    rewired = 0
    for out in graph.output:
        if out.name not in wanted:
            continue
        reshape = producers.get(out.name)
        if reshape is None or reshape.op_type != "Reshape" or reshape.input[0] not in if_node.output:
            raise ArtifactError(
                f"{path.name}: graph output {out.name!r} is not a Reshape of an If output; cannot drop its copy on "
                "skipped steps"
            )
        index = list(if_node.output).index(reshape.input[0])
        branch_out = else_branch.output[index]
        elem_type = branch_out.type.tensor_type.elem_type
        empty = f"{branch_out.name}_empty"
        dtype = helper.tensor_dtype_to_np_dtype(elem_type)
        else_branch.node.append(
            helper.make_node(
                "Constant", [], [empty], value=numpy_helper.from_array(np.zeros((0,), dtype=dtype)), name=empty
            )
        )
        branch_out.name = empty
        branch_out.type.tensor_type.shape.dim[0].Clear()
        branch_out.type.tensor_type.shape.dim[0].dim_param = f"{SKIPPED_DIM_PREFIX}{index}"
        shape = f"{reshape.output[0]}_shape_if_computed"
        new_nodes.append(helper.make_node("Mul", [reshape.input[1], flag], [shape], name=shape))
        reshape.input[1] = shape
        kept_attributes = [a for a in reshape.attribute if a.name != "allowzero"]
        del reshape.attribute[:]
        reshape.attribute.extend([*kept_attributes, helper.make_attribute("allowzero", 1)])
        for d, dim in enumerate(out.type.tensor_type.shape.dim):
            dim.Clear()
            dim.dim_param = f"{SKIPPED_DIM_PREFIX}{out.name}_{d}"
        rewired += 1
    if rewired != len(wanted):
        raise ArtifactError(f"{path.name}: found {rewired} of the outputs {sorted(wanted)}")
    _drop_dead_nodes(else_branch)
    # Declared shapes of the rewired values (their size now depends on compute) must not pin them.
    rewired_names = wanted | {if_node.output[list(if_node.output).index(producers[n].input[0])] for n in wanted}
    kept = [info for info in graph.value_info if info.name not in rewired_names]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    # The new nodes read compute and the Reshape shapes: put them right before the first Reshape they feed, which
    # keeps the graph topologically sorted (the shapes are computed before their Reshape).
    nodes = list(graph.node)
    first = min(i for i, n in enumerate(nodes) if n.op_type == "Reshape" and n.output[0] in wanted)
    cast, muls = new_nodes[0], new_nodes[1:]
    ordered = nodes[:first]
    for node in nodes[first:]:
        for mul in muls:
            if node.op_type == "Reshape" and mul.output[0] in node.input:
                ordered.append(mul)
        ordered.append(node)
    del graph.node[:]
    graph.node.extend([cast, *ordered])
    onnx.save(model, str(path))


def _subgraph_reads(node) -> set[str]:
    """Every value name read by the nodes of ``node``'s subgraphs (``g`` and ``graphs`` attributes), recursively."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                names.update(inner.input)
                names |= _subgraph_reads(inner)
    return names


def _drop_dead_nodes(graph) -> None:
    """Remove the nodes of ``graph`` (a branch) whose outputs nothing reads any more."""
    while True:
        used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
        # Values read inside nested subgraphs (an If or Loop within the branch, at any depth) count too.
        used |= {name for node in graph.node for name in _subgraph_reads(node)}
        dead = [node for node in graph.node if node.output and not any(out in used for out in node.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)
