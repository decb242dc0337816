"""cache-dit (PyPI ``cache-dit``) as a peer: DBCache, with and without its TaylorSeer calibrator, on the testbed's
one list of whole layers (``adapters.layer_stack``), applied per method and removed after it.

cache-dit caches by replacing a block list it is given with one module that runs the whole list (first Fn blocks,
decide on their residual, then the rest or its cached residual). On Latte it runs on ``adapters.LatteLayers``, whose
one list holds Latte's layers; a ``BlockAdapter`` over Latte's own two lists runs another network, which
:func:`cache_dit_candidates` measures each run. On LTX-Video it runs on the transformer's ``transformer_blocks``,
with the pattern of cache-dit's own LTX adapter.
"""

from __future__ import annotations

import os

from .adapters import instance_state, layer_stack, peer_spec, restore_instance_state
from .methods import BenchMethod

__all__ = ["apply_cache_dit", "cache_dit_methods", "cache_dit_candidates", "import_cache_dit"]

# cache-dit DBCache F1B0 (first layer always computed, no Bn layers), residual_diff_threshold swept from mild to
# aggressive (relative L1 change of the first layer's residual), with and without its TaylorSeer calibrator.
# On 2 latte-shapes videos at 50 steps (PSNR only, no timing): DBCache 0.04 -> 44.8 dB, 0.08 -> 37.4, 0.12 -> 32.4,
# 0.16 -> 29.0, 0.24 -> 24.5; with TaylorSeer 0.08 -> 43.4, 0.12 -> 36.9, 0.16 -> 30.5, 0.24 -> 15.2. These four
# bracket 28 and 36 dB there.
CACHE_DIT_THRESHOLDS = (0.05, 0.1, 0.15, 0.2)
CACHE_DIT_WARMUP = 3  # max_warmup_steps: the first 3 steps always compute
CACHE_DIT_TAYLORSEER_ORDER = 1  # TaylorSeerCalibratorConfig.taylorseer_order (its default)


def import_cache_dit():
    """cache_dit, imported quietly (it logs every patch at INFO by default; CACHE_DIT_LOG_LEVEL overrides)."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    import cache_dit

    return cache_dit


class CacheDiTRun:
    """What :class:`apply_cache_dit` yields: ``module`` (call it as the transformer), ``reset()`` to start a new
    generation (fresh cache contexts) and ``cached_steps()``, the steps cache-dit served from cache since."""

    def __init__(self, module, manager, names):
        self.module, self._manager, self._names = module, manager, names

    def reset(self) -> None:
        for name in self._names:
            context = self._manager.get_context(name)
            self._manager.reset_context(name, *context._init_args, **context._init_kwargs)

    def cached_steps(self) -> list[int]:
        return sorted({step for name in self._names for step in self._manager.get_context(name).get_cached_steps()})


class apply_cache_dit:  # noqa: N801 - used as a context manager, like a function
    """``with apply_cache_dit(testbed, cache_config, calibrator_config) as run: ...`` runs cache-dit DBCache on the
    testbed's one list of whole layers (``adapters.layer_stack``, with its ``PeerSpec`` block list and forward
    pattern). On exit cache-dit's ``disable_cache`` removes it, and any attribute it left on a module of the
    transformer is deleted, so the transformer is as before (bitwise same outputs, checked in tests/test_bench.py)."""

    def __init__(self, testbed, cache_config, calibrator_config=None):
        self.testbed, self.cache_config, self.calibrator_config = testbed, cache_config, calibrator_config

    def __enter__(self) -> CacheDiTRun:
        cache_dit = import_cache_dit()
        from cache_dit import BlockAdapter, ForwardPattern

        spec = peer_spec(self.testbed.name)
        self._state = instance_state(self.testbed.transformer)
        module = layer_stack(self.testbed)
        self.adapter = BlockAdapter(
            transformer=module,
            blocks=getattr(module, spec.layer_list),
            blocks_name=spec.layer_list,
            forward_pattern=getattr(ForwardPattern, spec.cache_dit_pattern),
            check_forward_pattern=True,
        )
        try:
            cache_dit.enable_cache(
                self.adapter, cache_config=self.cache_config, calibrator_config=self.calibrator_config
            )
        except BaseException:
            restore_instance_state(self._state)
            raise
        return CacheDiTRun(module, module._context_manager, list(module._context_names))

    def __exit__(self, *exc):
        try:
            import_cache_dit().disable_cache(self.adapter)
        finally:
            restore_instance_state(self._state)
        return False


def cache_dit_methods(thresholds=CACHE_DIT_THRESHOLDS, calibrator=(False, True)) -> list[BenchMethod]:
    """cache-dit DBCache F1B0 (warm-up `CACHE_DIT_WARMUP`) at each residual-diff threshold, without and with its
    TaylorSeer calibrator (order `CACHE_DIT_TAYLORSEER_ORDER`, residual cache, no encoder calibrator); batched CFG
    (``enable_separate_cfg=False``) on every testbed."""
    methods = []
    for with_taylorseer in calibrator:
        for threshold in thresholds:

            def make(num_steps, threshold=threshold, with_taylorseer=with_taylorseer):
                cache_dit = import_cache_dit()
                config = cache_dit.DBCacheConfig(
                    Fn_compute_blocks=1,
                    Bn_compute_blocks=0,
                    residual_diff_threshold=threshold,
                    max_warmup_steps=CACHE_DIT_WARMUP,
                    enable_separate_cfg=False,
                    num_inference_steps=num_steps,
                )
                calibrator_config = (
                    cache_dit.TaylorSeerCalibratorConfig(
                        taylorseer_order=CACHE_DIT_TAYLORSEER_ORDER, enable_encoder_calibrator=False
                    )
                    if with_taylorseer
                    else None
                )
                return config, calibrator_config

            name = "DBCache+TaylorSeer" if with_taylorseer else "DBCache"
            methods.append(
                BenchMethod(
                    f"cache-dit {name} F1B0 r={threshold:g}",
                    None,
                    family="cache-dit",
                    cache_dit=make,
                    group=f"cache-dit {name} F1B0",
                )
            )
    return methods


def cache_dit_candidates(testbed, video, num_steps: int, reference_video) -> dict[str, str]:
    """``{setting: reason}``, measured: on Latte, cache-dit applied the way it supports a model directly, a
    ``BlockAdapter`` over Latte's own block lists (spatial and temporal, Pattern_3) with caching off (threshold 0:
    every step computes every block). If that does not reproduce the uncached video, it runs another network on Latte
    and does not apply. Other testbeds have one block list: nothing to probe."""
    from adacache_compile.testbed.sample import sample

    reasons = {}
    if testbed.family.transformer_class != "LatteTransformer3DModel":
        return reasons
    cache_dit = import_cache_dit()
    from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern

    transformer = testbed.transformer
    state = instance_state(transformer)
    name = "cache-dit BlockAdapter over transformer_blocks + temporal_transformer_blocks"
    adapter = BlockAdapter(
        transformer=transformer,
        blocks=[transformer.transformer_blocks, transformer.temporal_transformer_blocks],
        blocks_name=["transformer_blocks", "temporal_transformer_blocks"],
        forward_pattern=[ForwardPattern.Pattern_3, ForwardPattern.Pattern_3],
    )
    try:
        cache_dit.enable_cache(
            adapter,
            cache_config=DBCacheConfig(
                Fn_compute_blocks=1,
                Bn_compute_blocks=0,
                residual_diff_threshold=0.0,
                max_warmup_steps=CACHE_DIT_WARMUP,
                enable_separate_cfg=False,
                num_inference_steps=num_steps,
            ),
        )
        output = sample(transformer, testbed, [video[:2]], [video[2]], num_steps, progress=False)
        error = (output - reference_video).abs().max().item()
        if error > 0:
            reasons[name] = (
                f"runs another network: with caching off (threshold 0) the video differs from uncached by max |d| "
                f"{error:.3g}; each patched list becomes one module running the whole list, so Latte's zip of the "
                "two lists runs once (all spatial blocks, then all temporal blocks, instead of alternating); the "
                "bench runs cache-dit on LatteLayers (one list of Latte layers) instead"
            )
    except Exception as e:  # noqa: BLE001 - a failure of the foreign library means "does not apply"; the message says why
        reasons[name] = f"raises {type(e).__name__}: {str(e).splitlines()[0]}"
    finally:
        try:
            cache_dit.disable_cache(adapter)
        finally:
            restore_instance_state(state)
    return reasons
