"""Undo the copies that functionalization adds, in the finished programs.

Capture functionalizes the graph (so the analysis can trust DCE and data flow), which turns every ``contiguous()``
into an unconditional ``clone`` and every in-place slice write (Wan's rotary embedding writes into an
``empty_like`` buffer) into a ``slice_scatter`` that copies the whole tensor. Eager runs neither copy. A full program
that copies more than the model it replaces lowers every speedup, so once the programs are built:

- ``clone`` becomes ``contiguous`` (copies only when the layout needs it) or, with ``preserve_format``, the input
  itself: nothing in a functional graph mutates a value, so sharing storage is safe;
- a same-dtype ``_to_copy`` becomes its input;
- ``slice_scatter`` into a buffer nothing else reads (a fresh allocation, or an earlier rewritten scatter) becomes an
  in-place ``copy_`` into a slice of that buffer.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from ..plan import CachePlan, PassResult
from ._utils import clean_up_graph

__all__ = ["elide_copies", "elide_copies_in"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

_FRESH = {
    aten.empty_like.default,
    aten.zeros_like.default,
    aten.empty.memory_format,
    aten.zeros.default,
    aten.new_empty.default,
    aten.new_zeros.default,
    aten.full.default,
}


def elide_copies(gm: fx.GraphModule, plan: CachePlan) -> PassResult:
    changed = 0
    for program in (plan.programs.full, plan.programs.skip):
        changed += elide_copies_in(program)
    logger.info("elide_copies: %d copies removed from the programs", changed)
    return PassResult(gm, changed > 0)


def elide_copies_in(gm: fx.GraphModule) -> int:
    graph = gm.graph
    outputs = set(graph.output_node().all_input_nodes)
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.clone.default and node not in outputs:
            memory_format = node.kwargs.get("memory_format", torch.preserve_format)
            if memory_format in (None, torch.preserve_format):
                node.replace_all_uses_with(node.args[0])
            elif memory_format is torch.contiguous_format:
                with graph.inserting_before(node):
                    new = graph.call_function(aten.contiguous.default, (node.args[0],))
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
            else:
                continue
            graph.erase_node(node)
            changed += 1
        elif node.target is aten._to_copy.default and node not in outputs and _same_dtype_only(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed += 1
    written: set[fx.Node] = set()
    done_windows: set[fx.Node] = set()  # slices already written in place, earlier in the graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.slice_scatter.default:
            continue
        base, src = node.args[0], node.args[1]
        if not isinstance(base, fx.Node) or base in outputs or not (base.target in _FRESH or base in written):
            continue
        # Functionalization spells ``base[idx].copy_(x)`` as ``slice_scatter(base, copy(slice(base, idx), x), idx)``.
        staged = src if _is_functional_copy_of_slice(src, base, node) else None
        others = [
            u
            for u in base.users
            if u is not node and u not in done_windows and not (staged is not None and u is staged.args[0])
        ]
        if others:
            continue
        with graph.inserting_before(node):
            if staged is not None:
                window, value = staged.args
                graph.call_function(aten.copy_.default, (window, value))
            else:
                window = graph.call_function(aten.slice.Tensor, (base, *node.args[2:]), dict(node.kwargs))
                graph.call_function(aten.copy_.default, (window, src))
        node.replace_all_uses_with(base)
        graph.erase_node(node)
        if staged is not None and not staged.users:
            graph.erase_node(staged)
        written.add(base)
        done_windows.add(window)
        changed += 1
    if changed:
        clean_up_graph(gm)
    return changed


def _is_functional_copy_of_slice(src, base: fx.Node, scatter: fx.Node) -> bool:
    if not (isinstance(src, fx.Node) and src.target is aten.copy.default and len(src.users) == 1):
        return False
    window = src.args[0]
    return (
        isinstance(window, fx.Node)
        and window.target is aten.slice.Tensor
        and window.args[0] is base
        and len(window.users) == 1
        and tuple(window.args[1:]) == tuple(scatter.args[2:])
    )


def _same_dtype_only(node: fx.Node) -> bool:
    src = node.args[0]
    if not isinstance(src, fx.Node) or "val" not in src.meta or "val" not in node.meta:
        return False
    if set(node.kwargs) - {"dtype", "layout", "device", "memory_format"}:
        return False
    a, b = src.meta["val"], node.meta["val"]
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and node.kwargs.get("memory_format") in (None, torch.preserve_format)
    )
