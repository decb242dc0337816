"""The drop-in module: same call signature and outputs as the model, the full or the skip program per call.

:class:`ProgramRuntime` is what every runtime shares: a capture source (which capture serves a call), the
:class:`~adacache_compile.sessions.Sessions` (which generation and step a call is) and
:func:`~adacache_compile.step.run_step`. :class:`CachedTransformer` runs a torch model through a
:class:`~adacache_compile.capture_cache.CaptureCache`; the exported runtime
(:class:`~adacache_compile.export.runtime.ExportedTransformer`) runs one fixed, exported capture.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .capture_cache import CaptureCache, CompiledEntry
from .config import AdaCacheConfig
from .errors import AdaCacheError
from .plan import CachePlan
from .programs import Programs
from .sessions import UNKNOWN_NUM_STEPS, Session, Sessions
from .step import run_step

__all__ = ["CachedTransformer", "ProgramRuntime", "Session", "CompiledEntry", "optimize", "UNKNOWN_NUM_STEPS"]


# diffusers' CacheMixin methods: forwarded to the wrapped module they would hook a module the programs never call.
_REFUSED_HOOK_METHODS = ("enable_cache", "disable_cache")


class ProgramRuntime(torch.nn.Module):
    """Calls → capture and session → one step. ``source_model`` answers attribute reads the runtime does not
    (pipelines read ``transformer.config.patch_size``); ``captures`` serves calls (see :mod:`.capture_cache`)."""

    def __init__(self, source_model: torch.nn.Module, captures, config: AdaCacheConfig, num_steps: int | None = None):
        super().__init__()
        self._orig_mod = source_model
        self._captures = captures
        self._sessions = Sessions(config, num_steps)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _REFUSED_HOOK_METHODS:
                raise AdaCacheError(
                    f"{type(self).__name__}.{name}: diffusers' cache hooks would hook the wrapped "
                    f"{type(self._orig_mod).__name__}, which the AdaCache programs never call, so they would silently "
                    "do nothing; use either AdaCache (this module) or diffusers' hooks on the original model "
                    "(adacache_compile.remove(pipe), or the module's _orig_mod)"
                ) from None
            return getattr(self._orig_mod, name)

    # Not ``config``: pipelines read the wrapped model's config (``transformer.config.patch_size``).
    @property
    def adacache_config(self) -> AdaCacheConfig:
        """The AdaCache config in force; assigning one is :meth:`use_config` (the programs follow it)."""
        return self._sessions.config

    @adacache_config.setter
    def adacache_config(self, config: AdaCacheConfig) -> None:
        self.use_config(config)

    @property
    def num_steps(self) -> int | None:
        """N for generations that neither a pipeline nor ``generation()`` announces."""
        return self._sessions.num_steps

    @num_steps.setter
    def num_steps(self, num_steps: int | None) -> None:
        self._sessions.num_steps = num_steps

    @property
    def plan(self) -> CachePlan:
        """The passes' records of the newest capture (a torch runtime only: an exported runtime carries its
        programs' contract, :attr:`programs`, and its plan's description, ``describe()``)."""
        entry = self._captures.latest()
        if not hasattr(entry, "plan"):
            raise AdaCacheError(
                f"{type(self).__name__} has no CachePlan: the passes ran on the model it was exported from; read "
                "`.programs` for the programs' contract or `.describe()` for the plan as it was printed at export"
            )
        return entry.plan

    @property
    def programs(self) -> Programs:
        return self._captures.latest().programs

    @property
    def captures(self):
        """The capture source: a :class:`~adacache_compile.capture_cache.CaptureCache` (``captures.entries``,
        ``captures.latest()``), or an exported runtime's one fixed capture."""
        return self._captures

    def use_config(self, config: AdaCacheConfig) -> None:
        """Switch the AdaCache config; every branch starts clean. Codebook, forced steps, decision metric and MoReg
        hyper-parameters are host-side and switch freely; what the programs compute (region, tap, norm order, MoReg
        strides, forecast order) must match them: a torch runtime re-captures on the next call, an exported one
        refuses."""
        if not isinstance(config, AdaCacheConfig):
            raise TypeError(
                f"{type(self).__name__}.use_config: expected an AdaCacheConfig, got {type(config).__name__} (a "
                "preset name goes through AdaCacheConfig.preset(name))"
            )
        self._captures.accept(config)
        self._reset_stateful_cache()
        self._sessions.config = config

    # --- sessions ----------------------------------------------------------------------------------------------
    def cache_context(self, name: str, **kwargs):
        """diffusers' hook protocol: names the branch (``"cond"``/``"uncond"``) and the step of the next calls."""
        return self._sessions.cache_context(name, **kwargs)

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """diffusers calls this at the end of a pipeline call: every branch starts clean next time."""
        self._sessions.reset()

    reset = _reset_stateful_cache

    @contextlib.contextmanager
    def generation(self, num_steps: int, name: str = "generation"):
        """All calls inside run as one generation of ``num_steps`` steps, one call per step (batched CFG shares it)."""
        with self._sessions.generation(num_steps, name) as session:
            yield session

    def new_session(self, num_steps: int, name: str = "session") -> Session:
        """Explicit session API: pass it to :meth:`step`."""
        return self._sessions.new_session(num_steps, name)

    @contextlib.contextmanager
    def recording(self, samples: int = 16384):
        """Inside, every session keeps per computed step the latent input's change and a fixed sample of
        ``samples`` elements of each fused delta (what :mod:`adacache_compile.calibration` simulates policies on);
        yields a list that receives ``(generation, branch, [StepSample, ...])`` of each finished session."""
        taken: list = []
        self._sessions.start_recording(samples)
        try:
            yield taken
        finally:
            self._sessions.reset()
            taken.extend(self._sessions.take_recordings(stop=True))

    def take_recordings(self) -> list:
        """The recordings of sessions finished since the last call (inside :meth:`recording`)."""
        return self._sessions.take_recordings()

    def announce_timesteps(self, timesteps) -> None:
        """A pipeline's whole schedule, before its loop (``apply()`` calls this from the scheduler's
        ``set_timesteps``): the next generations have ``len(timesteps)`` steps, or the tail from the step whose
        timestep their first call carries (video-to-video pipelines with ``strength`` run only a tail)."""
        values = [float(t) for t in timesteps]
        self._sessions.announced_timesteps = values
        self._sessions.num_steps = len(values)

    @property
    def stats(self) -> dict[str, Any]:
        """Per branch: the live sessions, plus the newest finished ones under ``history`` (at most
        :data:`~adacache_compile.sessions.HISTORY_LIMIT`; each entry numbers its ``generation``)."""
        return self._sessions.stats()

    @property
    def generations_finished(self) -> int:
        """How many sessions have finished since this module was made (``history`` keeps only the newest)."""
        return self._sessions.generations_finished

    def history_since(self, generation: int) -> list[dict]:
        """The sessions finished after :attr:`generations_finished` was ``generation``, oldest first."""
        return self._sessions.history_since(generation)

    # --- the call ----------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self._call(None, args, kwargs)

    def step(self, session: Session, *args, **kwargs):
        """Run one denoising step of an explicit session (see :meth:`new_session`)."""
        return self._call(session, args, kwargs)

    def _call(self, session: Session | None, args: tuple, kwargs: dict):
        captures = self._captures
        if not self.adacache_config.enabled or captures.bypass_reason(args, kwargs) is not None:
            return captures.run_uncached(args, kwargs)
        entry, inputs = captures.lookup(args, kwargs, self.adacache_config)
        if session is None:
            session = self._sessions.for_call(lambda: _timestep_of(args, kwargs))
        # Once per generation: a model changed since capture (LoRA, replaced modules, dtype) never runs a stale graph.
        if session.step == 0 and captures.refresh():
            entry, inputs = captures.lookup(args, kwargs, self.adacache_config)
        with torch.no_grad():
            return entry.captured.unflatten(run_step(session, entry, inputs), args, kwargs)


class CachedTransformer(ProgramRuntime):
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
        single_program: bool = False,
    ):
        captures = CaptureCache(
            model, backend=backend, cuda_graphs=cuda_graphs, dynamic=dynamic, single_program=single_program
        )
        super().__init__(model, captures, config if config is not None else AdaCacheConfig.preset("fast-30"), num_steps)

    def __repr__(self) -> str:
        return f"CachedTransformer({type(self._orig_mod).__name__}, backend={self.backend!r})"

    @property
    def backend(self) -> str:
        return self._captures.backend

    def capture(self, args: tuple = (), kwargs: dict | None = None) -> CompiledEntry:
        """Capture the model for this call's input signature and build its programs (done lazily by forward)."""
        return self._captures.capture(args, kwargs or {}, self.adacache_config)


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
    single_program: bool = False,
) -> CachedTransformer:
    """Wrap ``model`` in a :class:`CachedTransformer` (a drop-in ``nn.Module``).

    ``config``: an :class:`AdaCacheConfig`, a preset name, or None (``"fast-30"``). ``example_inputs``: kwargs dict
    or positional tuple of a real call, to capture now; otherwise capture happens on the first call, and again for
    any later call whose input signature the existing captures cannot serve. ``single_program``: run every step as
    one conditional program (``torch.cond`` of the full and the skip program, see
    :mod:`~adacache_compile.passes.insert_cond`) instead of picking one of the two on the host; same schedule, same
    outputs; not with ``cuda_graphs``.
    """
    if isinstance(config, str):
        config = AdaCacheConfig.preset(config)
    cached = CachedTransformer(
        model,
        config,
        backend=backend,
        num_steps=num_steps,
        cuda_graphs=cuda_graphs,
        dynamic=dynamic,
        single_program=single_program,
    )
    if example_inputs is not None:
        if isinstance(example_inputs, dict):
            cached.capture((), example_inputs)
        else:
            cached.capture(tuple(example_inputs), {})
    return cached
