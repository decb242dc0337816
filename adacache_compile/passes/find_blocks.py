"""Find the repeated transformer block stacks from ``nn_module_stack`` and choose the cached region."""

from __future__ import annotations

import logging
import re

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from ..plan import Block, CachePlan, PassResult

__all__ = ["find_blocks"]

logger = logging.getLogger(__name__)

_INDEXED = re.compile(r"^(?P<stack>.+)\.(?P<index>\d+)$")


def find_blocks(gm: fx.GraphModule, plan: CachePlan) -> PassResult:
    """A stack is a module list with >= 2 children of one type that own graph nodes; its children are the blocks.

    The outermost such entry of each node's module stack names the node's block, so layers nested in a block
    (``attn.to_out.0``) never count as blocks of their own.
    """
    types: dict[str, str] = {}
    owners: dict[fx.Node, str] = {}
    order: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get("adacache_hoisted"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        for path, mtype in stack.values():
            path = path.split("@")[0]
            if _INDEXED.match(path) and _is_module_list_child(plan.model, path):
                types.setdefault(path, _type_name(mtype))
                owners[node] = path
                if path not in order:
                    order.append(path)
                break
    by_stack: dict[str, list[str]] = {}
    for path in order:
        by_stack.setdefault(_INDEXED.match(path)["stack"], []).append(path)
    stacks = {
        name: paths for name, paths in by_stack.items() if len(paths) >= 2 and len({types[p] for p in paths}) == 1
    }
    if not stacks:
        found = ", ".join(f"{k} ({len(v)})" for k, v in by_stack.items()) or "none"
        raise UnsupportedModelError(
            f"{plan.model.__class__.__name__ if plan.model is not None else 'model'}: no repeated transformer block "
            f"stack found (module lists with >= 2 children of one type that run in forward(); candidates: {found}). "
            "AdaCache caches the residuals of a stack of blocks; a model without one cannot be cached."
        )
    blocks: dict[str, Block] = {}
    for node, path in owners.items():
        stack_name = _INDEXED.match(path)["stack"]
        if stack_name not in stacks:
            continue
        if path not in blocks:
            blocks[path] = Block(path, stack_name, int(_INDEXED.match(path)["index"]), types[path])
        blocks[path].nodes.append(node)
    plan.all_blocks = sorted(blocks.values(), key=lambda b: _position(gm, b.nodes[0]))
    plan.region_blocks = _select_region(plan)
    first = plan.region_blocks[0].nodes[0]
    last = plan.region_blocks[-1].nodes[-1]
    plan.region_nodes = _span(gm, first, last)
    logger.info(
        "found %d blocks in %d stack(s) (%s); cached region %s..%s",
        len(plan.all_blocks),
        len(stacks),
        ", ".join(stacks),
        plan.region_blocks[0].name,
        plan.region_blocks[-1].name,
    )
    return PassResult(gm, False)


def _is_module_list_child(model, path: str) -> bool:
    if model is None:
        return True
    parent = _INDEXED.match(path)["stack"]
    try:
        return isinstance(model.get_submodule(parent), (torch.nn.ModuleList, torch.nn.Sequential))
    except AttributeError:
        return False


def _type_name(mtype) -> str:
    name = mtype if isinstance(mtype, str) else getattr(mtype, "__qualname__", str(mtype))
    return name.rsplit(".", 1)[-1].strip("'>")


def _position(gm: fx.GraphModule, node: fx.Node) -> int:
    for i, n in enumerate(gm.graph.nodes):
        if n is node:
            return i
    raise KeyError(node.name)


def _span(gm: fx.GraphModule, first: fx.Node, last: fx.Node) -> set[fx.Node]:
    span, inside = set(), False
    for node in gm.graph.nodes:
        if node is first:
            inside = True
        if inside and node.op == "call_function":
            span.add(node)
        if node is last:
            break
    return span


def _select_region(plan: CachePlan) -> list[Block]:
    region = getattr(plan.config, "region", None)
    if region is None:
        return list(plan.all_blocks)
    start, stop = region
    chosen = plan.all_blocks[start:stop]
    if not chosen:
        raise ValueError(
            f"AdaCacheConfig.region={region!r} selects no block; the model has {len(plan.all_blocks)} blocks "
            f"({plan.all_blocks[0].name} .. {plan.all_blocks[-1].name})"
        )
    return chosen
