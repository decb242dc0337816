"""Sessions: the per-generation, per-branch state of the schedule, which call belongs to which, and the step itself.

A :class:`Session` holds one generation's :class:`~adacache_compile.schedule.Schedule`, its step counter and the
cached deltas and tap. :class:`Sessions` routes each call to one, in this order of precedence:

1. inside ``with generation(num_steps=N):`` every call is the next step of that generation;
2. inside diffusers' ``cache_context("cond"/"uncond", step_index=..., num_inference_steps=...)`` the branch name keys
   the session and ``step_index`` restarting (or N changing) starts a new generation;
3. otherwise steps are counted per call, and a rising timestep starts a new generation; N is then the one given to
   ``optimize(num_steps=...)`` or unknown (:data:`UNKNOWN_NUM_STEPS`: the forced last steps N-1 and N are never
   reached, and a MoReg window given as fractions of N cannot be placed, so MoReg is off, with a warning).

:func:`~adacache_compile.step.run_step` runs one step of a session.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import AdaCacheConfig
from .errors import AdaCacheError
from .schedule import StepSchedule, make_schedule

__all__ = ["Session", "Sessions", "StepSample", "UNKNOWN_NUM_STEPS", "HISTORY_LIMIT"]

logger = logging.getLogger(__name__)

# Stand-in for N when nothing tells it: forced steps N-1 and N are then never reached.
UNKNOWN_NUM_STEPS = 1_000_000
# Finished generations kept in ``stats["history"]`` (the newest): a server's state stays bounded.
HISTORY_LIMIT = 64


@dataclass
class StepSample:
    """What a recording (:meth:`Sessions.start_recording`) keeps of one computed step: the relative change of the
    latent input since the previous step and a fixed strided sample of the fused deltas (every stream, concatenated;
    float32 on the CPU), from which a calibration simulates any policy and forecast order."""

    step: int
    input_change: float | None
    deltas: torch.Tensor


@dataclass
class Session:
    """Per-generation, per-branch state: step counter, schedule, and what the last computed steps left behind — their
    fused deltas (one computed step's with ``forecast_order`` 0, the last ``order + 1`` otherwise) and their taps (the
    metric's ``r_prev``; the last ``order + 1`` with the forecast decision metric)."""

    name: str
    num_steps: int
    schedule: StepSchedule
    step: int = 0
    delta_history: list[tuple[int, tuple[torch.Tensor, ...]]] = field(
        default_factory=list
    )  # (step, deltas), newest 1st
    tap_history: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, tap), newest first
    input_key: tuple | None = None
    previous_input: torch.Tensor | None = None  # the latent input of the last step (policies that read it)
    last_timestep: float | None = None
    last_step_index: int | None = None
    pipeline_num_steps: int | None = None  # N the pipeline announced (cache_context), when it differs from num_steps
    force_next: bool = False
    region_fraction: float = 1.0  # share of the blocks the capture's region holds (for block_compute_saved)
    events: list[str] = field(default_factory=list)
    nonfinite_steps: list[int] = field(default_factory=list)
    recording: list[StepSample] | None = None  # the computed steps' samples, while the module records
    recording_samples: int = 0  # elements sampled per delta (StepSample.deltas)

    @property
    def deltas(self) -> tuple[torch.Tensor, ...] | None:
        """The newest computed step's fused deltas, or None when nothing is cached."""
        return self.delta_history[0][1] if self.delta_history else None

    @property
    def tap_value(self) -> torch.Tensor | None:
        """The newest computed step's tap, or None."""
        return self.tap_history[0][1] if self.tap_history else None

    def _cached_tensors(self) -> list[torch.Tensor]:
        tensors = [t for _, deltas in self.delta_history for t in deltas] + [t for _, t in self.tap_history]
        return tensors if self.previous_input is None else [*tensors, self.previous_input]

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._cached_tensors())

    def clear_cache(self) -> None:
        self.delta_history = []
        self.tap_history = []
        self.input_key = None
        self.previous_input = None

    def stats(self) -> dict[str, Any]:
        sched = self.schedule
        done = len(sched.computed_steps) + len(sched.skipped_steps)
        return {
            "num_steps": None if self.num_steps == UNKNOWN_NUM_STEPS else self.num_steps,
            "steps_run": done,
            "computed_steps": list(sched.computed_steps),
            "skipped_steps": list(sched.skipped_steps),
            "records": [vars(r).copy() for r in sched.records],
            "block_compute_saved": (len(sched.skipped_steps) / done * self.region_fraction) if done else 0.0,
            "nonfinite_steps": list(self.nonfinite_steps),
            "events": list(self.events),
            "cache_bytes": self.cache_bytes(),
            "cached_tensors": len(self._cached_tensors()),
        }


class _Context(threading.local):
    def __init__(self):
        self.name: str | None = None
        self.step_index: int | None = None
        self.num_steps: int | None = None
        self.session: Session | None = None


class Sessions:
    """The live sessions of one cached module, the routing of calls to them and the finished generations' stats.

    ``config`` and ``num_steps`` (N when no pipeline or ``generation()`` tells it) are read when a session starts, so
    the owner may change them between generations."""

    def __init__(self, config: AdaCacheConfig, num_steps: int | None = None, history_limit: int = HISTORY_LIMIT):
        self.config = config
        self.num_steps = num_steps
        self._live: dict[str, Session] = {}
        self._history: collections.deque[dict] = collections.deque(maxlen=history_limit)
        self.generations_finished = 0  # every finished session ever, also those history no longer holds
        self.announced_timesteps: list[float] | None = None  # the pipeline's whole schedule (apply(), see tail_steps)
        self._unnamed: tuple[float | None, int] | None = None  # (timestep, calls at it) of the last context-less call
        self.recording_samples: int | None = None  # elements sampled per delta while recording (None: not recording)
        self.recordings: list[tuple[int, str, list[StepSample]]] = []  # (generation, branch, samples) finished
        self._ctx = _Context()
        self._generations: dict[int, Session] = {}  # the sessions of the generation() blocks running, by id
        self._lock = threading.RLock()
        self._warned_moreg_without_n = False

    # --- how calls name their session ---------------------------------------------------------------------------
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

    @contextlib.contextmanager
    def generation(self, num_steps: int, name: str = "generation"):
        """All calls inside run as one generation of ``num_steps`` steps, one call per step (batched CFG shares it)."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"generation(num_steps={num_steps!r}): expected an int >= 1")
        session = self.new_session(num_steps, name)
        saved = self._ctx.session
        self._ctx.session = session
        with self._lock:
            self._generations[id(session)] = session
        try:
            yield session
        finally:
            self._ctx.session = saved
            with self._lock:
                self._generations.pop(id(session), None)
            self._retire(session)

    def new_session(self, num_steps: int | None, name: str = "session") -> Session:
        n = num_steps or self.num_steps
        session = Session(name=name, num_steps=n or UNKNOWN_NUM_STEPS, schedule=self._schedule(n, name))
        self._arm_recording(session)
        return session

    def _arm_recording(self, session: Session) -> None:
        session.recording = [] if self.recording_samples else None
        session.recording_samples = self.recording_samples or 0

    def start_recording(self, samples: int) -> None:
        """Sessions started from now on keep a :class:`StepSample` per computed step (``samples`` elements of
        each fused delta); finished ones go to :attr:`recordings`, read by :meth:`take_recordings`."""
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"start_recording(samples={samples!r}): expected an int >= 1")
        with self._lock:
            self.recording_samples = samples

    def take_recordings(self, stop: bool = False) -> list[tuple[int, str, list[StepSample]]]:
        """The recordings of the sessions finished since the last call, and forget them; ``stop`` ends recording."""
        with self._lock:
            taken, self.recordings = self.recordings, []
            if stop:
                self.recording_samples = None
            return taken

    def reset(self) -> None:
        """Every session starts clean (diffusers' reset contract): the live branches are retired and every running
        ``generation()`` (in any thread) starts its generation anew with its next call; stats go to ``history``."""
        with self._lock:
            for session in self._live.values():
                self._retire(session)
            self._live.clear()
            self._unnamed = None
            for session in self._generations.values():
                self._restart(session)

    # --- routing ---------------------------------------------------------------------------------------------------
    def for_call(self, timestep: Callable[[], float | None]) -> Session:
        """The session the current call belongs to. ``timestep()`` reads the call's timestep, for the fallback of
        rule 3 only (a host read)."""
        ctx = self._ctx
        if ctx.session is not None:
            session = ctx.session
            if session.step >= session.num_steps:
                self._overrun(session, f"generation {session.name!r}")
                self._restart(session)
            return session
        name = ctx.name or "default"
        with self._lock:
            if ctx.step_index is not None:
                return self._for_pipeline_step(name, ctx.step_index, ctx.num_steps or self.num_steps)
            timestep = timestep()
            if ctx.name is None:
                name = self._unnamed_branch(timestep)
            session = self._live.get(name)
            starts_new = (
                session is None
                or session.step >= session.num_steps
                or (timestep is not None and session.last_timestep is not None and timestep > session.last_timestep)
            )
            if starts_new:
                session = self._replace(name, session, self.tail_steps(timestep))
            session.last_timestep = timestep
            return session

    def _unnamed_branch(self, timestep: float | None) -> str:
        """The session name of a call without any context: ``"default"``, or for the k-th call in a row at one
        timestep ``"default#k"`` — the k-th branch of that step (a pipeline that calls the model once per CFG branch
        without ``cache_context``, as diffusers' video-to-video Wan does). That reading needs the pipeline's schedule
        (``announce_timesteps``) with every timestep once; otherwise a repeated timestep could as well be the next
        step, and the call is refused."""
        last = self._unnamed
        if timestep is None or last is None or timestep != last[0]:
            self._unnamed = (timestep, 1)
            return "default"
        announced = self.announced_timesteps
        if not announced or len(announced) < 2 or len(set(announced)) != len(announced):
            raise AdaCacheError(
                f"a second call at timestep {timestep:g} without a cache_context() or generation(): is it the next "
                "step, or another branch (e.g. the unconditional call of CFG) of the same step? Each branch needs its "
                "own cached state: run each generation inside `with cached.generation(num_steps=N):` with one call "
                "per step (batched CFG), wrap each branch's calls in `with cached.cache_context('cond')` / "
                "`('uncond')`, or keep one `cached.new_session(N)` per branch and call `cached.step(session, ...)`"
            )
        self._unnamed = (timestep, last[1] + 1)
        return f"default#{last[1] + 1}"

    def tail_steps(self, timestep: float | None) -> int | None:
        """How many calls are left of the schedule a pipeline announced (``announced_timesteps``, from its
        scheduler's ``set_timesteps``) when a generation starts at ``timestep``: a video-to-video (``strength``)
        pipeline runs only the tail of its schedule, from the step whose timestep its first call carries. None when
        nothing was announced or the timestep is not in it (then N is ``num_steps``)."""
        announced = self.announced_timesteps
        if not announced or timestep is None:
            return None
        index = min(range(len(announced)), key=lambda i: abs(announced[i] - timestep))
        if abs(announced[index] - timestep) > 1e-4 * max(1.0, abs(timestep)):
            return None
        return len(announced) - index

    def _for_pipeline_step(self, name: str, step_index: int, n: int | None) -> Session:
        session = self._live.get(name)
        # Past N without a restart of step_index (a pipeline that calls more often than it said): a new generation,
        # as in generation(), never a step beyond the schedule.
        overrun = session is not None and session.step >= session.num_steps
        if overrun and step_index != 0:
            self._overrun(session, f"branch {name!r} (step_index={step_index})")
        if (
            overrun
            or session is None
            or step_index == 0
            or (session.last_step_index is not None and step_index <= session.last_step_index)
            or (n is not None and session.pipeline_num_steps != n)
        ):
            # A model that joins mid-loop (Wan 2.2's low-noise transformer_2 from the boundary step on) runs the
            # remaining n - step_index steps: its schedule ends, with the forced last steps, where the pipeline's does.
            remaining = n - step_index if n is not None and 0 < step_index < n else n
            session = self._replace(name, session, remaining)
            session.pipeline_num_steps = n
        session.last_step_index = step_index
        return session

    def _replace(self, name: str, session: Session | None, num_steps: int | None) -> Session:
        if session is not None:
            self._retire(session)
        session = self._live[name] = self.new_session(num_steps, name)
        return session

    def _overrun(self, session: Session, what: str) -> None:
        session.events.append(f"call {session.step + 1} > num_steps={session.num_steps}: new generation")
        logger.warning("%s: more calls than num_steps=%d; starting a new generation", what, session.num_steps)

    def _restart(self, session: Session) -> None:
        self._retire(session)
        num_steps = None if session.num_steps == UNKNOWN_NUM_STEPS else session.num_steps
        session.schedule = self._schedule(num_steps, session.name)
        session.step = 0
        session.force_next = False

    def _retire(self, session: Session) -> None:
        if session.schedule.computed_steps or session.schedule.skipped_steps:
            self.generations_finished += 1
            self._history.append({"branch": session.name, "generation": self.generations_finished, **session.stats()})
            if session.recording:
                self.recordings.append((self.generations_finished, session.name, session.recording))
        self._arm_recording(session)
        session.clear_cache()

    def _schedule(self, num_steps: int | None, name: str) -> StepSchedule:
        config = self.config
        if num_steps is None and config.moreg is not None and not all(isinstance(e, int) for e in config.moreg.window):
            if not self._warned_moreg_without_n:
                self._warned_moreg_without_n = True
                logger.warning(
                    "session %r: the MoReg window %s is given as fractions of N, but N is unknown, so MoReg is off; "
                    "pass optimize(..., num_steps=N), run inside generation(num_steps=N), use a diffusers pipeline "
                    "(apply) or give MoRegConfig.window in absolute steps",
                    name,
                    list(config.moreg.window),
                )
            config = dataclasses.replace(config, moreg=None)
        return make_schedule(config, num_steps or UNKNOWN_NUM_STEPS)

    # --- stats -----------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per branch: the live sessions, plus finished generations under ``history``."""
        with self._lock:
            live = {name: s.stats() for name, s in self._live.items()}
            return {**live, "history": [dict(entry) for entry in self._history]}

    def history_since(self, generation: int) -> list[dict]:
        """The finished sessions after the ``generation``-th (``generations_finished`` read earlier), oldest first;
        ValueError when some of them have already left the bounded history."""
        with self._lock:
            missing = self.generations_finished - generation - len(self._history)
            if missing > 0:
                raise ValueError(
                    f"history_since({generation}): {missing} of the sessions finished since then have left the "
                    f"history (it keeps the newest {self._history.maxlen}); read it more often"
                )
            return [entry for entry in self._history if entry["generation"] > generation]
