"""Concurrent generations, each with its own schedule, batched at the transformer call.

:class:`BatchedTransformer` wraps a :class:`~adacache_compile.runtime.ProgramRuntime` (a torch
:class:`~adacache_compile.runtime.CachedTransformer` or an exported runtime from :func:`adacache_compile.load`) and
keeps the call signature of the model, so a diffusers pipeline or any sampling loop runs unchanged. Each generation
runs in its own thread inside ``with batched.request(num_steps=N, config=cfg):``; its calls go to its own sessions
(one per CFG branch, named by diffusers' ``cache_context``), and :func:`~adacache_compile.step.run_step` runs
unchanged in that thread (:mod:`.rows`). The program calls block while the engine's thread gathers the calls that
arrive together — until every generation that is between its steps has called, a short window has passed, or the
batch is full — and runs each group of same-kind calls as one full-program call over the rows that compute and one
skip-program call over the rows that skip (:mod:`.batching`). Generations join and leave between steps.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..capture import call_signature
from ..config import AdaCacheConfig
from ..errors import AdaCacheError
from ..runtime import ProgramRuntime
from ..sessions import Session, Sessions
from ..step import latent_index, next_serial, run_step
from .batching import BatchCounters, ProgramCall, group_calls, rebuild_call, run_calls
from .rows import CallLayout, RowEntry, RowPrograms

__all__ = [
    "BatchedTransformer",
    "Request",
    "check_request_config",
    "row_limit",
    "DEFAULT_MAX_ROWS",
    "DEFAULT_WINDOW_S",
    "REQUEST_HISTORY",
]

logger = logging.getLogger(__name__)

# Rows (dim 0 of the latent, summed over the calls) one program call takes at most, unless the runtime allows fewer.
DEFAULT_MAX_ROWS = 32
# How long a gathered call waits for the generations that are between their steps before its batch runs anyway.
DEFAULT_WINDOW_S = 0.01
# Finished requests whose summary ``stats["finished"]`` keeps (the newest).
REQUEST_HISTORY = 64
# Config fields that decide what the programs compute and that a request therefore cannot choose for itself. The
# forecast order is not among them: each request's forecast is combined on the host (rows.CachedForecast).
PROGRAM_FIELDS = ("region", "tap", "norm_ord")


@dataclass
class Request:
    """One generation in flight: its N, config and sessions (one per branch), and how far it is."""

    name: str
    num_steps: int
    config: AdaCacheConfig
    sessions: Sessions
    started: float = field(default_factory=time.monotonic)
    calls: int = 0
    seen: dict[str, Session] = field(default_factory=dict)  # per branch, the session its newest call went to
    finished: bool = False

    @property
    def expects_call(self) -> bool:
        """Whether the request is between its steps: it has called and not every one of its sessions is done (one
        that has not called yet, or is past its last step, does not hold the others' batches back)."""
        sessions = list(self.seen.values())
        return bool(sessions) and any(s.step < s.num_steps for s in sessions)

    @property
    def progress(self) -> dict[str, Any]:
        """Steps done (the furthest branch) of ``num_steps``, and transformer calls made."""
        step = max((s.step for s in list(self.seen.values())), default=0)
        return {"step": min(step, self.num_steps), "num_steps": self.num_steps, "calls": self.calls}

    def stats(self) -> dict[str, Any]:
        """Per branch (live and finished): computed and skipped steps, events, cache bytes."""
        stats = self.sessions.stats()
        return {"live": {k: v for k, v in stats.items() if k != "history"}, "finished": stats["history"]}

    def computed_steps(self) -> dict[str, list[int]]:
        """The computed steps of each branch's newest generation in this request."""
        stats = self.stats()
        steps = {entry["branch"]: entry["computed_steps"] for entry in stats["finished"]}
        steps.update({branch: s["computed_steps"] for branch, s in stats["live"].items()})
        return steps

    def cache_bytes(self) -> int:
        return sum(s.cache_bytes() for s in list(self.seen.values()))


class _Local(threading.local):
    def __init__(self):
        self.request: Request | None = None


class BatchedTransformer(torch.nn.Module):
    """The model's drop-in for concurrent generations: each in its own thread inside :meth:`request`, their calls
    batched per step (module docstring).

    ``runtime``: a ``CachedTransformer`` (``adacache_compile.optimize``) or an exported runtime
    (``adacache_compile.load``); its config decides what the programs compute (region, tap, norm order), the
    requests' configs everything else. ``max_rows``: rows per program call at most (an exported runtime's batch
    profile may allow fewer, see :func:`row_limit`). ``window_s``: how long a call waits for the others.
    ``union``: one decision per batch instead of one per request (a batch computes when any request computes; the
    comparator of ``benchmarks/batch_serving.py``: each request's session still follows its own schedule, the skip
    rows of a computing batch just run in full)."""

    def __init__(
        self,
        runtime: ProgramRuntime,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        window_s: float = DEFAULT_WINDOW_S,
        union: bool = False,
    ):
        super().__init__()
        if not isinstance(runtime, ProgramRuntime):
            raise TypeError(
                f"BatchedTransformer(runtime=...): expected adacache_compile.optimize(model, ...) or "
                f"adacache_compile.load(dir, backend), got {type(runtime).__name__}"
            )
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"BatchedTransformer(max_rows={max_rows!r}): expected an int >= 1")
        if not window_s >= 0:
            raise ValueError(f"BatchedTransformer(window_s={window_s!r}): expected seconds >= 0")
        self.runtime = runtime
        self.max_rows = min(max_rows, row_limit(runtime) or max_rows)
        self.window_s = float(window_s)
        self.union = union
        self._local = _Local()
        self._cond = threading.Condition()
        self._pending: list[ProgramCall] = []
        self._requests: dict[str, Request] = {}
        self._finished: collections.deque[dict] = collections.deque(maxlen=REQUEST_HISTORY)
        self._names = itertools.count(1)
        self._lookup_lock = threading.Lock()
        self._row_programs: dict[tuple[int, int], RowPrograms] = {}
        self._model_serial = next_serial()  # renewed when the model changes (rows.RowEntry.serial)
        self.counters = BatchCounters()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="adacache-batcher", daemon=True)
        self._worker.start()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.runtime, name)  # pipelines read transformer.config, .dtype, ...

    def __enter__(self) -> BatchedTransformer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BatchedTransformer({self.runtime!r}, max_rows={self.max_rows}, window_s={self.window_s})"

    # --- requests ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def request(self, num_steps: int, config: AdaCacheConfig | str | None = None, name: str | None = None):
        """One generation of ``num_steps`` steps with its own ``config`` (an :class:`AdaCacheConfig` or preset name;
        default: the runtime's), run by the calling thread: every transformer call inside is a step of it (one call
        per step, or one per branch named by ``cache_context``). Yields the :class:`Request` (progress, stats)."""
        if self._local.request is not None:
            raise AdaCacheError(
                f"request {name!r}: this thread already runs request {self._local.request.name!r}; run each "
                "generation in its own thread"
            )
        request = self._new_request(num_steps, config, name)
        self._local.request = request
        try:
            yield request
        finally:
            self._local.request = None
            request.sessions.reset()  # finished: its sessions retire to its stats and free their cached deltas
            request.finished = True
            with self._cond:
                self._requests.pop(request.name, None)
                self._finished.append(
                    {"request": request.name, "num_steps": request.num_steps, **request.stats(), "calls": request.calls}
                )
                self._cond.notify_all()  # one fewer request to wait for

    def _new_request(self, num_steps, config, name) -> Request:
        label = f"request {name!r}" if name is not None else "request"
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"{label}: num_steps={num_steps!r}; expected an int >= 1")
        if isinstance(config, str):
            config = AdaCacheConfig.preset(config)
        config = self.runtime.adacache_config if config is None else config
        if not isinstance(config, AdaCacheConfig):
            raise TypeError(f"{label}: config is a {type(config).__name__}; expected an AdaCacheConfig or preset name")
        check_request_config(config, self.runtime.adacache_config, label)
        with self._cond:
            if self._closed:
                raise AdaCacheError(f"{label}: the BatchedTransformer is closed")
            name = name if name is not None else f"request-{next(self._names)}"
            if name in self._requests:
                raise AdaCacheError(f"request {name!r}: a request of that name is in flight; give each a unique name")
            request = Request(name, num_steps, config, Sessions(config, num_steps))
            self._requests[name] = request
        return request

    def _current(self, what: str) -> Request:
        request = self._local.request
        if request is None:
            raise AdaCacheError(
                f"BatchedTransformer.{what} outside a request: which generation is this? Run each generation in its "
                "own thread inside `with batched.request(num_steps=N, config=...):`"
            )
        return request

    def cache_context(self, name: str, **kwargs):
        """diffusers' hook protocol: names the branch (``"cond"``/``"uncond"``) of this thread's request."""
        return self._current("cache_context").sessions.cache_context(name, **kwargs)

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """diffusers calls this at the end of a pipeline call: this thread's request starts its branches anew."""
        request = self._local.request
        if request is not None:
            request.sessions.reset()

    def announce_timesteps(self, timesteps) -> None:
        """A pipeline's whole schedule (see ``ProgramRuntime.announce_timesteps``), for this thread's request."""
        sessions = self._current("announce_timesteps").sessions
        sessions.announced_timesteps = [float(t) for t in timesteps]
        sessions.num_steps = len(sessions.announced_timesteps)

    # --- the call --------------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        request = self._current("forward")
        captures = self.runtime.captures
        why = captures.bypass_reason(args, kwargs)
        if why is not None:
            raise AdaCacheError(f"request {request.name!r}: cannot batch this call: {why}")
        with self._lookup_lock:
            entry, inputs = captures.lookup(args, kwargs, self.runtime.adacache_config)
        if entry.programs.context_parallel is not None:
            raise AdaCacheError(
                f"request {request.name!r}: batched serving of a context-parallel model is not supported (each "
                "request's metrics would need their own all-reduce); serve a model without enable_parallelism"
            )
        session = request.sessions.for_call(lambda: None)
        with self._cond:  # the engine's thread reads `seen` while it gathers
            request.seen[session.name] = session
            request.calls += 1
        if session.step == 0:
            with self._lookup_lock:
                if captures.refresh():  # the model changed since capture (LoRA, dtype, ...): capture anew
                    self._model_serial = next_serial()
                    entry, inputs = captures.lookup(args, kwargs, self.runtime.adacache_config)
        programs = self._programs_for(entry, request.config)
        row = RowEntry(self, entry, programs, self._layout(entry, inputs, args, kwargs), request, self._model_serial)
        with torch.no_grad():
            return entry.captured.unflatten(run_step(session, row, inputs), args, kwargs)

    def _programs_for(self, entry, config: AdaCacheConfig) -> RowPrograms:
        key = (entry.serial, config.forecast_order)
        programs = self._row_programs.get(key)
        if programs is None:
            programs = self._row_programs[key] = RowPrograms.of(entry.programs, config.forecast_order)
        return programs

    @staticmethod
    def _layout(entry, inputs: list[torch.Tensor], args, kwargs) -> CallLayout:
        leaves, signature = call_signature(entry.captured.model_forward_signature, args, kwargs)
        latent = inputs[latent_index(entry.input_names, None)]
        rows = int(latent.shape[0]) if latent.dim() else 0
        per_row = tuple(rows > 0 and t.dim() >= 1 and int(t.shape[0]) == rows for t in inputs)
        return CallLayout(rows or 1, per_row, tuple(leaves), signature)

    def _entry_for(self, row: RowEntry, inputs: list[torch.Tensor]):
        """The capture that serves the batched call (``row``'s structure with the stacked ``inputs``)."""
        args, kwargs = rebuild_call(row.layout, inputs)
        with self._lookup_lock:
            entry, _ = self.runtime.captures.lookup(args, kwargs, self.runtime.adacache_config)
        return entry

    def _submit(self, row: RowEntry, kind: str, inputs, cached) -> tuple:
        call = ProgramCall(row, kind, tuple(inputs), tuple(cached))
        with self._cond:
            if self._closed:
                raise AdaCacheError(f"request {row.request.name!r}: the BatchedTransformer was closed mid-generation")
            self._pending.append(call)
            self._cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    # --- the engine's thread ----------------------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            calls = self._gather()
            if calls is None:
                return
            self.counters.count_step(calls)
            try:
                with torch.no_grad():
                    for group in group_calls(calls, self.max_rows):
                        run_calls(self, group, self.counters, self.union)
            except Exception as e:  # noqa: BLE001 - a bug here must fail the waiting calls, not hang them
                logger.exception("batched step failed")
                for call in calls:
                    if not call.done.is_set():
                        call.finish(error=e)

    def _gather(self) -> list[ProgramCall] | None:
        """The calls of the next batched step: once a call waits, until every request between its steps has called,
        ``window_s`` has passed since the first, or ``max_rows`` rows wait. None when closed."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                for call in self._pending:
                    call.finish(error=AdaCacheError("the BatchedTransformer was closed mid-generation"))
                self._pending = []
                return None
            deadline = self._pending[0].arrived + self.window_s
            while not self._closed:
                expected = {r.name for r in self._requests.values() if r.expects_call}
                waiting = {c.row.request.name for c in self._pending}
                remaining = deadline - time.monotonic()
                if expected <= waiting or sum(c.rows for c in self._pending) >= self.max_rows or remaining <= 0:
                    break
                self._cond.wait(remaining)
            calls, self._pending = self._pending, []
            return calls

    def close(self) -> None:
        """Stop the engine's thread; calls still waiting fail with an error naming the closing."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join()

    # --- stats -----------------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """``requests``: the requests in flight (progress, per-branch stats); ``cache_bytes``: what their sessions
        hold (only the active rows); ``batches``: how the program calls were filled; ``finished``: the newest
        finished requests' stats."""
        with self._cond:
            requests = list(self._requests.values())
            finished = [dict(entry) for entry in self._finished]
        return {
            "requests": {r.name: {"progress": r.progress, **r.stats()} for r in requests},
            "cache_bytes": sum(r.cache_bytes() for r in requests),
            "batches": self.counters.as_dict(),
            "finished": finished,
        }


def check_request_config(config: AdaCacheConfig, programs_config: AdaCacheConfig, label: str) -> None:
    """Refuse a request config the shared programs cannot serve: MoReg (its motion terms need each request's frame
    layout, which the batched tap does not keep apart), or another region, tap or norm order than the programs'."""
    if config.moreg is not None:
        raise AdaCacheError(
            f"{label}: MoReg configs are not served batched: the motion regularisation reads the tap's frame layout "
            "per request, which batched serving does not compute; use a preset without '+moreg' (e.g. 'fast-50')"
        )
    for name in PROGRAM_FIELDS:
        mine, theirs = getattr(config, name), getattr(programs_config, name)
        if mine != theirs:
            raise AdaCacheError(
                f"{label}: config {name}={mine!r}, but the engine's programs were built for {name}={theirs!r}; "
                f"every request shares the programs, so leave {name} at {theirs!r} (or serve a runtime built for it)"
            )


def row_limit(runtime: ProgramRuntime) -> int | None:
    """The most rows one program call of ``runtime`` takes: the batch axis' profile maximum of an exported runtime
    (TensorRT: the engines' own optimisation profiles, which ``build_engines`` may have set below the manifest's),
    None for a torch runtime (any batch)."""
    entry = runtime.captures.latest() if getattr(runtime.captures, "entries", None) else None
    axes = getattr(getattr(entry, "captured", None), "axes", None)
    if entry is None or axes is None:
        return None
    index = latent_index(entry.input_names, None)
    axis = axes[index].get(0)
    if axis is None:  # the batch was exported static
        return int(entry.captured.input_specs[index].shape[0])
    limits = [entry.captured.profile_ranges.get(axis, {}).get("max")]
    limits += [
        _engine_batch_limit(program, entry.input_names[index]) for program in (entry.programs.full, entry.programs.skip)
    ]
    limits = [int(limit) for limit in limits if limit is not None]
    return min(limits) if limits else None


def _engine_batch_limit(program, input_name: str) -> int | None:
    """dim 0's maximum in a TensorRT engine's first optimisation profile (``TrtProgram.engine``), else None."""
    engine = getattr(program, "engine", None)
    if engine is None or not hasattr(engine, "get_tensor_profile_shape"):
        return None
    from ..export.axes import safe_name

    _, _, largest = engine.get_tensor_profile_shape(safe_name(input_name), 0)
    return int(largest[0])
