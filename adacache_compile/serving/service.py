"""Generation jobs: a bounded queue, worker threads that run each job as one request of the batched transformer,
per-job progress and results. The HTTP layer (:mod:`.http`) is a thin skin over :class:`GenerationService`.

A job is checked before it is queued (:class:`~.generators.InvalidRequest`); a full queue refuses it
(:class:`QueueFull`); a job that fails while running (an error in its own calls, a video holding NaN/Inf) fails
alone: its error is recorded on it and the other jobs in flight go on.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import PRESETS, AdaCacheConfig
from ..errors import AdaCacheError
from .engine import BatchedTransformer, check_request_config
from .generators import GenerationSpec, InvalidRequest

__all__ = ["GenerationService", "Job", "QueueFull", "ServiceClosed", "served_configs", "UNCACHED"]

logger = logging.getLogger(__name__)

# The config name of a request that computes every step (no caching).
UNCACHED = "uncached"
QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


class QueueFull(AdaCacheError):
    """The bounded queue is full: the request was not accepted (HTTP 429)."""


class ServiceClosed(AdaCacheError):
    """The service is shutting down and accepts nothing new (HTTP 503)."""


@dataclass(eq=False)
class Job:
    """One accepted generation: its spec and config, where it stands, and its result or error."""

    id: str
    spec: GenerationSpec
    config_name: str
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    request: Any = None  # the engine's Request while it runs
    video: torch.Tensor | None = None
    computed_steps: dict[str, list[int]] | None = None
    nonfinite_steps: dict[str, list[int]] | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def summary(self) -> dict[str, Any]:
        """What a client reads of the job (the video goes separately, in the format it asks for)."""
        if self.request is not None and self.status == RUNNING:
            progress = self.request.progress
        else:
            steps = self.spec.steps
            progress = {"step": steps if self.status == DONE else 0, "num_steps": steps}
        return {
            "id": self.id,
            "status": self.status,
            "config": self.config_name,
            "progress": progress,
            "computed_steps": self.computed_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "latency_s": None if self.finished is None else self.finished - self.created,
        }


def served_configs(programs_config: AdaCacheConfig, extra: dict[str, AdaCacheConfig] | None = None):
    """The configs requests may name: every preset the engine's programs can serve (no MoReg; the programs' region,
    tap and norm order), ``"uncached"``, and ``extra`` (a calibrated config by name), which must be servable."""
    configs = {}
    for name, config in PRESETS.items():
        try:
            check_request_config(config, programs_config, f"preset {name!r}")
        except AdaCacheError:
            continue
        configs[name] = config
    configs[UNCACHED] = programs_config.replace(enabled=False)
    for name, config in (extra or {}).items():
        check_request_config(config, programs_config, f"config {name!r}")
        configs[name] = config
    return configs


class GenerationService:
    """Runs generation jobs concurrently through one :class:`BatchedTransformer`.

    ``generator``: a :class:`~.generators.TestbedGenerator` or :class:`~.generators.PipelineGenerator`.
    ``configs``: the config names requests may use (:func:`served_configs`), ``default_config`` one of them.
    ``max_concurrent`` jobs run at once (each in its own worker thread, all batched together); ``max_queue`` more
    wait; beyond that :meth:`submit` raises :class:`QueueFull`. ``keep_finished``: finished jobs kept for clients
    to read (the oldest are forgotten first)."""

    def __init__(
        self,
        batched: BatchedTransformer,
        generator,
        configs: dict[str, AdaCacheConfig],
        default_config: str,
        *,
        max_concurrent: int = 8,
        max_queue: int = 16,
        keep_finished: int = 256,
    ):
        if default_config not in configs:
            raise ValueError(f"default_config {default_config!r} is not among the served configs {sorted(configs)}")
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError(f"max_concurrent={max_concurrent} must be >= 1 and max_queue={max_queue} >= 0")
        self.batched = batched
        self.generator = generator
        self.configs = dict(configs)
        self.default_config = default_config
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._keep_finished = keep_finished
        self._ids = itertools.count(1)
        self._queued = 0
        self._running = 0
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, name=f"adacache-job-{i}", daemon=True) for i in range(max_concurrent)
        ]
        for worker in self._workers:
            worker.start()

    # --- clients ---------------------------------------------------------------------------------------------------
    def submit(self, spec: GenerationSpec, config: str | None = None) -> Job:
        """Check ``spec`` and queue it; raises :class:`~.generators.InvalidRequest` (bad fields),
        :class:`QueueFull` or :class:`ServiceClosed`."""
        name = self.default_config if config is None else config
        if name not in self.configs:
            raise InvalidRequest(f"config {name!r} is not served; served configs: {', '.join(sorted(self.configs))}")
        if isinstance(spec.steps, bool) or not isinstance(spec.steps, int) or spec.steps < 1:
            raise InvalidRequest(f"steps={spec.steps!r}: expected an int >= 1")
        if spec.guidance_scale is not None and not math.isfinite(spec.guidance_scale):
            raise InvalidRequest(f"guidance_scale={spec.guidance_scale!r}: expected a finite number")
        spec = self.generator.check(spec)
        with self._lock:
            if self._closed:
                raise ServiceClosed("the server is shutting down and accepts no new requests")
            if self._queued + self._running >= self.max_concurrent + self.max_queue:
                raise QueueFull(
                    f"the queue is full: {self._queued} requests wait (max_queue={self.max_queue}) and "
                    f"{self._running} run (max_concurrent={self.max_concurrent}); retry later"
                )
            job = Job(f"gen-{next(self._ids)}", spec, name)
            self._jobs[job.id] = job
            self._queued += 1
            self._forget_old()
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {
                "status": "closing" if self._closed else "ok",
                "generator": {"kind": self.generator.kind, "name": self.generator.name},
                "running": self._running,
                "queued": self._queued,
                "max_concurrent": self.max_concurrent,
                "max_queue": self.max_queue,
                "default_config": self.default_config,
                "configs": sorted(self.configs),
            }

    def close(self, timeout: float | None = None) -> None:
        """Stop: refuse new jobs, fail the queued ones, let the running ones finish, stop the engine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout)
        self.batched.close()

    # --- workers ---------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._queued -= 1
                closing = self._closed
                if not closing:
                    self._running += 1
            if closing:
                self._finish(job, error="the server shut down before this request started")
                continue
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - the job's own failure, recorded on it
                logger.warning("job %s failed: %s", job.id, e)
                self._finish(job, error=f"{type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self._running -= 1

    def _run(self, job: Job) -> None:
        job.started = time.time()
        job.status = RUNNING
        spec = job.spec
        with self.batched.request(
            num_steps=self.generator.num_steps(spec), config=self.configs[job.config_name], name=job.id
        ) as request:
            job.request = request
            video = self.generator.generate(self.batched, spec)
        finished = request.stats()["finished"]
        job.computed_steps = {entry["branch"]: entry["computed_steps"] for entry in finished}
        job.nonfinite_steps = {entry["branch"]: entry["nonfinite_steps"] for entry in finished}
        if not bool(torch.isfinite(video).all()):
            bad = {branch: steps for branch, steps in job.nonfinite_steps.items() if steps}
            raise AdaCacheError(
                f"request {job.id}: the video holds NaN/Inf (steps whose fused deltas or tap were non-finite, per "
                f"branch: {bad or 'none; the non-finite values came from outside the cached blocks'}); check the "
                "request's inputs (guidance scale, size)"
            )
        job.video = video.detach().cpu()
        self._finish(job)

    def _finish(self, job: Job, error: str | None = None) -> None:
        job.finished = time.time()
        job.error = error
        job.status = FAILED if error is not None else DONE
        job.done.set()

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.done.is_set()]
        for job_id in finished[: max(0, len(finished) - self._keep_finished)]:
            del self._jobs[job_id]
