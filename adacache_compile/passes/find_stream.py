"""Find the residual stream(s) leaving the cached region and the layout that carries each from a region input."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.fx as fx

from ..errors import UnsupportedModelError
from ..plan import CachePlan, PassResult, Stream
from ._utils import LAYOUT_OPS, MULTI_INPUT_LAYOUT_OPS, RESIDUAL_OPS, concrete_shape, is_tensor_node

__all__ = ["find_stream", "region_outputs", "StreamTracer"]

logger = logging.getLogger(__name__)


@dataclass
class _Trace:
    bases: list[fx.Node]
    layout: list[fx.Node]
    adds: list[fx.Node]
    passthrough: dict[fx.Node, fx.Node] = field(default_factory=dict)


def region_outputs(gm: fx.GraphModule, region: set[fx.Node]) -> list[fx.Node]:
    """Region nodes read by anything after the region, in graph order."""
    return [n for n in gm.graph.nodes if n in region and any(u not in region for u in n.users)]


def find_stream(gm: fx.GraphModule, plan: CachePlan) -> PassResult:
    """Each tensor leaving the region must be ``layout(region input) + residuals``; record that layout.

    Tensors that are not (e.g. a conditioning value computed inside a block and read after it) are left in
    ``plan.leaks`` for :func:`hoist_leaks`, which moves them out or explains why it cannot.
    """
    tracer = StreamTracer(gm, plan.region_nodes)
    streams, leaks = [], []
    for node in region_outputs(gm, plan.region_nodes):
        trace = tracer(node) if is_tensor_node(node) else None
        if trace is None or not trace.adds:
            leaks.append(node)
            continue
        streams.append(
            Stream(
                name=f"stream{len(streams)}",
                output=node,
                bases=trace.bases,
                layout=trace.layout,
                residual_adds=trace.adds,
                passthrough=trace.passthrough,
            )
        )
    if not streams:
        block = plan.region_blocks[-1]
        raise UnsupportedModelError(
            f"find_stream: no residual stream leaves the cached region (last block {block.name!r}, "
            f"{block.module_type}); outputs {[n.name for n in leaks]} are not layout(block input) + residual "
            "branches. AdaCache reuses residuals, so the blocks must be residual (x + f(x)), not e.g. post-norm "
            "(norm(x + f(x)))."
        )
    plan.streams = streams
    plan.leaks = leaks
    logger.info(
        "region streams: %s; values to hoist: %s",
        ", ".join(f"{s.output.name} ({len(s.residual_adds)} residual adds)" for s in streams) or "none",
        ", ".join(n.name for n in leaks) or "none",
    )
    return PassResult(gm, False)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    """Same shape symbolically, or (for sizes export spelled two ways) at the captured example sizes."""
    sa, sb = a.meta["val"].shape, b.meta["val"].shape
    if len(sa) != len(sb):
        return False
    return all(str(x) == str(y) for x, y in zip(sa, sb)) or concrete_shape(a) == concrete_shape(b)


class StreamTracer:
    """Walks back from a node through layout ops and residual adds to region inputs (memoised)."""

    def __init__(self, gm: fx.GraphModule, region: set[fx.Node]):
        self.region = region
        self.position = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.memo: dict[fx.Node, _Trace | None] = {}

    def __call__(self, node: fx.Node) -> _Trace | None:
        if node in self.memo:
            return self.memo[node]
        self.memo[node] = None  # guards cycles through multi-output ops
        self.memo[node] = result = self._trace(node)
        return result

    def _order(self, nodes) -> list[fx.Node]:
        return sorted(set(nodes), key=self.position.__getitem__)

    def _trace(self, node: fx.Node) -> _Trace | None:
        if node not in self.region:
            if node.op == "get_attr" or not is_tensor_node(node):
                return None
            return _Trace([node], [], [])
        target = node.target
        if target in RESIDUAL_OPS and node.kwargs.get("alpha", 1) == 1:
            candidates = []
            for operand in node.args[:2]:
                if is_tensor_node(operand) and _same_shape(operand, node):
                    trace = self(operand)
                    if trace is not None:
                        candidates.append((operand, trace))
            if not candidates:
                return None
            # The stream is the operand that carries the most residual adds (it has passed through every block).
            operand, trace = max(candidates, key=lambda c: len(c[1].adds))
            return _Trace(trace.bases, trace.layout, trace.adds + [node], {**trace.passthrough, node: operand})
        if target in LAYOUT_OPS:
            src = node.args[0]
            trace = self(src) if isinstance(src, fx.Node) else None
            if trace is None:
                return None
            return _Trace(trace.bases, trace.layout + [node], trace.adds, trace.passthrough)
        if target in MULTI_INPUT_LAYOUT_OPS:
            parts = [self(t) for t in node.args[0]]
            if any(p is None for p in parts):
                return None
            return _Trace(
                self._order([b for p in parts for b in p.bases]),
                self._order([n for p in parts for n in p.layout]) + [node],
                self._order([a for p in parts for a in p.adds]),
                {k: v for p in parts for k, v in p.passthrough.items()},
            )
        return None
