"""Serving: concurrent generations, each with its own schedule, batched at the transformer call, and the HTTP
server of ``adacache-compile serve``.

- :class:`BatchedTransformer` (:mod:`.engine`): the drop-in for concurrent generations, one
  ``with batched.request(num_steps=N, config=cfg):`` per generation and thread; per step one full-program call over
  the rows that compute and one skip-program call over the rows that skip (:mod:`.batching`, :mod:`.rows`).
- :class:`GenerationService` (:mod:`.service`): jobs, a bounded queue, workers; :mod:`.generators`: the testbed's
  sampler or a diffusers pipeline; :mod:`.http`: the FastAPI app (imports FastAPI); :mod:`.command`: the CLI.
"""

from .engine import BatchedTransformer, Request
from .generators import GenerationSpec, InvalidRequest, PipelineGenerator, TestbedGenerator
from .service import GenerationService, Job, QueueFull, ServiceClosed, served_configs

__all__ = [
    "BatchedTransformer",
    "Request",
    "GenerationSpec",
    "InvalidRequest",
    "PipelineGenerator",
    "TestbedGenerator",
    "GenerationService",
    "Job",
    "QueueFull",
    "ServiceClosed",
    "served_configs",
]
