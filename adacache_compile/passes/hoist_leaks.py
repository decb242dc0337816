"""Move values that leak out of the cached region, but do not depend on the residual stream, in front of it.

Example (docs/architecture.md, "Findings that shaped it"): Wan computes ``temb.float()`` inside ``blocks.0`` and
later code reads it. Such a value must exist in the skip program, which runs no block, so it is computed before the
region instead. Symbolic sizes read off region tensors are rebuilt from the graph inputs. A leaking value that does
depend on the stream cannot be reused from a cache without changing the model's function, so it is refused with the
node and block named.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from ..plan import CachePlan, PassResult
from ._utils import SymbolTable, clean_up_graph, module_path_of

__all__ = ["hoist_leaks"]

logger = logging.getLogger(__name__)


def hoist_leaks(gm: fx.GraphModule, plan: CachePlan) -> PassResult:
    if not plan.leaks:
        return PassResult(gm, False)
    region = plan.region_nodes
    first = next(n for n in gm.graph.nodes if n in region)
    tainted = _stream_tainted(gm, plan)
    symbols = SymbolTable(gm.graph)
    identity = {n: n for n in gm.graph.nodes}
    moved: list[fx.Node] = []
    for leak in plan.leaks:
        if isinstance(leak.meta.get("val"), torch.SymInt):
            with gm.graph.inserting_before(first):
                rebuilt = symbols.materialize(gm.graph, leak.meta["val"], identity, where=f"hoist_leaks: {leak.name}")
            leak.replace_all_uses_with(rebuilt, delete_user_cb=lambda user: user not in region)
            plan.hoisted.append(f"{leak.name} (size)")
            continue
        if leak in tainted:
            blocks = [p for p in module_path_of(leak) if p in {b.name for b in plan.region_blocks}]
            raise UnsupportedModelError(
                f"hoist_leaks: node {leak.name!r} ({leak.target}) in block {blocks[0] if blocks else '?'} is read "
                f"after the cached region ({', '.join(u.name for u in leak.users if u not in region)}) but is not a "
                "residual stream (expected layout(stream) + residual branches); its value depends on the stream, "
                "so it cannot be reused from a cache. Choose a region that excludes this block "
                "(AdaCacheConfig.region)."
            )
        cone = _cone_in_region(leak, region)
        for node in sorted(cone, key=_positions(gm).__getitem__):
            if node in moved:
                continue
            first.prepend(node)
            node.meta["adacache_hoisted"] = True
            region.discard(node)
            moved.append(node)
        plan.hoisted.append(leak.name)
    for block in plan.all_blocks:
        block.nodes = [n for n in block.nodes if not n.meta.get("adacache_hoisted")]
    clean_up_graph(gm)
    logger.info("hoisted out of the region: %s", ", ".join(plan.hoisted))
    return PassResult(gm, True)


def _positions(gm):
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _cone_in_region(node: fx.Node, region: set[fx.Node]) -> set[fx.Node]:
    cone, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in cone or n not in region:
            continue
        cone.add(n)
        stack.extend(n.all_input_nodes)
    return cone


def _stream_tainted(gm: fx.GraphModule, plan: CachePlan) -> set[fx.Node]:
    """Region nodes whose value depends on the residual stream (anything downstream of a stream-path node)."""
    seeds = set()
    for s in plan.streams:
        seeds.update(s.bases)  # the stream as it enters the region
        seeds.update(s.layout)
        seeds.update(s.residual_adds)
    tainted = set()
    for node in gm.graph.nodes:
        if node not in plan.region_nodes:
            continue
        if node in seeds or any(i in tainted or i in seeds for i in node.all_input_nodes):
            tainted.add(node)
    return tainted
