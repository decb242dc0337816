"""The quality–latency benchmark (``python benchmarks/quality_latency.py``), by job:

- ``videos``: the benchmark videos of each testbed, and the peers' calibration videos (disjoint).
- ``methods``: the method record (:class:`methods.BenchMethod`) and ours: presets, forecasting presets, fixed
  schedules.
- ``adapters``: what the peers need from each testbed (Latte with one block list, SeaCache's latents callback, the
  sampler's noise levels, module names and settings per testbed).
- ``diffusers_hooks``: diffusers' cache hooks (PAB, FasterCache, TaylorSeer, FirstBlockCache, SeaCache, MagCache):
  the denoiser wrapper, sweeps, MagCache's calibration, the hooks probed only to record why they do not apply.
- ``cache_dit_peer``: cache-dit DBCache (with and without its TaylorSeer calibrator).
- ``lineup``: the methods of a full run, one entry per set (:data:`lineup.METHOD_SETS`).
- ``run``: running and timing (rounds, the peers' measured compute, calibrations first).
- ``scoring``: PSNR / SSIM, rows, the peers' Pareto front, the targets.
- ``report``: markdown, Pareto plot, JSON, named after the testbed.
- ``cli``: the command line.
"""
