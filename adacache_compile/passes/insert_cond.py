"""One conditional program from the two: ``torch.cond(compute, full, skip)`` in one GraphModule (off by default).

cond(*inputs, compute, *cached, tap_prev) -> (*outputs, *deltas, tap, metrics)
    ``compute`` (a bool tensor the host makes from the schedule's decision) picks the branch. The true branch is the
    full program (it ignores ``cached``); the false branch is the skip program (it ignores ``tap_prev``), and passes
    the newest cached deltas and ``tap_prev`` through and returns zero metrics, which the schedule never reads on a
    skipped step. ``cached`` is the skip program's: one delta per stream, or the forecast slots and
    ``forecast_weights`` (:meth:`~adacache_compile.programs.Programs.skip_cached_inputs`).

The branches are wrappers that call the already split (and copy-elided) ``full`` and ``skip`` GraphModules with
their own signatures, so nothing is rebuilt. Each branch returns its values flattened to 1-D and the conditional
program restores their shapes after the ``cond``, from the input sizes: ``torch.cond`` merges the two branches'
output strides symbolically and fails on strides it cannot read as products of the sizes (a model's unpatchify
gives ``2*(h//2)``-style sizes whose contiguous strides hold ``Max(1, h//2)``); 1-D outputs have stride 1. Passed-
through inputs are cloned: a ``cond`` branch must not return an alias of its inputs.

The pass runs when the plan asks for it (``optimize(..., single_program=True)``); ``to_onnx(single_file=True)``
calls :func:`build_cond_program` on its own (pre-export-rewritten) copies of the two programs, and then makes the
exported ``If``'s else branch return empty deltas and tap instead of the clones
(:mod:`adacache_compile.export.single_file`).
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from ..errors import PassError
from ..plan import CachePlan, PassResult
from ..programs import COMPUTE, Programs, metrics_length
from ._utils import SymbolTable, clean_up_graph

__all__ = ["insert_cond", "build_cond_program"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten


def insert_cond(gm: fx.GraphModule, plan: CachePlan) -> PassResult:
    if not plan.single_program:
        return PassResult(gm, False)
    plan.programs.cond = build_cond_program(plan.programs)
    logger.info("insert_cond: one conditional program of the full and the skip program")
    return PassResult(gm, True)


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _tensor_val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _output_vals(program: fx.GraphModule, count: int) -> list[torch.Tensor]:
    """The fake values of ``program``'s first ``count`` outputs (the model outputs), whose shapes the conditional
    program restores."""
    vals = []
    for index, node in enumerate(list(program.graph.output_node().args[0])[:count]):
        val = _tensor_val(node)
        if val is None:
            raise PassError(
                f"insert_cond: model output {index} ({getattr(node, 'name', node)!r}) of the full program carries no "
                "fake value to take its shape from; build the programs with split_programs from a torch.export capture"
            )
        vals.append(val)
    return vals


def _flat(graph: fx.Graph, values: list[fx.Node]) -> None:
    graph.output(tuple(graph.call_function(aten.reshape.default, (v, [-1])) for v in values))


def _branch(program: fx.GraphModule, attribute: str, num_operands: int, body) -> fx.GraphModule:
    """A branch over all ``num_operands`` operands: ``body(graph, operands, call)`` returns its values, ``call(args)``
    the results of ``program`` (held as submodule ``attribute``) on ``args``."""
    graph = fx.Graph()
    operands = [graph.placeholder(f"operand{i}") for i in range(num_operands)]

    def call(args, count):
        results = graph.call_module(attribute, tuple(args))
        return [graph.call_function(operator.getitem, (results, i)) for i in range(count)]

    _flat(graph, body(graph, operands, call))
    root = torch.nn.Module()
    root.add_module(attribute, program)
    branch = fx.GraphModule(root, graph, class_name=f"{attribute.title()}Branch")
    clean_up_graph(branch)
    return branch


def build_cond_program(programs: Programs, branches: dict[str, fx.GraphModule] | None = None) -> fx.GraphModule:
    """``cond(*inputs, compute, *cached, tap_prev)`` from ``programs.full`` and ``programs.skip`` (see the module
    docstring). ``branches`` (``{"full": ..., "skip": ...}``) replaces the programs the branches call with rewritten
    copies of the same signature (``to_onnx``'s pre-export rewrites); names, shapes and size symbols still come from
    ``programs``, whose fake values carry the capture's symbolic sizes."""
    branches = {"full": programs.full, "skip": programs.skip, **(branches or {})}
    full_inputs, skip_inputs = _placeholders(programs.full), _placeholders(programs.skip)
    n = len(full_inputs) - 1
    cached_names = [p.name for p in skip_inputs[n:]]
    num_operands = n + len(cached_names) + 1
    slots = programs.forecast_order + 1 if programs.forecast_order else 1
    num_full = programs.num_outputs + len(programs.delta_names) + 2

    def full_body(graph, operands, call):
        return call([*operands[:n], operands[-1]], num_full)

    def skip_body(graph, operands, call):
        outputs = call(operands[:-1], programs.num_outputs)
        newest = [operands[n + s * slots] for s in range(len(programs.delta_names))]
        passed = [graph.call_function(aten.clone.default, (t,)) for t in (*newest, operands[-1])]
        metrics = graph.call_function(
            aten.new_zeros.default,
            (operands[-1], [metrics_length(len(programs.moreg_strides))]),
            {"dtype": torch.float32},
        )
        return [*outputs, *passed, metrics]

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for p in full_inputs[:n]:
        env[p] = _placeholder(graph, p.name, p.meta.get("val"))
    example = full_inputs[0].meta.get("val")
    compute = _placeholder(graph, COMPUTE, example.new_empty((), dtype=torch.bool) if example is not None else None)
    cached = [_placeholder(graph, p.name, p.meta.get("val")) for p in skip_inputs[n:]]
    env[full_inputs[-1]] = tap_prev = _placeholder(graph, full_inputs[-1].name, full_inputs[-1].meta.get("val"))

    root = torch.nn.Module()
    root.true_graph_0 = _branch(branches["full"], "full", num_operands, full_body)
    root.false_graph_0 = _branch(branches["skip"], "skip", num_operands, skip_body)
    operands = (*(env[p] for p in full_inputs[:n]), *cached, tap_prev)
    result = graph.call_function(
        torch.cond, (compute, graph.get_attr("true_graph_0"), graph.get_attr("false_graph_0"), operands)
    )
    shapes = [v.shape for v in _output_vals(programs.full, programs.num_outputs)]
    shapes += [skip_inputs[n + s * slots].meta["val"].shape for s in range(len(programs.delta_names))]
    shapes.append(full_inputs[-1].meta["val"].shape)
    symbols = SymbolTable(programs.full.graph)
    values = []
    for index in range(num_full):
        flat = graph.call_function(operator.getitem, (result, index))
        if index < len(shapes):
            sizes = [symbols.materialize(graph, d, env, where=f"insert_cond: output {index}") for d in shapes[index]]
            flat = graph.call_function(aten.view.default, (flat, sizes))
        values.append(flat)
    graph.output(tuple(values))
    cond = fx.GraphModule(root, graph, class_name="CondProgram")
    clean_up_graph(cond)
    return cond


def _placeholder(graph: fx.Graph, name: str, val) -> fx.Node:
    node = graph.placeholder(name)
    if val is not None:
        node.meta["val"] = val
    return node
