"""Build the two static programs from the analysed graph.

full(*inputs, tap_prev) -> (*outputs, *deltas, tap, metrics)
    every block runs; for each stream leaving the region it emits one fused delta ``D = y - layout(x_in)``, and the
    model's outputs are computed from ``layout(x_in) + D`` (so a skip step fed this D reproduces them bitwise), plus
    the metric tap and the metric norms (the host reads ``metrics`` once per computed step; nothing else syncs).
skip(*inputs, *deltas) -> outputs
    no op of the region: each stream is ``layout(x_in) + D`` with the cached D. With ``forecast_order`` p > 0 the
    program takes, per stream, the deltas of the last p + 1 computed steps and one ``forecast_weights`` vector, and D
    is ``sum_j w_j * D_j`` (accumulated in float32): the extrapolation the host's weights describe
    (:mod:`adacache_compile.forecast`).
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from ..errors import PassError
from ..forecast import LOW_PRECISION, weights_dtype
from ..plan import CachePlan, PassResult, Stream
from ..programs import FORECAST_WEIGHTS, Programs, pack_metrics
from ._utils import SymbolTable, clean_up_graph

__all__ = ["split_programs", "adacache_metrics"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten
DEFAULT_MOREG_STRIDES = (1,)


def adacache_metrics(
    tap: torch.Tensor,
    tap_prev: torch.Tensor,
    deltas: tuple[torch.Tensor, ...],
    norm_ord: int,
    view_shape: tuple[int, ...] | None,
    frame_axis: int,
    strides: tuple[int, ...],
) -> torch.Tensor:
    """One float32 vector the host reads once per computed step (layout: :class:`~adacache_compile.programs.MetricValues`):
    ``[all deltas and tap finite (1/0), ||r_prev - r||_p, ||r_prev||_p, ||r||_p, (motion num, den) per MoReg stride]``."""
    r = tap.float()
    r_prev = tap_prev.float()
    finite = torch.stack([torch.isfinite(t).all() for t in (tap, *deltas)]).all()
    motion = []
    if view_shape is not None:
        frames = r.reshape(view_shape)
        length = frames.shape[frame_axis]
        for k in strides:
            later = frames.narrow(frame_axis, k, length - k)
            earlier = frames.narrow(frame_axis, 0, length - k)
            motion.append(((later - earlier).abs().sum(), later.abs().sum() + earlier.abs().sum()))
    return pack_metrics(
        finite,
        torch.linalg.vector_norm(r_prev - r, ord=norm_ord),
        torch.linalg.vector_norm(r_prev, ord=norm_ord),
        torch.linalg.vector_norm(r, ord=norm_ord),
        motion,
    )


def split_programs(gm: fx.GraphModule, plan: CachePlan) -> PassResult:
    if plan.tap_node is None or not plan.streams:
        raise PassError("split_programs: run find_stream and tap_metric first (no streams or tap in the plan)")
    full = _build_full(gm, plan)
    skip = _build_skip(gm, plan)
    num_outputs = len(gm.graph.output_node().args[0])
    plan.programs = Programs(
        full=full,
        skip=skip,
        tap_shape=_build_shape(gm, plan.tap_node.meta["val"], "TapShape"),
        tap_dtype=plan.tap_node.meta["val"].dtype,
        moreg_strides=_moreg_strides(plan),
        num_outputs=num_outputs,
        delta_names=[f"delta_{s.name}" for s in plan.streams],
        forecast_order=_forecast_order(plan),
        context_parallel=plan.context_parallel,
        norm_ord=int(getattr(plan.config, "norm_ord", 1)),
        delta_shapes=[_build_shape(gm, s.output.meta["val"], "DeltaShape") for s in plan.streams],
        delta_dtypes=[s.output.meta["val"].dtype for s in plan.streams],
    )
    _check_skip_is_free_of_region(skip, plan)
    logger.info(
        "programs: full %d ops, skip %d ops",
        sum(n.op == "call_function" for n in full.graph.nodes),
        sum(n.op == "call_function" for n in skip.graph.nodes),
    )
    return PassResult(gm, True)


def _moreg_strides(plan: CachePlan) -> tuple[int, ...]:
    moreg = getattr(plan.config, "moreg", None)
    strides = tuple(moreg.strides) if moreg is not None else DEFAULT_MOREG_STRIDES
    layout = plan.moreg_layout
    return strides if layout is not None and all(k < layout.frames for k in strides) else ()


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _replay_layout(graph: fx.Graph, stream: Stream, env: dict, region: set, symbols: SymbolTable) -> fx.Node:
    """Emit ``layout(x_in)`` for one stream into ``graph``; ``env`` maps nodes outside the region to ``graph``'s."""
    local: dict[fx.Node, fx.Node] = {}

    def arg(a, node):
        if not isinstance(a, fx.Node):
            return a
        if a in local:
            return local[a]
        if a in stream.passthrough:  # a residual add: the layout-only value is its stream operand's
            return arg(stream.passthrough[a], node)
        if a not in region:
            return env[a]
        val = a.meta.get("val")
        if isinstance(val, torch.SymInt):
            return symbols.materialize(graph, val, env, where=f"split_programs: {node.name}")
        raise PassError(
            f"split_programs: layout op {node.name} ({node.target}) reads {a.name}, a region value that is not on "
            f"the stream of {stream.output.name}"
        )

    for node in stream.layout:
        if node.target is aten.type_as.default:
            # Only the dtype of the reference is needed; the reference itself may live inside the region.
            new = graph.call_function(
                aten._to_copy.default, (arg(node.args[0], node),), {"dtype": node.args[1].meta["val"].dtype}
            )
        else:
            new = graph.call_function(
                node.target,
                tuple(fx.node.map_aggregate(node.args, lambda a, n=node: arg(a, n))),
                dict(fx.node.map_aggregate(node.kwargs, lambda a, n=node: arg(a, n))),
            )
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "stack_trace")})
        local[node] = new
    return arg(stream.output, stream.output)


def _build_full(gm: fx.GraphModule, plan: CachePlan) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    symbols = SymbolTable(gm.graph)
    region = plan.region_nodes
    last_region = [n for n in gm.graph.nodes if n in region][-1]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    deltas, tap = [], None
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node is placeholders[-1]:
            tap_prev = graph.placeholder("tap_prev")
            tap_prev.meta["val"] = plan.tap_node.meta["val"]
        if node is last_region:
            rebuilt = {}
            for stream in plan.streams:
                layout = _replay_layout(graph, stream, env, region, symbols)
                delta = graph.call_function(aten.sub.Tensor, (env[stream.output], layout))
                rebuilt[stream.output] = graph.call_function(aten.add.Tensor, (layout, delta))
                deltas.append(delta)
            tap = env[plan.tap_node]
            env.update(rebuilt)  # everything after the region reads layout(x_in) + D, as the skip program does
    layout = plan.moreg_layout
    moreg = getattr(plan.config, "moreg", None)
    if moreg is not None and layout is None:
        raise PassError(f"MoReg is on but the tap's frame layout is unknown: {plan.moreg_layout_error}")
    # The motion norms cost one pass over the tap: compute them whenever the layout is known, so switching MoReg on
    # or off (same strides) needs no new capture.
    strides = tuple(moreg.strides) if moreg is not None else DEFAULT_MOREG_STRIDES
    use_moreg = layout is not None and all(k < layout.frames for k in strides)
    if moreg is not None and not use_moreg:
        raise ValueError(f"MoRegConfig.strides {list(strides)} must be < the tap's {layout.frames} frames")
    view_shape = _moreg_view(graph, layout, tap, env, placeholders) if use_moreg else None
    metrics = graph.call_function(
        adacache_metrics,
        (
            tap,
            tap_prev,
            tuple(deltas),
            int(getattr(plan.config, "norm_ord", 1)),
            view_shape,
            layout.frame_axis if use_moreg else 0,
            strides if use_moreg else (),
        ),
    )
    outputs = [env[o] if isinstance(o, fx.Node) else o for o in gm.graph.output_node().args[0]]
    graph.output(tuple(outputs + deltas + [tap, metrics]))
    full = fx.GraphModule(gm, graph, class_name="FullProgram")
    clean_up_graph(full)
    return full


def _moreg_view(graph: fx.Graph, layout, tap: fx.Node, env: dict, placeholders: list[fx.Node]) -> tuple:
    """The tap's frame view as graph values, batch and frames read from the inputs so dynamic dims keep working."""
    channels = int(tap.meta["val"].shape[-1])
    if layout.frame_input is not None:
        video = env[placeholders[layout.frame_input]]
        batch = graph.call_function(aten.sym_size.int, (video, 0))
        frames = graph.call_function(aten.sym_size.int, (video, layout.frame_dim))
        if layout.patch_t > 1:
            frames = graph.call_function(operator.floordiv, (frames + layout.patch_t - 1, layout.patch_t))
    else:
        # No input carries the frames (LTX takes packed tokens): T and S are the captured ones, and the batch is
        # what the tap holds beyond them (every reading has A * N == B * T * S), as the view may also hold a -1.
        frames = layout.frames
        rows = graph.call_function(aten.sym_size.int, (tap, 0))
        batch = graph.call_function(
            operator.floordiv,
            (
                graph.call_function(operator.mul, (rows, graph.call_function(aten.sym_size.int, (tap, 1)))),
                frames * layout.tokens_per_frame,
            ),
        )
    tokens = graph.call_function(aten.sym_size.int, (tap, 1))
    values = {"B": batch, "T": frames, "N": tokens, "-1": -1, "C": channels}
    return tuple(values[k] for k in layout.view)


def _build_shape(gm: fx.GraphModule, value: torch.Tensor, class_name: str) -> fx.GraphModule:
    """``shape(*inputs) -> tuple[int, ...]``: the shape of a cached tensor (``value``: the tap's or a delta's fake
    value) for a call, so a step with nothing cached can pass zeros of the right shape without running anything
    heavy."""
    graph = fx.Graph()
    env = {n: graph.placeholder(n.name) for n in _placeholders(gm)}
    symbols = SymbolTable(gm.graph)
    dims = [symbols.materialize(graph, d, env, where=class_name) for d in value.shape]
    graph.output(tuple(dims))
    return fx.GraphModule(torch.nn.Module(), graph, class_name=class_name)


def _forecast_order(plan: CachePlan) -> int:
    return int(getattr(plan.config, "forecast_order", 0))


def _build_skip(gm: fx.GraphModule, plan: CachePlan) -> fx.GraphModule:
    region = plan.region_nodes
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    symbols = SymbolTable(gm.graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first_region = next(n for n in gm.graph.nodes if n in region)
    order = _forecast_order(plan)
    delta_inputs = []
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        if node is first_region:
            for stream, delta in zip(plan.streams, delta_inputs):
                env[stream.output] = graph.call_function(
                    aten.add.Tensor, (_replay_layout(graph, stream, env, region, symbols), delta)
                )
        if node in region:
            continue
        missing = [i.name for i in node.all_input_nodes if i not in env]
        if missing:
            raise PassError(
                f"split_programs: node {node.name} ({node.target}) after the region reads region values {missing} "
                "that are not residual streams"
            )
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node is placeholders[-1]:
            delta_inputs = _delta_inputs(graph, plan.streams, order)
    graph.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in gm.graph.output_node().args[0]))
    skip = fx.GraphModule(gm, graph, class_name="SkipProgram")
    clean_up_graph(skip)
    return skip


def _placeholder(graph: fx.Graph, name: str, val) -> fx.Node:
    node = graph.placeholder(name)
    node.meta["val"] = val
    return node


def _call(graph: fx.Graph, target, *args, **kwargs) -> fx.Node:
    """A new node whose ``val`` is ``target`` run on its arguments' fake values."""
    node = graph.call_function(target, args, kwargs)
    vals = fx.node.map_aggregate(args, lambda a: a.meta["val"] if isinstance(a, fx.Node) else a)
    node.meta["val"] = target(*vals, **kwargs)
    return node


def _delta_inputs(graph: fx.Graph, streams: list[Stream], order: int) -> list[fx.Node]:
    """The skip program's cached inputs, and per stream the delta it adds: the input itself (order 0), or
    ``sum_j w_j * D_j`` over the stream's ``order + 1`` slots (see ``Programs.skip_cached_names``)."""
    if order == 0:
        return [_placeholder(graph, f"delta_{s.name}", s.output.meta["val"]) for s in streams]
    slots = [
        [
            _placeholder(graph, f"delta_{s.name}_prev{j}" if j else f"delta_{s.name}", s.output.meta["val"])
            for j in range(order + 1)
        ]
        for s in streams
    ]
    example = streams[0].output.meta["val"]
    weights = _placeholder(graph, FORECAST_WEIGHTS, example.new_empty((order + 1,), dtype=weights_dtype(example.dtype)))
    forecasts = []
    for stream_slots in slots:
        dtype = stream_slots[0].meta["val"].dtype
        low_precision = dtype in LOW_PRECISION  # weights like (3, -3, 1) cancel: sum in float32
        total = None
        for j, delta in enumerate(stream_slots):
            if low_precision:
                delta = _call(graph, aten._to_copy.default, delta, dtype=torch.float32)
            term = _call(graph, aten.mul.Tensor, delta, _call(graph, aten.select.int, weights, 0, j))
            total = term if total is None else _call(graph, aten.add.Tensor, total, term)
        if low_precision:
            total = _call(graph, aten._to_copy.default, total, dtype=dtype)
        forecasts.append(total)
    return forecasts


def _check_skip_is_free_of_region(skip: fx.GraphModule, plan: CachePlan) -> None:
    region_names = {b.name for b in plan.region_blocks}
    for node in skip.graph.nodes:
        if node.op != "call_function" or node.meta.get("adacache_hoisted"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        for path, _ in stack.values():
            if path.split("@")[0] in region_names:
                raise PassError(
                    f"split_programs: skip program still holds node {node.name} ({node.target}) of block "
                    f"{path}; the cached region must not run on a skip step"
                )
