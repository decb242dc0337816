"""CUDA-graph replay of a static program, one graph per input shape.

The programs hold no data-dependent control flow and no host syncs, so each captures as one CUDA graph by
construction. Graphs of one cached module share a memory pool (full and skip never run at the same time), and every
output is copied out of the graph's static buffers, because the next replay (another branch, another generation)
overwrites them and a cache must never alias a buffer that something else writes.
"""

from __future__ import annotations

import logging
import threading

import torch

__all__ = ["CUDAGraphProgram"]

logger = logging.getLogger(__name__)


class CUDAGraphProgram:
    """Callable like ``program``; on CUDA inputs it captures once per input signature and replays afterwards."""

    def __init__(self, program, name: str, pool=None, warmup: int = 2):
        self.program = program
        self.name = name
        self.pool = pool
        self.warmup = warmup
        self._graphs: dict[tuple, tuple[list[torch.Tensor], torch.cuda.CUDAGraph, tuple]] = {}
        self._lock = threading.Lock()  # static buffers: one replay at a time

    def __call__(self, *inputs: torch.Tensor):
        if not inputs or not inputs[0].is_cuda:
            return self.program(*inputs)
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        with self._lock:
            entry = self._graphs.get(key) or self._capture(key, inputs)
            static_inputs, graph, static_outputs = entry
            for buffer, value in zip(static_inputs, inputs):
                buffer.copy_(value)
            graph.replay()
            return tuple(out.clone() for out in static_outputs)

    def _capture(self, key, inputs):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_inputs = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                self.program(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            static_outputs = tuple(self.program(*static_inputs))
        logger.info("captured CUDA graph for %s program, inputs %s", self.name, [k[0] for k in key])
        self._graphs[key] = (static_inputs, graph, static_outputs)
        return self._graphs[key]
