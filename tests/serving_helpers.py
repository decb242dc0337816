"""Shared by the serving tests: concurrent generations on the testbed through a BatchedTransformer, and their solo
runs through the same engine."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from adacache_compile.testbed.sample import initial_noise

# A request's video against its solo run through the same engine: the same rows computed inside a batch of other
# rows. A float32 forward's per-row results depend on the batch's row count (the CPU GEMM kernels block and accumulate
# by it): one testbed step, rows 0:2 alone vs inside 8 rows, differs by 9.3e-7 of its range; 8-14 DDIM steps (CFG
# 1.5; flow-matching Euler at CFG 3 on ltx-textures) carry that to 2e-6..1.01e-5 of the video's range at the worst
# element and 4e-7..8e-7 relative L2 (measured on this CPU over mixed batches of varying composition). So: relative
# L2 within 1e-5 (the target) and every element within 5e-5 of the range, which hold on any float32 machine.
VIDEO_RTOL = 1e-5
ELEMENT_RTOL = 5e-5


def assert_video_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """``got`` is ``want`` up to the batch's float32 rounding (VIDEO_RTOL, ELEMENT_RTOL)."""
    relative = float((got - want).norm() / want.norm())
    worst = float((got - want).abs().max()) / float(want.abs().max())
    assert relative <= VIDEO_RTOL and worst <= ELEMENT_RTOL, f"{what}: relative L2 {relative:.3g}, worst {worst:.3g}"


@dataclass
class Job:
    """One request of a test: its config, N, videos and how its loop calls the transformer."""

    config: object
    steps: int
    labels: tuple
    seeds: tuple
    two_calls: bool = False  # CFG as two calls per step, named by cache_context (as Wan's pipelines call)
    join_after: tuple[int, int] | None = None  # (job index, step): start once that job has done that step
    corrupt_at: int | None = None  # NaN in this request's latents before this step (a bad input from its loop)


def ddim(transformer, testbed, job: Job, after_step=None) -> torch.Tensor:
    """The testbed's sampler (``testbed.sample``), with CFG in one call (both halves in the batch) or in two calls
    (``cache_context("cond")`` / ``("uncond")``), and an optional corruption of the latents; ``after_step(step)`` is
    called after each step."""
    scheduler = testbed.scheduler(job.steps)
    latents = initial_noise(job.seeds, testbed.video_shape)
    cond = testbed.make_condition(list(job.labels))
    null = testbed.cond.null(len(job.labels))
    guidance = testbed.default_guidance_scale
    for step, t in enumerate(scheduler.timesteps, start=1):
        if step == job.corrupt_at:
            latents = latents.clone()
            latents[0, :, 0, 0, 0] = float("nan")
        if job.two_calls:
            timestep = t.expand(latents.shape[0])
            with transformer.cache_context("cond"):
                pred_cond = testbed.predict(transformer, latents, timestep, cond)
            with transformer.cache_context("uncond"):
                pred_uncond = testbed.predict(transformer, latents, timestep, null)
        else:
            both = torch.cat([latents, latents])
            pred_cond, pred_uncond = testbed.predict(
                transformer, both, t.expand(both.shape[0]), torch.cat([cond, null])
            ).chunk(2)
        latents = scheduler.step(pred_uncond + guidance * (pred_cond - pred_uncond), t, latents).prev_sample
        if after_step is not None:
            after_step(step)
    return latents.clamp(-1.0, 1.0)


@dataclass
class Outcome:
    video: torch.Tensor | None
    computed: dict[str, list[int]]
    nonfinite: dict[str, list[int]]
    error: BaseException | None
    cache_bytes_mid_way: tuple[int, int]  # (this request's, the engine's) cache bytes after half its steps


def run_together(batched, testbed, jobs: list[Job]) -> list[Outcome]:
    """Each job in its own thread inside ``batched.request(...)`` (started at once, or once the job it waits for
    has reached its step); their outcomes in job order."""
    outcomes: list[Outcome | None] = [None] * len(jobs)
    requests: dict[int, object] = {}

    def run(index: int, job: Job) -> None:
        video = error = None
        mid_way = []
        try:
            with batched.request(num_steps=job.steps, config=job.config, name=f"job{index}") as request:
                requests[index] = request

                def after_step(step: int) -> None:
                    if step == job.steps // 2:
                        mid_way.extend([request.cache_bytes(), batched.stats["cache_bytes"]])

                video = ddim(batched, testbed, job, after_step)
        except Exception as e:  # noqa: BLE001 - the test reads it
            error = e
        request = requests.get(index)
        finished = request.stats()["finished"] if request is not None else []
        outcomes[index] = Outcome(
            video,
            {entry["branch"]: entry["computed_steps"] for entry in finished},
            {entry["branch"]: entry["nonfinite_steps"] for entry in finished},
            error,
            tuple(mid_way),
        )

    threads = {}
    for index, job in enumerate(jobs):
        threads[index] = threading.Thread(target=run, args=(index, job))
    started = set()
    deadline = time.monotonic() + 300
    while len(started) < len(jobs) and time.monotonic() < deadline:
        for index, job in enumerate(jobs):
            if index in started:
                continue
            after = job.join_after
            if after is None or (after[0] in requests and requests[after[0]].progress["step"] >= after[1]):
                threads[index].start()
                started.add(index)
        time.sleep(0.001)
    for thread in threads.values():
        thread.join()
    return outcomes


def assert_same_as_solo(together: Outcome, solo: Outcome, what: str) -> None:
    assert together.error is None and solo.error is None, (what, together.error, solo.error)
    assert together.computed == solo.computed, what
    assert_video_close(together.video, solo.video, what)
