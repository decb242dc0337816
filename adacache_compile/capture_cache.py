"""The captures of one model: one :class:`CompiledEntry` (capture, plan, programs on a backend) per input signature.

A call is served by the newest capture whose signature takes it (structure, non-tensor arguments, ranks, static
dims, dtypes, devices, dynamic dims inside their captured ranges); a call none can serve is captured anew, up to
:data:`MAX_CAPTURES` kept. The runtime reads a capture source through five methods — ``lookup``, ``latest``,
``accept`` (a new config), ``bypass_reason`` and ``run_uncached`` — which :class:`CaptureCache` implements for a torch model and
:class:`~adacache_compile.export.runtime.ExportedCapture` for one exported, fixed capture.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from .capture import Captured, capture, normalize_call
from .config import AdaCacheConfig
from .errors import AdaCacheError, InputMismatchError
from .passes import run_passes
from .plan import CachePlan, Programs

__all__ = ["CompiledEntry", "CaptureCache", "programs_serve", "MAX_CAPTURES", "BACKENDS"]

logger = logging.getLogger(__name__)

MAX_CAPTURES = 8
BACKENDS = ("eager", "inductor")


@dataclass
class CompiledEntry:
    """One capture: its plan, its programs and the callables that run them on the chosen backend."""

    captured: Captured
    plan: CachePlan
    run_full: Any
    run_skip: Any

    @property
    def programs(self) -> Programs:
        return self.plan.programs


class CaptureCache:
    """Captures of ``model`` for the call signatures it has seen, with programs built for ``backend``."""

    def __init__(self, model: torch.nn.Module, *, backend: str, cuda_graphs: bool, dynamic: bool):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        self.model = model
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        self.dynamic = dynamic
        self.entries: list[CompiledEntry] = []
        self._lock = threading.RLock()
        self._uncached_warned: set[str] = set()

    def latest(self) -> CompiledEntry:
        if not self.entries:
            raise RuntimeError(
                "nothing captured yet: call the module once (capture is lazy) or pass example_inputs to optimize()"
            )
        return self.entries[-1]

    def capture(self, args: tuple, kwargs: dict, config: AdaCacheConfig) -> CompiledEntry:
        """Capture the model for this call's input signature and build its programs."""
        with self._lock:
            captured = capture(self.model, args, kwargs, dynamic=self.dynamic)
            plan = CachePlan(
                model=self.model,
                config=config,
                input_names=captured.input_names,
                example_inputs=captured.flatten(args, kwargs),
                call_constants=_call_constants(captured, args, kwargs),
            )
            run_passes(captured.graph_module, plan)
            entry = CompiledEntry(captured, plan, *self.runners(plan.programs))
            self.entries.append(entry)
            if len(self.entries) > MAX_CAPTURES:
                self.entries.pop(0)
            logger.info("adacache plan for %s:\n%s", type(self.model).__name__, plan.describe())
            return entry

    def runners(self, programs: Programs) -> tuple[Any, Any]:
        """The callables that run the full and the skip program on this cache's backend."""
        full, skip = programs.full, programs.skip
        if self.backend == "inductor":
            full = torch.compile(full, dynamic=False, fullgraph=True)
            skip = torch.compile(skip, dynamic=False, fullgraph=True)
        if self.cuda_graphs:
            from .cuda_graphs import CUDAGraphProgram

            pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None
            full, skip = CUDAGraphProgram(full, "full", pool), CUDAGraphProgram(skip, "skip", pool)
        return full, skip

    def lookup(self, args: tuple, kwargs: dict, config: AdaCacheConfig) -> tuple[CompiledEntry, list[torch.Tensor]]:
        """The capture that serves this call and the call's flat tensor inputs; captures anew when none does."""
        mismatches: list[InputMismatchError] = []
        for entry in reversed(self.entries):
            try:
                return entry, entry.captured.flatten(args, kwargs)
            except InputMismatchError as e:
                mismatches.append(e)
        if mismatches:
            logger.info("re-capturing: no capture serves this call (%s)", mismatches[0])
        try:
            entry = self.capture(args, kwargs, config)
        except AdaCacheError as e:
            if not mismatches:
                raise
            # A legitimately new signature captures; one the model cannot take is a bad call, reported against
            # what the existing captures accept rather than as a torch.export failure deep inside the model.
            closest = next((m for m in mismatches if hasattr(m, "input_name")), mismatches[0])
            raise InputMismatchError(
                f"{closest}; capturing these inputs as a new signature failed too: {str(e).splitlines()[0]}"
            ) from e
        return entry, entry.captured.flatten(args, kwargs)

    def accept(self, config: AdaCacheConfig) -> None:
        """Prepare for ``config``: captures whose programs compute something else are dropped (re-captured on the
        next call)."""
        if not programs_serve(self.entries, config):
            logger.info("use_config: the programs depend on the changed fields; re-capturing on the next call")
            self.clear()

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()

    def bypass_reason(self, args: tuple, kwargs: dict) -> str | None:
        """Why this call must run the original module uncached, or None.

        Caching across calls would be silently wrong in training mode (dropout and other training-mode behaviour
        differ per call) and for inputs that need gradients (the programs run under no_grad and would cut the
        autograd graph)."""
        if self.model.training:
            why = "the model is in training mode (call .eval() to cache)"
        elif torch.is_grad_enabled() and any(
            isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in pytree.tree_leaves((args, kwargs))
        ):
            why = "an input requires grad (run under torch.no_grad() or detach the inputs to cache)"
        else:
            return None
        if why not in self._uncached_warned:
            self._uncached_warned.add(why)
            logger.warning("%s: %s; running the original module uncached", type(self.model).__name__, why)
        return why

    def run_uncached(self, args: tuple, kwargs: dict):
        return self.model(*args, **kwargs)


def programs_serve(entries: list[CompiledEntry], config: AdaCacheConfig) -> bool:
    """Whether the programs of ``entries`` compute what ``config`` reads (region, tap, norm order, MoReg strides,
    forecast order); codebook, forced steps, decision metric and MoReg hyper-parameters are host-side and never need
    new programs."""
    strides = tuple(config.moreg.strides) if config.moreg is not None else ()
    return all(
        (entry.plan.config.region, entry.plan.config.tap, entry.plan.config.norm_ord)
        == (config.region, config.tap, config.norm_ord)
        and entry.programs.forecast_order == config.forecast_order
        and (not strides or entry.programs.moreg_strides == strides)
        for entry in entries
    )


def _call_constants(captured: Captured, args, kwargs) -> dict[str, Any]:
    _, bound = normalize_call(captured.model_forward_signature, args, kwargs)
    return {k: v for k, v in bound.items() if isinstance(v, (int, float, str, bool)) or v is None}
