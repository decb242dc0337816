"""Helpers shared by the passes: op classes, clean-up, symbolic-size materialisation."""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx

from ..errors import PassError

__all__ = [
    "LAYOUT_OPS",
    "MULTI_INPUT_LAYOUT_OPS",
    "clean_up_graph",
    "is_tensor_node",
    "SymbolTable",
    "module_path_of",
    "concrete",
    "concrete_shape",
]

aten = torch.ops.aten

# Ops that move or re-type a tensor without arithmetic on its values: the stream may pass through them between
# blocks (layout changes such as Latte's spatial <-> temporal reshapes, dtype round trips in mixed precision).
LAYOUT_OPS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.expand.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.type_as.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.narrow.default,
    aten.detach.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.unbind.int,
    operator.getitem,
}
MULTI_INPUT_LAYOUT_OPS = {aten.cat.default, aten.stack.default}
RESIDUAL_OPS = {aten.add.Tensor}


def is_tensor_node(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


def concrete(size) -> int:
    """The captured example value of a (possibly symbolic) size."""
    if isinstance(size, int):
        return size
    node = size.node
    if node.hint is not None:
        return int(node.hint)
    return int(node.expr.xreplace(node.shape_env.var_to_val))


def concrete_shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(concrete(s) for s in node.meta["val"].shape)


def clean_up_graph(gm: fx.GraphModule) -> None:
    """DCE, lint and recompile after a mutation (one place, as in Torch-TensorRT's pass utils)."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def module_path_of(node: fx.Node) -> list[str]:
    """The qualified module names on ``node``'s nn_module_stack, outermost first (call suffixes stripped)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path.split("@")[0] for path, _ in stack.values() if path]


class SymbolTable:
    """Recreates symbolic sizes from the graph inputs, so code outside the cached region never reads a region tensor's
    shape (the skip program has no region tensors)."""

    def __init__(self, graph: fx.Graph):
        self.sources: dict[sympy.Symbol, tuple[fx.Node, int]] = {}
        for node in graph.nodes:
            if node.op != "placeholder" or not is_tensor_node(node):
                continue
            for dim, size in enumerate(node.meta["val"].shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    self.sources.setdefault(size.node.expr, (node, dim))

    def materialize(self, graph: fx.Graph, value, env, where: str):
        """An fx value (node or int) equal to the SymInt ``value``, built from placeholders mapped through ``env``."""
        if isinstance(value, int):
            return value
        expr = value.node.expr if isinstance(value, torch.SymInt) else value
        return self._build(graph, sympy.sympify(expr), env, where)

    def _build(self, graph, expr, env, where):
        from torch.utils._sympy.functions import FloorDiv, Mod

        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            if expr not in self.sources:
                raise PassError(f"{where}: size symbol {expr} has no graph input that carries it")
            node, dim = self.sources[expr]
            return graph.call_function(aten.sym_size.int, (env[node], dim))
        if isinstance(expr, (sympy.Mul, sympy.Add)):
            fn = operator.mul if isinstance(expr, sympy.Mul) else operator.add
            args = [self._build(graph, a, env, where) for a in expr.args]
            out = args[0]
            for a in args[1:]:
                out = graph.call_function(fn, (out, a))
            return out
        if isinstance(expr, FloorDiv):
            a, b = (self._build(graph, x, env, where) for x in expr.args)
            return graph.call_function(operator.floordiv, (a, b))
        if isinstance(expr, Mod):
            a, b = (self._build(graph, x, env, where) for x in expr.args)
            return graph.call_function(operator.mod, (a, b))
        raise PassError(f"{where}: cannot rebuild symbolic size {expr} from the graph inputs")
