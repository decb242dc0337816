"""The passes' records: the CachePlan (what the analysis passes found and what the rewrite passes built), its blocks,
streams and MoReg layout. What the runtime reads of the built programs is their contract,
:mod:`adacache_compile.programs`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

__all__ = ["Block", "Stream", "MoRegLayout", "CachePlan", "PassResult"]


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
    programs: Any = None  # the built Programs (adacache_compile.programs)
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
