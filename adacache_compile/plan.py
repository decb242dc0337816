"""The CachePlan: what the analysis passes found and what the rewrite passes built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .forecast import weights_dtype
from .parallel import reduce_metrics

__all__ = [
    "Block",
    "Stream",
    "MoRegLayout",
    "CachePlan",
    "PassResult",
    "Programs",
    "FullResult",
    "MetricValues",
    "pack_metrics",
    "metrics_length",
    "FORECAST_WEIGHTS",
    "COMPUTE",
    "SingleProgram",
]


@dataclass
class Block:
    """One transformer block of a repeated stack: its qualified name and its node span in the captured graph."""

    name: str
    stack: str
    index: int
    module_type: str
    nodes: list[fx.Node] = field(default_factory=list, repr=False)


@dataclass
class Stream:
    """A residual stream leaving the cached region.

    ``output`` is the region node the rest of the graph consumes; ``layout`` the ops (in graph order) that carry the
    region input ``bases`` to ``output``'s layout without any residual added, so that
    ``output == replay(layout)(bases) + delta`` with ``delta`` taken on a computed step.
    """

    name: str
    output: fx.Node
    bases: list[fx.Node]
    layout: list[fx.Node]
    residual_adds: list[fx.Node]
    passthrough: dict[fx.Node, fx.Node] = field(default_factory=dict, repr=False)  # residual add -> stream operand


@dataclass(frozen=True)
class MoRegLayout:
    """How the tap's tokens map to frames.

    The tap reshapes to ``[-1, T, S, C]`` (frame-major; frames on axis 1) or ``[B, S, T, C]`` (token-major; frames on
    axis 2). ``view`` spells the reshape with ``B`` (batch), ``T`` (latent frames), ``N`` (the tap's dim 1), ``-1`` and
    ``C``; ``B`` and ``T`` are read from input ``frame_input`` at run time (dims 0 and ``frame_dim``, ``T`` divided by
    ``patch_t``) so dynamic batch/frames keep working; ``frames``/``tokens_per_frame`` are the captured values.
    """

    order: str  # "frame-major" | "token-major"
    view: tuple[str, ...]
    frames: int
    tokens_per_frame: int
    frame_input: int | None = None
    frame_dim: int | None = None
    patch_t: int = 1

    @property
    def frame_axis(self) -> int:
        return 1 if self.order == "frame-major" else 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "view": list(self.view),
            "frames": self.frames,
            "tokens_per_frame": self.tokens_per_frame,
            "frame_input": self.frame_input,
            "frame_dim": self.frame_dim,
            "patch_t": self.patch_t,
        }


@dataclass(frozen=True)
class MetricValues:
    """The host's reading of the full program's ``metrics`` vector (one device-to-host copy per computed step).

    The vector is ``[finite (1/0), ||r_prev - r||_p, ||r_prev||_p, ||r||_p, (motion num, den) per MoReg stride]``
    (``r`` the tap, ``r_prev`` the program's ``tap_prev`` input); it is built by :func:`pack_metrics` inside the full
    program and read back by :meth:`from_vector`, the two ends of one layout."""

    finite: bool
    diff_norm: float
    prev_norm: float
    tap_norm: float
    motion: tuple[tuple[float, float], ...]  # (numerator, denominator) per MoReg stride, in stride order

    @classmethod
    def from_vector(cls, metrics: torch.Tensor) -> MetricValues:
        values = metrics.tolist()
        return cls(values[0] == 1.0, values[1], values[2], values[3], tuple(zip(values[4::2], values[5::2])))


def pack_metrics(
    finite: torch.Tensor,
    diff_norm: torch.Tensor,
    prev_norm: torch.Tensor,
    tap_norm: torch.Tensor,
    motion: list[tuple[torch.Tensor, ...]],
) -> torch.Tensor:
    """The inverse of :meth:`MetricValues.from_vector`, traced into the full program."""
    return torch.stack([finite.float(), diff_norm, prev_norm, tap_norm, *(part for pair in motion for part in pair)])


def metrics_length(num_moreg_strides: int) -> int:
    """The length of the ``metrics`` vector :func:`pack_metrics` builds for that many MoReg strides."""
    return 4 + 2 * num_moreg_strides


@dataclass(frozen=True)
class FullResult:
    """One call of the full program, decoded: ``full(*inputs, tap_prev) -> (*outputs, *deltas, tap, metrics)``."""

    outputs: tuple[torch.Tensor, ...]
    deltas: tuple[torch.Tensor, ...]
    tap: torch.Tensor
    metrics: torch.Tensor
    context_parallel: Any = None  # a ContextParallel: the metrics are this rank's and are summed over its group
    norm_ord: int = 1

    def metric_values(self) -> MetricValues:
        """The host's reading; on a context-parallel model the global values, summed over the CP group first (one
        all-reduce, :func:`~adacache_compile.parallel.reduce_metrics`), so every rank reads the same."""
        return MetricValues.from_vector(reduce_metrics(self.metrics, self.context_parallel, self.norm_ord))


@dataclass
class Programs:
    """The two static programs. ``full(*inputs, tap_prev) -> (*outputs, *deltas, tap, metrics)`` (decode it with
    :meth:`decode_full`); ``skip(*inputs, *cached) -> outputs`` with ``cached`` from :meth:`skip_cached_inputs`: one
    delta per stream (``forecast_order`` 0), or per stream the deltas of the last ``forecast_order + 1`` computed
    steps followed by one ``forecast_weights`` vector (the skip program adds ``sum_j w_j * D_j``).

    ``cond`` (built by the ``insert_cond`` pass when asked for, else None) is the one conditional program
    ``cond(*inputs, compute, *cached, tap_prev) -> (*outputs, *deltas, tap, metrics)``: ``torch.cond`` of the two
    (:class:`SingleProgram` serves the two programs' calls with it). ``delta_shapes[i](*inputs)`` is the shape of
    delta ``i`` for a call, ``delta_dtypes[i]`` its dtype: what :meth:`zero_cached` needs for a step with nothing
    cached."""

    full: fx.GraphModule
    skip: fx.GraphModule
    tap_shape: fx.GraphModule
    tap_dtype: torch.dtype
    moreg_strides: tuple[int, ...]  # strides whose motion norms the full program emits (empty: none)
    num_outputs: int
    delta_names: list[str]
    forecast_order: int = 0
    context_parallel: Any = None  # the model's ContextParallel (adacache_compile.parallel), or None
    norm_ord: int = 1
    delta_shapes: list[Any] = field(default_factory=list)
    delta_dtypes: list[torch.dtype] = field(default_factory=list)
    cond: Any = None

    def decode_full(self, results) -> FullResult:
        """Split the full program's flat output tuple into outputs, deltas, tap and metrics."""
        results = tuple(results)
        n_out, n_deltas = self.num_outputs, len(self.delta_names)
        if len(results) != n_out + n_deltas + 2:
            raise ValueError(
                f"full program returned {len(results)} values; expected {n_out} outputs + {n_deltas} deltas + tap + "
                "metrics"
            )
        return FullResult(
            results[:n_out],
            results[n_out : n_out + n_deltas],
            results[-2],
            results[-1],
            self.context_parallel,
            self.norm_ord,
        )

    def zero_tap(self, inputs) -> torch.Tensor:
        """A zero ``tap_prev`` of the tap's shape for this call (the first computed step has no previous tap)."""
        return torch.zeros(self.tap_shape(*inputs), dtype=self.tap_dtype, device=inputs[0].device)

    @property
    def skip_cached_names(self) -> list[str]:
        """Names of the skip program's inputs after the model's: per stream its delta slots, then the weights."""
        if self.forecast_order == 0:
            return list(self.delta_names)
        slots = [f"{name}_prev{j}" if j else name for name in self.delta_names for j in range(self.forecast_order + 1)]
        return [*slots, FORECAST_WEIGHTS]

    def skip_cached_inputs(self, history, weights=None) -> list[torch.Tensor]:
        """The skip program's inputs after the model's. ``history``: the computed steps' delta tuples, newest first
        (at least one); ``weights``: ``forecast_order + 1`` floats (slots past ``len(history)`` must weigh 0: they are
        filled with the newest deltas so the program's inputs keep their shapes)."""
        if self.forecast_order == 0:
            return list(history[0])
        slots = self.forecast_order + 1
        if weights is None or len(weights) != slots:
            raise ValueError(f"skip program of forecast order {self.forecast_order}: expected {slots} weights")
        rows = [history[j] if j < len(history) else history[0] for j in range(slots)]
        cached = [rows[j][s] for s in range(len(self.delta_names)) for j in range(slots)]
        newest = history[0][0]
        return [*cached, torch.tensor(list(weights), dtype=weights_dtype(newest.dtype), device=newest.device)]

    def zero_cached(self, inputs) -> list[torch.Tensor]:
        """Zero cached inputs of the right shapes for this call: what the conditional program reads (and ignores) on
        a computed step with nothing cached yet."""
        device = inputs[0].device
        zeros = tuple(
            torch.zeros(shape(*inputs), dtype=dtype, device=device)
            for shape, dtype in zip(self.delta_shapes, self.delta_dtypes)
        )
        weights = [0.0] * (self.forecast_order + 1) if self.forecast_order else None
        return self.skip_cached_inputs([zeros], weights)


FORECAST_WEIGHTS = "forecast_weights"
COMPUTE = "compute"


class SingleProgram:
    """The full and the skip program's calls, served by the one conditional program ``programs.cond`` (run by
    ``run_cond``: the fx GraphModule, its inductor compilation or an exported ``cached.onnx``).

    :func:`~adacache_compile.sessions.run_step` calls :meth:`full` and :meth:`skip` as it calls the two programs, so
    the schedule and sessions are the same; the step's choice goes in as the host-made bool tensor ``compute``. The
    inputs the chosen branch does not read get stand-ins of the right shapes: zero cached deltas on a computed step,
    a zero ``tap_prev`` on a skipped one (allocated once per input signature)."""

    def __init__(self, programs: Programs, run_cond):
        self.programs = programs
        self.run_cond = run_cond
        self._stand_ins: tuple[tuple, tuple[list[torch.Tensor], torch.Tensor]] | None = None
        self._flags = {flag: torch.tensor(flag) for flag in (True, False)}

    def _unused_inputs(self, inputs) -> tuple[list[torch.Tensor], torch.Tensor]:
        key = tuple((tuple(t.shape), t.device) for t in inputs)
        if self._stand_ins is None or self._stand_ins[0] != key:
            self._stand_ins = (key, (self.programs.zero_cached(inputs), self.programs.zero_tap(inputs)))
        return self._stand_ins[1]

    def full(self, *args: torch.Tensor):
        """``full(*inputs, tap_prev) -> (*outputs, *deltas, tap, metrics)``."""
        inputs, tap_prev = args[:-1], args[-1]
        cached, _ = self._unused_inputs(inputs)
        return self.run_cond(*inputs, self._flags[True], *cached, tap_prev)

    def skip(self, *args: torch.Tensor):
        """``skip(*inputs, *cached) -> outputs``."""
        split = len(args) - len(self.programs.skip_cached_names)
        inputs, cached = args[:split], args[split:]
        _, tap_prev = self._unused_inputs(inputs)
        return tuple(self.run_cond(*inputs, self._flags[False], *cached, tap_prev))[: self.programs.num_outputs]


@dataclass
class CachePlan:
    """Filled in by the analysis passes, consumed by the rewrite passes and the runtime."""

    model: torch.nn.Module | None
    config: Any  # AdaCacheConfig
    input_names: list[str] = field(default_factory=list)
    example_inputs: list[torch.Tensor] = field(default_factory=list, repr=False)
    all_blocks: list[Block] = field(default_factory=list)
    region_blocks: list[Block] = field(default_factory=list)
    region_nodes: set[fx.Node] = field(default_factory=set, repr=False)
    call_constants: dict[str, Any] = field(default_factory=dict)
    context_parallel: Any = None  # the model's ContextParallel (adacache_compile.parallel), or None
    leaks: list[fx.Node] = field(default_factory=list, repr=False)
    hoisted: list[str] = field(default_factory=list)
    streams: list[Stream] = field(default_factory=list)
    tap_node: fx.Node | None = None
    tap_block: str | None = None
    moreg_layout: MoRegLayout | None = None
    moreg_layout_error: str | None = None
    programs: Programs | None = None
    single_program: bool = False  # build programs.cond too (the insert_cond pass)

    @property
    def blocks(self) -> list[str]:
        """Qualified names of every block of every repeated stack, in execution order."""
        return [b.name for b in self.all_blocks]

    @property
    def region(self) -> list[str]:
        """Qualified names of the cached blocks."""
        return [b.name for b in self.region_blocks]

    @property
    def tap(self) -> str | None:
        """Where the metric is read: ``<block>:<node>``."""
        if self.tap_node is None:
            return None
        return f"{self.tap_block}:{self.tap_node.name}"

    def describe(self) -> str:
        stacks: dict[str, list[Block]] = {}
        for b in self.all_blocks:
            stacks.setdefault(b.stack, []).append(b)
        lines = [f"blocks: {len(self.all_blocks)} in {len(stacks)} stack(s)"]
        if self.context_parallel is not None:
            lines.append(f"{self.context_parallel.describe()}: metrics summed over the group on computed steps")
        for stack, blocks in stacks.items():
            lines.append(f"  {stack}: {len(blocks)} x {blocks[0].module_type}")
        lines.append(f"cached region: {self.region[0]} .. {self.region[-1]} ({len(self.region)} blocks)")
        for s in self.streams:
            lines.append(
                f"  stream {s.name}: {len(s.residual_adds)} residual adds, layout ops "
                f"[{', '.join(_op_name(n) for n in s.layout) or 'none'}]"
            )
        lines.append(f"metric tap: {self.tap} shape {_shape(self.tap_node)}")
        if self.moreg_layout is not None:
            lines.append(f"MoReg layout: {self.moreg_layout.to_dict()}")
        else:
            lines.append(f"MoReg layout: unknown ({self.moreg_layout_error})")
        if self.hoisted:
            lines.append(f"hoisted out of the region: {', '.join(self.hoisted)}")
        if self.programs is not None:
            full_ops = _count_ops(self.programs.full)
            skip_ops = _count_ops(self.programs.skip)
            lines.append(f"full program: {full_ops} ops; skip program: {skip_ops} ops (keeps only what lies outside)")
            order = self.programs.forecast_order
            deltas = len(self.programs.delta_names)
            if order:
                lines.append(
                    f"skip steps forecast each delta (order {order}) from the last {order + 1} computed steps; cached "
                    f"tensors per generation: {deltas} x {order + 1} deltas + taps"
                )
            else:
                lines.append(f"cached tensors per generation: {deltas} deltas + 1 tap")
            if self.programs.cond is not None:
                lines.append("single program: torch.cond(compute, full, skip) runs every step (insert_cond)")
        return "\n".join(lines)


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _shape(node: fx.Node | None):
    if node is None:
        return None
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _count_ops(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")
