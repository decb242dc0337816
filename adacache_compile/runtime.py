"""The drop-in runtime: picks the full or the skip program per call from the AdaCache schedule.

State lives in :class:`Session` objects, never in globals. Sessions are keyed by branch: a diffusers pipeline's
``cache_context("cond"/"uncond", step_index=..., num_inference_steps=...)`` names the branch and the step; without
it, ``with cached.generation(num_steps=N):`` gives the calls inside one session; without either, steps are counted
per call and a rising timestep starts a new generation (N is then unknown unless given to ``optimize``, so the
forced last steps N-1 and N cannot be honoured: see README).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from .capture import Captured, capture
from .config import AdaCacheConfig
from .errors import AdaCacheError, InputMismatchError
from .passes import run_passes
from .plan import CachePlan, Programs
from .schedule import Schedule, StepMetrics

__all__ = ["CachedTransformer", "Session", "CompiledEntry", "optimize", "UNKNOWN_NUM_STEPS"]

logger = logging.getLogger(__name__)

# Stand-in for N when nothing tells it: forced steps N-1 and N are then never reached.
UNKNOWN_NUM_STEPS = 1_000_000
_MAX_CAPTURES = 8


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


@dataclass
class Session:
    """Per-generation, per-branch state: step counter, schedule, cached deltas and tap."""

    name: str
    num_steps: int
    schedule: Schedule
    step: int = 0
    deltas: tuple[torch.Tensor, ...] | None = None
    tap: torch.Tensor | None = None
    input_key: tuple | None = None
    last_timestep: float | None = None
    last_step_index: int | None = None
    pipeline_num_steps: int | None = None  # N the pipeline announced (cache_context), when it differs from num_steps
    force_next: bool = False
    events: list[str] = field(default_factory=list)
    nonfinite_steps: list[int] = field(default_factory=list)

    def cache_bytes(self) -> int:
        tensors = list(self.deltas or ()) + ([self.tap] if self.tap is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def clear_cache(self) -> None:
        self.deltas = None
        self.tap = None
        self.input_key = None

    def stats(self, region_fraction: float) -> dict[str, Any]:
        sched = self.schedule
        done = len(sched.computed_steps) + len(sched.skipped_steps)
        return {
            "num_steps": None if self.num_steps == UNKNOWN_NUM_STEPS else self.num_steps,
            "steps_run": done,
            "computed_steps": list(sched.computed_steps),
            "skipped_steps": list(sched.skipped_steps),
            "records": [vars(r).copy() for r in sched.records],
            "block_compute_saved": (len(sched.skipped_steps) / done * region_fraction) if done else 0.0,
            "nonfinite_steps": list(self.nonfinite_steps),
            "events": list(self.events),
            "cache_bytes": self.cache_bytes(),
            "cached_tensors": len(self.deltas or ()) + (1 if self.tap is not None else 0),
        }


class _Context(threading.local):
    def __init__(self):
        self.name: str | None = None
        self.step_index: int | None = None
        self.num_steps: int | None = None
        self.session: Session | None = None


class CachedTransformer(torch.nn.Module):
    """Drop-in for ``model``: same call signature, same outputs; blocks are skipped on the schedule's skip steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: AdaCacheConfig | None = None,
        *,
        backend: str = "eager",
        num_steps: int | None = None,
        cuda_graphs: bool = False,
        dynamic: bool = True,
    ):
        super().__init__()
        if backend not in ("eager", "inductor"):
            raise ValueError(f"backend={backend!r}: expected 'eager' or 'inductor'")
        self._orig_mod = model
        # Not ``self.config``: pipelines read the wrapped model's config (``transformer.config.patch_size``), which
        # ``__getattr__`` forwards.
        self.adacache_config = config if config is not None else AdaCacheConfig.preset("fast-30")
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        self.dynamic = dynamic
        self.num_steps = num_steps
        self._entries: list[CompiledEntry] = []
        self._sessions: dict[str, Session] = {}
        self._history: list[tuple[str, dict]] = []
        self._ctx = _Context()
        self._lock = threading.RLock()
        self._uncached_warned: set[str] = set()

    # --- drop-in behaviour -------------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)

    def __repr__(self) -> str:
        return f"CachedTransformer({type(self._orig_mod).__name__}, backend={self.backend!r})"

    @property
    def plan(self) -> CachePlan:
        return self._latest().plan

    @property
    def programs(self) -> Programs:
        return self._latest().programs

    def _latest(self) -> CompiledEntry:
        if not self._entries:
            raise RuntimeError(
                "nothing captured yet: call the module once (capture is lazy) or pass example_inputs to optimize()"
            )
        return self._entries[-1]

    # --- capture -----------------------------------------------------------------------------------------------
    def capture(self, args: tuple = (), kwargs: dict | None = None) -> CompiledEntry:
        """Capture the model for this call's input signature and build its programs (done lazily by forward)."""
        kwargs = kwargs or {}
        with self._lock:
            captured = capture(self._orig_mod, args, kwargs, dynamic=self.dynamic)
            flat = captured.flatten(args, kwargs)
            leaves_kwargs = _call_constants(captured, args, kwargs)
            plan = CachePlan(
                model=self._orig_mod,
                config=self.adacache_config,
                input_names=captured.input_names,
                example_inputs=flat,
                call_constants=leaves_kwargs,
            )
            run_passes(captured.graph_module, plan)
            entry = CompiledEntry(captured, plan, *self._backend_runners(plan.programs))
            self._entries.append(entry)
            if len(self._entries) > _MAX_CAPTURES:
                self._entries.pop(0)
            logger.info("adacache plan for %s:\n%s", type(self._orig_mod).__name__, plan.describe())
            return entry

    def use_config(self, config: AdaCacheConfig) -> None:
        """Switch the AdaCache config. Codebook, forced steps and MoReg hyper-parameters are host-side and switch
        freely; what the programs compute (region, tap, norm order, MoReg strides) must match them, or the
        captures are dropped and rebuilt on the next call."""
        old = self.adacache_config
        new_strides = tuple(config.moreg.strides) if config.moreg is not None else ()
        compatible = (old.region, old.tap, old.norm_ord) == (config.region, config.tap, config.norm_ord) and all(
            not new_strides or entry.programs.moreg_strides == new_strides for entry in self._entries
        )
        with self._lock:
            if not compatible:
                logger.info("use_config: the programs depend on the changed fields; re-capturing on the next call")
                self._entries.clear()
            self._reset_stateful_cache()
            self.adacache_config = config

    def _backend_runners(self, programs: Programs):
        full, skip = programs.full, programs.skip
        if self.backend == "inductor":
            full = torch.compile(full, dynamic=False, fullgraph=True)
            skip = torch.compile(skip, dynamic=False, fullgraph=True)
        if self.cuda_graphs:
            from .cuda_graphs import CUDAGraphProgram

            pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None
            full, skip = CUDAGraphProgram(full, "full", pool), CUDAGraphProgram(skip, "skip", pool)
        return full, skip

    def _entry_for(self, args, kwargs) -> tuple[CompiledEntry, list[torch.Tensor]]:
        mismatches: list[InputMismatchError] = []
        for entry in reversed(self._entries):
            try:
                return entry, entry.captured.flatten(args, kwargs)
            except InputMismatchError as e:
                mismatches.append(e)
        if mismatches:
            logger.info("re-capturing: no capture serves this call (%s)", mismatches[0])
        try:
            entry = self.capture(args, kwargs)
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

    # --- sessions ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """diffusers' hook protocol: names the branch (``"cond"``/``"uncond"``) and the step of the next calls."""
        ctx = self._ctx
        saved = (ctx.name, ctx.step_index, ctx.num_steps)
        ctx.name = name
        ctx.step_index = kwargs.get("step_index")
        ctx.num_steps = kwargs.get("num_inference_steps")
        try:
            yield
        finally:
            ctx.name, ctx.step_index, ctx.num_steps = saved

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """diffusers calls this at the end of a pipeline call: every branch starts clean next time."""
        with self._lock:
            for name, session in self._sessions.items():
                self._retire(name, session)
            self._sessions.clear()

    reset = _reset_stateful_cache

    @contextlib.contextmanager
    def generation(self, num_steps: int, name: str = "generation"):
        """All calls inside run as one generation of ``num_steps`` steps, one call per step (batched CFG shares it)."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"generation(num_steps={num_steps!r}): expected an int >= 1")
        session = self._new_session(name, num_steps)
        saved = self._ctx.session
        self._ctx.session = session
        try:
            yield session
        finally:
            self._ctx.session = saved
            self._retire(name, session)

    def new_session(self, num_steps: int, name: str = "session") -> Session:
        """Explicit session API: pass it to :meth:`step`."""
        return self._new_session(name, num_steps)

    def _new_session(self, name: str, num_steps: int | None) -> Session:
        n = num_steps or self.num_steps or UNKNOWN_NUM_STEPS
        return Session(name=name, num_steps=n, schedule=Schedule(self.adacache_config, n))

    def _retire(self, name: str, session: Session) -> None:
        if session.schedule.computed_steps or session.schedule.skipped_steps:
            self._history.append((name, session.stats(self._region_fraction())))
        session.clear_cache()

    def _session_for_call(self, args, kwargs) -> Session:
        ctx = self._ctx
        if ctx.session is not None:
            session = ctx.session
            if session.step >= session.num_steps:
                session.events.append(f"call {session.step + 1} > num_steps={session.num_steps}: new generation")
                logger.warning(
                    "generation %r: more calls than num_steps=%d; starting a new generation",
                    session.name,
                    session.num_steps,
                )
                self._restart(session)
            return session
        name = ctx.name or "default"
        with self._lock:
            session = self._sessions.get(name)
            if ctx.step_index is not None:
                n = ctx.num_steps or self.num_steps
                # Past N without a restart of step_index (a pipeline that calls more often than it said): a new
                # generation, as in generation(), never a step beyond the schedule.
                overrun = session is not None and session.step >= session.num_steps
                if overrun and ctx.step_index != 0:
                    session.events.append(f"call {session.step + 1} > num_steps={session.num_steps}: new generation")
                    logger.warning(
                        "branch %r: more calls than num_steps=%d (step_index=%d); starting a new generation",
                        name,
                        session.num_steps,
                        ctx.step_index,
                    )
                if (
                    overrun
                    or session is None
                    or ctx.step_index == 0
                    or (session.last_step_index is not None and ctx.step_index <= session.last_step_index)
                    or (n is not None and session.pipeline_num_steps != n)
                ):
                    if session is not None:
                        self._retire(name, session)
                    # A model that joins mid-loop (Wan 2.2's low-noise transformer_2 from the boundary step on) runs
                    # the remaining n - step_index steps: its schedule ends, with the forced last steps, where the
                    # pipeline's does.
                    remaining = n - ctx.step_index if n is not None and 0 < ctx.step_index < n else n
                    session = self._sessions[name] = self._new_session(name, remaining)
                    session.pipeline_num_steps = n
                session.last_step_index = ctx.step_index
                return session
            timestep = _timestep_of(args, kwargs)
            starts_new = (
                session is None
                or session.step >= session.num_steps
                or (timestep is not None and session.last_timestep is not None and timestep > session.last_timestep)
            )
            if starts_new:
                if session is not None:
                    self._retire(name, session)
                session = self._sessions[name] = self._new_session(name, None)
            session.last_timestep = timestep
            return session

    def _restart(self, session: Session) -> None:
        self._retire(session.name, session)
        session.schedule = Schedule(self.adacache_config, session.num_steps)
        session.step = 0
        session.force_next = False

    # --- the call ----------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if not self.adacache_config.enabled or self._runs_uncached(args, kwargs):
            return self._orig_mod(*args, **kwargs)
        entry, inputs = self._entry_for(args, kwargs)
        session = self._session_for_call(args, kwargs)
        with torch.no_grad():
            outputs = self._step(session, entry, inputs)
        return entry.captured.unflatten(outputs)

    def step(self, session: Session, *args, **kwargs):
        """Run one denoising step of an explicit session (see :meth:`new_session`)."""
        if self._runs_uncached(args, kwargs):
            return self._orig_mod(*args, **kwargs)
        entry, inputs = self._entry_for(args, kwargs)
        with torch.no_grad():
            return entry.captured.unflatten(self._step(session, entry, inputs))

    def _runs_uncached(self, args, kwargs) -> bool:
        """Training mode or inputs that need gradients: the original module runs, with a one-time warning.

        Caching across calls would be silently wrong there (dropout and other training-mode behaviour differ per
        call; the programs run under no_grad and would cut the autograd graph)."""
        if self._orig_mod.training:
            why = "the model is in training mode (call .eval() to cache)"
        elif torch.is_grad_enabled() and any(
            isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in pytree.tree_leaves((args, kwargs))
        ):
            why = "an input requires grad (run under torch.no_grad() or detach the inputs to cache)"
        else:
            return False
        if why not in self._uncached_warned:
            self._uncached_warned.add(why)
            logger.warning("%s: %s; running the original module uncached", type(self._orig_mod).__name__, why)
        return True

    def _step(self, session: Session, entry: CompiledEntry, inputs: list[torch.Tensor]):
        session.step += 1
        step = session.step
        key = (id(entry), tuple(tuple(t.shape) for t in inputs), tuple(t.device for t in inputs))
        sched = session.schedule
        if session.deltas is not None and session.input_key != key:
            session.events.append(f"step {step}: input signature changed mid-generation; computing in full")
            logger.warning("session %r step %d: input signature changed; recomputing", session.name, step)
            session.clear_cache()
        compute = session.deltas is None or session.force_next or sched.is_computed(step)
        programs = entry.programs
        n_out = programs.num_outputs
        if not compute:
            sched.mark_skipped(step)
            return entry.run_skip(*inputs, *session.deltas)
        tap_prev = session.tap
        if tap_prev is None:
            tap_shape = programs.tap_shape(*inputs)
            tap_prev = torch.zeros(tap_shape, dtype=programs.tap_dtype, device=inputs[0].device)
        results = entry.run_full(*inputs, tap_prev)
        outputs = results[:n_out]
        deltas = tuple(results[n_out:-2])
        tap, metrics = results[-2], results[-1]
        values = metrics.tolist()  # the one host read of a computed step
        finite, diff_norm, prev_norm = values[0] == 1.0, values[1], values[2]
        motion = tuple(zip(values[3::2], values[4::2]))
        session.force_next = False
        if not finite:
            nan = float("nan")
            record = sched.observe(step, StepMetrics(nan, nan, motion) if session.tap is not None else None)
            self._nonfinite(session, step, "a delta or the tap holds NaN/Inf", warn=not record.nonfinite)
            return outputs
        record = sched.observe(step, StepMetrics(diff_norm, prev_norm, motion) if session.tap is not None else None)
        if record.nonfinite:
            self._nonfinite(session, step, "the metric is NaN/Inf", warn=False)
            return outputs
        session.deltas, session.tap, session.input_key = deltas, tap, key
        if step >= session.num_steps:
            session.clear_cache()  # the generation is over; free its buffers
        return outputs

    def _nonfinite(self, session: Session, step: int, why: str, *, warn: bool) -> None:
        """Drop the cache and force the next step; ``warn=False`` where the schedule has already warned."""
        if warn and not session.nonfinite_steps:
            logger.warning(
                "session %r step %d: %s; this and the next step are computed in full", session.name, step, why
            )
        session.nonfinite_steps.append(step)
        session.events.append(f"step {step}: {why}; cache dropped")
        session.clear_cache()
        session.force_next = True

    # --- stats -------------------------------------------------------------------------------------------------
    def _region_fraction(self) -> float:
        if not self._entries:
            return 1.0
        plan = self._entries[-1].plan
        return len(plan.region_blocks) / max(1, len(plan.all_blocks))

    @property
    def stats(self) -> dict[str, Any]:
        """Per branch: the live sessions, plus finished generations under ``history``."""
        with self._lock:
            live = {name: s.stats(self._region_fraction()) for name, s in self._sessions.items()}
            return {**live, "history": [{"branch": name, **st} for name, st in self._history]}


def _call_constants(captured: Captured, args, kwargs) -> dict[str, Any]:
    from .capture import normalize_call

    _, bound = normalize_call(captured.model_forward_signature, args, kwargs)
    return {k: v for k, v in bound.items() if isinstance(v, (int, float, str, bool)) or v is None}


_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


def _timestep_of(args, kwargs) -> float | None:
    for name in _TIMESTEP_NAMES:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.numel():
            return float(value.reshape(-1)[0])  # fallback path only: a host read of one scalar per call
        if isinstance(value, (int, float)):
            return float(value)
    return None


def optimize(
    model: torch.nn.Module,
    config: AdaCacheConfig | str | None = None,
    *,
    example_inputs: dict | tuple | None = None,
    backend: str = "eager",
    num_steps: int | None = None,
    cuda_graphs: bool = False,
    dynamic: bool = True,
) -> CachedTransformer:
    """Wrap ``model`` in a :class:`CachedTransformer` (a drop-in ``nn.Module``).

    ``config``: an :class:`AdaCacheConfig`, a preset name, or None (``"fast-30"``). ``example_inputs``: kwargs dict
    or positional tuple of a real call, to capture now; otherwise capture happens on the first call, and again for
    any later call whose input signature the existing captures cannot serve.
    """
    if isinstance(config, str):
        config = AdaCacheConfig.preset(config)
    cached = CachedTransformer(
        model, config, backend=backend, num_steps=num_steps, cuda_graphs=cuda_graphs, dynamic=dynamic
    )
    if example_inputs is not None:
        if isinstance(example_inputs, dict):
            cached.capture((), example_inputs)
        else:
            cached.capture(tuple(example_inputs), {})
    return cached
