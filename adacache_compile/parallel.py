"""Context parallelism: one schedule decision for every rank of a diffusers model run with
``enable_parallelism(config=ContextParallelConfig(...))``.

diffusers shards the sequence across the context-parallel (CP) group; each rank's full program then measures the
metric on its own shard of the tap. The schedule must read the *global* values, identically on every rank, or ranks
decide differently and hang in the next collective or diverge. :func:`reduce_metrics` turns the per-rank metrics
vector into the global one with one small all-reduce (a sum) on the host side, after the program has run, so it is
the same for every backend (eager, inductor, CUDA graphs). It runs on computed steps only; skip steps communicate
nothing of the region (the blocks' collectives live in the full program).

What is summed is what is additive: the non-finite flag (as a count of ranks that saw NaN/Inf) and the p-th powers of
the ``p``-norms (``||x||_1`` is a sum of ``|x_i|``, ``||x||_2^2`` a sum of squares); the norms are rebuilt after the
sum, and the relative metric ``||r_prev - r|| / ||r_prev||`` is the host's division of two global norms, never a mean
of per-rank ratios.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import UnsupportedModelError

__all__ = ["ContextParallel", "context_parallel_of", "reduce_metrics", "MOREG_UNDER_CP"]

# Why MoReg's motion is not measured on a context-parallel model (the tap's frame layout is left unknown).
MOREG_UNDER_CP = (
    "the model runs with context parallelism: each rank's tap holds one contiguous shard of the token sequence, so "
    "MoReg's frame differences r[t + k] - r[t] pair tokens that lie on different ranks and the per-rank motion sums "
    "are not shares of the global one; run without MoReg (AdaCacheConfig.moreg=None) on a context-parallel model"
)


@dataclass(frozen=True)
class ContextParallel:
    """The context-parallel group of a model: ``group`` is the process group of diffusers' flattened CP mesh."""

    group: Any  # torch.distributed.ProcessGroup
    rank: int
    world_size: int
    ulysses_degree: int
    ring_degree: int

    def describe(self) -> str:
        return (
            f"context parallel: rank {self.rank} of {self.world_size} (ulysses {self.ulysses_degree}, "
            f"ring {self.ring_degree})"
        )


def context_parallel_of(model: torch.nn.Module | None) -> ContextParallel | None:
    """The CP group diffusers recorded on ``model`` (``model._parallel_config``, set by ``enable_parallelism``), or
    None for a model without context parallelism. Tensor parallelism is refused: its collectives sit inside the
    blocks' linear layers and its metric would need other reductions."""
    config = getattr(model, "_parallel_config", None)
    if config is None:
        return None
    if getattr(config, "tensor_parallel_config", None) is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: tensor parallelism (ParallelConfig.tensor_parallel_config) is not supported by "
            "AdaCache; use context parallelism (enable_parallelism(config=ContextParallelConfig(ulysses_degree=N)))"
        )
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    if cp is None or mesh is None:
        return None
    return ContextParallel(
        group=mesh.get_group(),
        rank=mesh.get_local_rank(),
        world_size=mesh.size(),
        ulysses_degree=int(cp.ulysses_degree),
        ring_degree=int(cp.ring_degree),
    )


def reduce_metrics(
    metrics: torch.Tensor, cp: ContextParallel | None, norm_ord: int, sums: torch.Tensor | None = None
) -> torch.Tensor:
    """The global metrics vector of a CP group from each rank's (layout:
    :class:`~adacache_compile.programs.MetricValues`): one all-reduce (sum) of ``[non-finite count, ||r_prev - r||_p^p,
    ||r_prev||_p^p, ||r||_p^p]`` over ``cp.group``, then the norms rebuilt; ``metrics`` itself is left untouched.
    Without ``cp`` the vector is returned as it is. A CP program emits no motion terms (see :data:`MOREG_UNDER_CP`).

    ``sums``: more additive values (L1 norms of this rank's shards, e.g. the delta forecast error of
    :class:`~adacache_compile.config.GapPolicy`), summed in the same all-reduce and appended to the result (float64).
    """
    if sums is not None:
        sums = sums.detach().to(device=metrics.device, dtype=torch.float64)
    if cp is None or cp.world_size == 1:
        return metrics if sums is None else torch.cat([metrics.detach().to(torch.float64), sums])
    import torch.distributed as dist

    if metrics.numel() != 4:
        raise ValueError(
            f"reduce_metrics: a context-parallel full program emits 4 metrics, got {metrics.numel()} (motion terms "
            f"are not additive across sequence shards: {MOREG_UNDER_CP})"
        )
    values = metrics.detach().to(torch.float64)
    extra = sums if sums is not None else values[:0]
    shares = torch.cat([1.0 - values[:1], values[1:].pow(norm_ord), extra])
    dist.all_reduce(shares, op=dist.ReduceOp.SUM, group=cp.group)
    return torch.cat([(shares[:1] == 0).to(torch.float64), shares[1:4].pow(1.0 / norm_ord), shares[4:]])
