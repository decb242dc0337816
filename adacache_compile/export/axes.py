"""Symbolic dims of the captured program: the names of the exported dynamic axes, their profile ranges, and the tap
shape as a formula over input sizes.

Dynamic axes are named per symbol of the captured program: dim 0 of any input is ``batch`` (inputs' batch dims are
one axis), the MoReg frame input's frame dim is ``frames`` and, on a 5-D frame input, the two dims after it
``height``/``width``; any other dynamic dim is ``<input>_dim<k>``. An input dim that is a formula of other inputs'
symbols (``2*s0``) and the cached tensors (tap, deltas) reuse a name where their dim is exactly one of those,
otherwise get ``<input>_dim<k>`` / ``tap_dim<k>`` / ``<delta>_dim<k>`` with ranges computed from their formula. A
profile range is ``min`` = the captured lower bound, ``opt`` = the example size, ``max`` = the captured upper bound
or, for an unbounded axis, the example size (pass ``max_sizes={"batch": 8}`` to widen).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from ..errors import ArtifactError
from .manifest import MANIFEST_NAME

__all__ = ["Axes", "TapShape", "safe_name", "serialise_tap_shape", "sym_expr"]

_aten = torch.ops.aten

# The ops a tap-shape graph uses (sizes of inputs and integer arithmetic), by name in the manifest.
_SHAPE_OPS = {
    "mul": operator.mul,
    "floordiv": operator.floordiv,
    "add": operator.add,
    "sub": operator.sub,
    "mod": operator.mod,
    "neg": operator.neg,
}
_SHAPE_OP_NAMES = {fn: name for name, fn in _SHAPE_OPS.items()}


def sym_expr(size):
    """The sympy expression of a dim, or None for a static one."""
    if isinstance(size, torch.SymInt):
        if size.node.maybe_as_int() is not None:
            return None
        return size.node.expr
    return None


def safe_name(name: str) -> str:
    """An input name as an ONNX graph input name (``encoder.mask`` -> ``encoder_mask``)."""
    return name.replace(".", "_")


class Axes:
    """Names the symbols of the captured program and computes profile ranges of any dim formula.

    ``input_axes[i]`` maps the dynamic dims of model input ``i`` to axis names; ``keep`` (axis names) exports every
    other axis static at its example size."""

    def __init__(self, captured, plan, max_sizes: Mapping[str, int] | None, keep: frozenset[str] | None = None):
        import sympy

        self._sympy = sympy
        self.name_of: dict[Any, str] = {}  # symbol -> axis name
        self.canonical: dict[str, Any] = {}  # axis name -> the symbol that stands for it
        self.bounds: dict[Any, tuple[int, int, int]] = {}  # symbol -> (min, opt, max)
        self.pinned: dict[Any, int] = {}  # symbols of axes exported static: their example size
        self.derived: dict[str, tuple[int, int, int]] = {}  # axis name of a dim formula -> (min, opt, max)
        layout = plan.moreg_layout
        frame_at = (layout.frame_input, layout.frame_dim) if layout is not None else (None, None)
        placeholders = [n for n in plan.programs.full.graph.nodes if n.op == "placeholder"]
        self.input_axes: list[dict[int, str]] = []
        formulas = []  # (input index, dim, expr): named once every input's symbols have their bounds
        for index, (name, node, example) in enumerate(zip(captured.input_names, placeholders, plan.example_inputs)):
            axes = {}
            for dim, size in enumerate(node.meta["val"].shape):
                expr = sym_expr(size)
                if expr is None:
                    continue
                if not isinstance(expr, sympy.Symbol):
                    formulas.append((index, dim, expr))
                    continue
                axis = self._axis_name(name, dim, index, frame_at, example.dim())
                if keep is not None and axis not in keep:
                    self.pinned[expr] = int(example.shape[dim])
                    continue
                low, high = captured.input_specs[index].ranges.get(dim, (1, None))
                axes[dim] = self._add_symbol(expr, axis, low, high, int(example.shape[dim]), max_sizes)
            self.input_axes.append(axes)
        for index, dim, expr in formulas:
            axis = self.name_formula(f"{safe_name(captured.input_names[index])}_dim{dim}", expr)
            if isinstance(axis, str):
                self.input_axes[index][dim] = axis

    def _add_symbol(self, expr, axis: str, low: int, high: int | None, opt: int, max_sizes) -> str:
        if expr in self.name_of:
            return self.name_of[expr]
        self.name_of[expr] = axis
        if axis in self.canonical:  # a second symbol for the same axis (e.g. timestep's batch): merged
            return axis
        self.canonical[axis] = expr
        high = (max_sizes or {}).get(axis, high if high is not None else opt)
        if not 1 <= max(1, low) <= opt <= high:
            raise ValueError(f"axis {axis!r}: need min <= example size {opt} <= max, got {low}..{high}")
        self.bounds[expr] = (max(1, low), opt, int(high))
        return axis

    @staticmethod
    def _axis_name(name: str, dim: int, index: int, frame_at, rank: int) -> str:
        if dim == 0:
            return "batch"
        frame_input, frame_dim = frame_at
        if index == frame_input:
            if dim == frame_dim:
                return "frames"
            if rank == 5 and frame_dim == 2 and dim in (3, 4):
                return ("height", "width")[dim - 3]
        return f"{safe_name(name)}_dim{dim}"

    def _canonical_expr(self, expr):
        # A dim that is exactly a pinned symbol comes back as a Python int.
        expr = self._sympy.sympify(expr.xreplace(self.pinned))
        return expr.xreplace({s: self.canonical[self.name_of[s]] for s in expr.free_symbols if s in self.name_of})

    def _evaluate(self, expr, which: int) -> int:
        unknown = [s for s in expr.free_symbols if s not in self.bounds]
        if unknown:
            raise ArtifactError(f"shape formula {expr} uses symbols {unknown} that no model input dim defines")
        return int(expr.xreplace({s: self.bounds[s][which] for s in expr.free_symbols}))

    def name_formula(self, axis: str, expr) -> int | str:
        """The size (static after pinning), the existing axis name, or the new axis ``axis`` of a dim formula."""
        expr = self._canonical_expr(expr)
        if expr.is_number:
            return int(expr)
        if isinstance(expr, self._sympy.Symbol) and expr in self.name_of:
            return self.name_of[expr]
        low, opt, high = (self._evaluate(expr, i) for i in range(3))
        self.derived[axis] = (max(1, low), opt, high)
        return axis

    def name_dims(self, prefix: str, shape) -> tuple[list[int | str], dict[int, str]]:
        """Manifest shape and dynamic axes of a cached tensor from its symbolic shape."""
        dims = []
        for dim, size in enumerate(shape):
            expr = sym_expr(size)
            dims.append(int(size) if expr is None else self.name_formula(f"{prefix}_dim{dim}", expr))
        return dims, {d: s for d, s in enumerate(dims) if isinstance(s, str)}

    def profile_ranges(self) -> dict[str, dict[str, int]]:
        ranges = {self.name_of[s]: b for s, b in self.bounds.items()}
        ranges.update(self.derived)
        return {axis: {"min": lo, "opt": opt, "max": hi} for axis, (lo, opt, hi) in sorted(ranges.items())}


# --- the tap shape ---------------------------------------------------------------------------------------------------
def serialise_tap_shape(tap_shape: fx.GraphModule) -> dict[str, Any]:
    """The tap-shape graph as ``{"ops": [[op, arg, ...]], "output": [arg, ...]}``; an arg is an int or ``"%k"``
    (the k-th op's value); ``["size", input_index, dim]`` reads an input's size."""
    inputs = {n: i for i, n in enumerate(n for n in tap_shape.graph.nodes if n.op == "placeholder")}
    index: dict[fx.Node, str] = {}
    ops: list[list] = []

    def ref(a):
        if isinstance(a, fx.Node):
            return index[a]
        if isinstance(a, int):
            return a
        raise ArtifactError(f"tap shape: cannot serialise argument {a!r}")

    for node in tap_shape.graph.nodes:
        if node.op == "call_function" and node.target is _aten.sym_size.int:
            ops.append(["size", inputs[node.args[0]], int(node.args[1])])
        elif node.op == "call_function" and node.target in _SHAPE_OP_NAMES:
            ops.append([_SHAPE_OP_NAMES[node.target], *(ref(a) for a in node.args)])
        elif node.op in ("placeholder", "output"):
            continue
        else:
            raise ArtifactError(f"tap shape: node {node.name} ({node.target}) is not a size or integer op")
        index[node] = f"%{len(ops) - 1}"
    output = tap_shape.graph.output_node().args[0]
    return {"ops": ops, "output": [ref(a) for a in output]}


class TapShape:
    """``tap_shape(*inputs) -> tuple[int, ...]`` from the serialised op list (see :func:`serialise_tap_shape`),
    evaluated with plain ints."""

    def __init__(self, formula: Mapping[str, Any]):
        self.ops = [list(op) for op in formula["ops"]]
        self.output = list(formula["output"])
        for op in self.ops:
            if op[0] != "size" and op[0] not in _SHAPE_OPS:
                raise ArtifactError(f"{MANIFEST_NAME}: tap shape op {op[0]!r} is not one of size/{list(_SHAPE_OPS)}")

    def __call__(self, *inputs: torch.Tensor) -> tuple[int, ...]:
        values: list[int] = []

        def arg(a):
            return values[int(a[1:])] if isinstance(a, str) else a

        for op, *args in self.ops:
            if op == "size":
                values.append(int(inputs[args[0]].shape[args[1]]))
            else:
                values.append(_SHAPE_OPS[op](*(arg(a) for a in args)))
        return tuple(arg(a) for a in self.output)
