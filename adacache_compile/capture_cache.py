"""The captures of one model: one :class:`CompiledEntry` (capture, plan, programs on a backend) per input signature.

A call is served by the newest capture whose signature takes it (structure, non-tensor arguments, ranks, static
dims, dtypes, devices, dynamic dims inside their captured ranges); a call none can serve is captured anew, up to
:data:`MAX_CAPTURES` kept. The runtime reads a capture source through five methods — ``lookup``, ``latest``,
``accept`` (a new config), ``refresh`` (drop captures of a changed model), ``bypass_reason`` and ``run_uncached`` —
which :class:`CaptureCache` implements for a torch model and
:class:`~adacache_compile.export.runtime.ExportedCapture` for one exported, fixed capture.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from .capture import Captured, capture, normalize_call
from .config import AdaCacheConfig
from .errors import AdaCacheError, InputMismatchError
from .parallel import context_parallel_of
from .passes import run_passes
from .plan import CachePlan
from .programs import Programs, SingleProgram
from .step import next_serial

__all__ = ["CompiledEntry", "CaptureCache", "model_state", "programs_serve", "MAX_CAPTURES", "BACKENDS"]

logger = logging.getLogger(__name__)

MAX_CAPTURES = 8
BACKENDS = ("eager", "inductor")


@dataclass
class CompiledEntry:
    """One capture: its plan, its programs and the callables that run them on the chosen backend (the step's
    contract, :class:`~adacache_compile.step.StepPrograms`)."""

    captured: Captured
    plan: CachePlan
    run_full: Any
    run_skip: Any
    serial: int = field(default_factory=next_serial)

    @property
    def programs(self) -> Programs:
        return self.plan.programs

    @property
    def config(self) -> AdaCacheConfig:
        """The config the programs were built for."""
        return self.plan.config

    @property
    def region_fraction(self) -> float:
        return len(self.plan.region_blocks) / max(1, len(self.plan.all_blocks))

    @property
    def input_names(self) -> list[str]:
        return self.captured.input_names


class CaptureCache:
    """Captures of ``model`` for the call signatures it has seen, with programs built for ``backend``; with
    ``single_program`` every step runs the one conditional program (``Programs.cond``) instead of the two."""

    def __init__(
        self, model: torch.nn.Module, *, backend: str, cuda_graphs: bool, dynamic: bool, single_program: bool = False
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        if single_program and cuda_graphs:
            raise ValueError(
                "single_program=True with cuda_graphs=True: the conditional program reads `compute` on the host "
                "inside the program, which a CUDA graph cannot capture; use the two programs for CUDA graphs "
                "(single_program=False)"
            )
        self.model = model
        self.single_program = single_program
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        self.dynamic = dynamic
        self.entries: list[CompiledEntry] = []
        # Captures whose programs another config needs (another forecast order, region, ...), kept with the model state
        # they were made in, so that switching back (use_config) needs no new capture.
        self._kept: list[tuple[tuple, list[CompiledEntry]]] = []
        self.captures_made = 0  # how many captures this cache has run (a new one per signature or model change)
        self._model_state: tuple | None = None  # model_state(model) when the entries were captured
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
            state = model_state(self.model)
            if self.entries and state != self._model_state:
                self._drop_stale(state)
            captured = capture(self.model, args, kwargs, dynamic=self.dynamic)
            plan = CachePlan(
                model=self.model,
                config=config,
                input_names=captured.input_names,
                example_inputs=captured.flatten(args, kwargs),
                call_constants=_call_constants(captured, args, kwargs),
                context_parallel=context_parallel_of(self.model),
                single_program=self.single_program,
            )
            run_passes(captured.graph_module, plan)
            entry = CompiledEntry(captured, plan, *self.runners(plan.programs))
            self.entries.append(entry)
            self.captures_made += 1
            self._model_state = state
            if len(self.entries) > MAX_CAPTURES:
                self.entries.pop(0)
            self._trim_kept()
            logger.info("adacache plan for %s:\n%s", type(self.model).__name__, plan.describe())
            return entry

    def runners(self, programs: Programs) -> tuple[Any, Any]:
        """The callables that run the full and the skip program on this cache's backend (with ``single_program``,
        both are calls of the one conditional program)."""

        def compiled(program):
            return torch.compile(program, dynamic=False, fullgraph=True) if self.backend == "inductor" else program

        if programs.cond is not None:
            single = SingleProgram(programs, compiled(programs.cond))
            return single.full, single.skip
        full, skip = compiled(programs.full), compiled(programs.skip)
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
        """Prepare for ``config``: captures whose programs compute something else are set aside, and the ones kept
        from an earlier config whose programs serve this one come back, if the model is unchanged since they were
        made; otherwise the next call captures anew."""
        if self.entries and programs_serve(self.entries, config):
            return
        with self._lock:
            state = model_state(self.model)
            found = next(
                (
                    i
                    for i, (made_in, entries) in enumerate(self._kept)
                    if made_in == state and programs_serve(entries, config)
                ),
                None,
            )
            if self.entries:
                self._kept.append((self._model_state, self.entries))
            if found is None:
                self.entries = []
                logger.info("use_config: the programs depend on the changed fields; re-capturing on the next call")
            else:
                _, self.entries = self._kept.pop(found)
                self._model_state = state
                logger.info("use_config: serving the config from %d kept capture(s)", len(self.entries))
            self._trim_kept()

    def _trim_kept(self) -> None:
        """At most :data:`MAX_CAPTURES` captures in all: the oldest kept ones go first."""
        while self._kept and len(self.entries) + sum(len(e) for _, e in self._kept) > MAX_CAPTURES:
            self._kept.pop(0)

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self._kept.clear()

    def refresh(self) -> bool:
        """Drop the captures when the model changed since they were made (a LoRA added, fused or re-weighted, a
        submodule or parameter replaced, a dtype or device move); True when it did. The runtime calls it once per
        generation: in-place updates of parameter values need no new capture (the programs share the parameters)."""
        with self._lock:
            if not self.entries:
                return False
            state = model_state(self.model)
            if state == self._model_state:
                return False
            self._drop_stale(state)
            return True

    def _drop_stale(self, state: tuple) -> None:
        logger.info(
            "%s changed since it was captured (%s); re-capturing",
            type(self.model).__name__,
            describe_change(self._model_state, state),
        )
        self.clear()

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


def model_state(model: torch.nn.Module) -> tuple:
    """What the captured programs depend on besides parameter values: the module tree (names, identities, types),
    every parameter's and buffer's identity, dtype, device and shape, the state of peft's LoRA layers (active,
    disabled and merged adapters, scaling: values the capture bakes into the graph) and each attention module's
    processor (diffusers' ``set_attn_processor`` swaps the code the capture traced)."""
    modules = tuple(
        (name, id(m), type(m).__qualname__, _adapter_state(m), _processor_state(m)) for name, m in model.named_modules()
    )
    tensors = tuple(
        (name, id(t), t.dtype, t.device, tuple(t.shape))
        for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    )
    return modules, tensors


def _processor_state(module: torch.nn.Module) -> object | None:
    """The attention processor itself (diffusers' ``Attention.processor``): compared by identity, and held, so that
    a processor freed after a swap cannot hand its id to the next one."""
    return getattr(module, "processor", None)


def _adapter_state(module: torch.nn.Module) -> tuple | None:
    if not hasattr(module, "merged_adapters"):  # a peft tuner layer (BaseTunerLayer) has these
        return None
    scaling = getattr(module, "scaling", {})
    return (
        tuple(module.active_adapters),
        bool(module.disable_adapters),
        tuple(module.merged_adapters),
        tuple(sorted(scaling.items())) if isinstance(scaling, dict) else scaling,
    )


def describe_change(old: tuple | None, new: tuple) -> str:
    """The first difference between two :func:`model_state` values, for the log."""
    if old is None:
        return "no earlier state"
    (old_modules, old_tensors), (new_modules, new_tensors) = old, new
    for kind, before, after in (("module", old_modules, new_modules), ("tensor", old_tensors, new_tensors)):
        before_by_name, after_by_name = {e[0]: e for e in before}, {e[0]: e for e in after}
        for name in [*after_by_name, *(n for n in before_by_name if n not in after_by_name)]:
            if before_by_name.get(name) != after_by_name.get(name):
                if name not in before_by_name:
                    return f"{kind} {name!r} added"
                if name not in after_by_name:
                    return f"{kind} {name!r} removed"
                return f"{kind} {name!r} replaced or reconfigured"
    return "module order changed"


def programs_serve(entries: list[CompiledEntry], config: AdaCacheConfig) -> bool:
    """Whether the programs of ``entries`` compute what ``config`` reads (region, tap, norm order, MoReg strides,
    forecast order); codebook, forced steps, decision metric and MoReg hyper-parameters are host-side and never need
    new programs."""
    strides = tuple(config.moreg.strides) if config.moreg is not None else ()
    return all(
        (entry.config.region, entry.config.tap, entry.config.norm_ord) == (config.region, config.tap, config.norm_ord)
        and entry.programs.forecast_order == config.forecast_order
        and (not strides or entry.programs.moreg_strides == strides)
        for entry in entries
    )


def _call_constants(captured: Captured, args, kwargs) -> dict[str, Any]:
    _, bound = normalize_call(captured.model_forward_signature, args, kwargs)
    return {k: v for k, v in bound.items() if isinstance(v, (int, float, str, bool)) or v is None}
