"""``adacache-compile serve``: a pipeline directory or a bundled testbed behind the HTTP API of :mod:`.http`, every
request its own schedule inside one batched step.

The parser imports nothing optional; :func:`run` imports FastAPI and uvicorn (extra ``[serve]``), diffusers for a
pipeline directory and onnxruntime / TensorRT for ``--export``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_arguments", "run", "build_service", "parse_config"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("what to serve")
    source.add_argument("pipeline", nargs="?", default=None, help="a diffusers pipeline directory (save_pretrained)")
    source.add_argument(
        "--testbed",
        default=None,
        help="a bundled testbed instead: latte-shapes (default without a pipeline) or "
        "ltx-textures, or a testbed checkpoint directory",
    )
    source.add_argument(
        "--export",
        type=Path,
        default=None,
        help="run the programs of this export directory (adacache-compile "
        "export) instead of capturing the model; exported with a batch range as large as --max-rows",
    )
    source.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"), help="for --export")
    source.add_argument(
        "--pipeline-arg",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="another argument of every pipeline call (e.g. max_sequence_length=226)",
    )
    source.add_argument("--device", default="cpu")
    source.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (pipeline; default: as saved)")
    configs = parser.add_argument_group("configs")
    configs.add_argument(
        "--config",
        default="fast-50+f2",
        help="the default config: a preset name, JSON text or a JSON file (a "
        "calibrated config); its region, tap and norm order build the programs every request shares",
    )
    configs.add_argument(
        "--serve-config",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="another config requests may name "
        "(e.g. mine=cfg.json); every preset without MoReg is served too, and 'uncached'",
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--max-concurrent", type=int, default=8, help="generations in flight (batched together)")
    server.add_argument("--max-queue", type=int, default=16, help="more may wait; beyond, requests get HTTP 429")
    server.add_argument("--max-rows", type=int, default=32, help="rows (batch entries) per program call at most")
    server.add_argument("--window-ms", type=float, default=10.0, help="how long a step waits for the other requests")
    server.add_argument(
        "--no-warmup",
        action="store_true",
        help="do not capture the testbed's call with a 2-step generation before "
        "serving (the first request then waits for the capture)",
    )


def parse_config(spec: str):
    """A preset name, JSON text or a JSON file as an :class:`~adacache_compile.config.AdaCacheConfig`."""
    from ..config import PRESETS, AdaCacheConfig

    return PRESETS[spec] if spec in PRESETS else AdaCacheConfig.from_json(spec)


def build_service(args: argparse.Namespace):
    """The :class:`~.service.GenerationService` ``args`` describe (loads the model, captures nothing yet)."""
    from ..runtime import optimize
    from .engine import BatchedTransformer
    from .generators import PipelineGenerator, TestbedGenerator
    from .service import GenerationService, served_configs

    default = parse_config(args.config)
    extra = {}
    for item in args.serve_config:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: --serve-config {item!r}: expected NAME=SPEC (a preset, JSON text or file)")
        extra[name] = parse_config(spec)
    if args.pipeline is not None and args.testbed is not None:
        raise SystemExit("error: serve a pipeline directory or a --testbed, not both")
    if args.pipeline is not None:
        from ..cli import _pipeline_args  # the --pipeline-arg parsing of the other subcommands
        from ..model_spec import load_pipeline, parse_dtype

        print(f"loading {args.pipeline} ...", file=sys.stderr)
        pipe = load_pipeline(args.pipeline, device=args.device, dtype=parse_dtype(args.dtype))
        call_args = _pipeline_args(args.pipeline_arg)
        model, generator = pipe.transformer, PipelineGenerator(pipe, Path(args.pipeline).name, call_args)
    else:
        from ..testbed import load_testbed

        testbed = load_testbed(args.testbed)
        model, generator = testbed.transformer, TestbedGenerator(testbed)
    if args.export is not None:
        from ..export import load

        runtime = load(args.export, args.backend)
    else:
        # Forecast order 0: the cheapest skip program; each request forecasts at its own order on the host.
        runtime = optimize(model, default.replace(forecast_order=0))
    batched = BatchedTransformer(runtime, max_rows=args.max_rows, window_s=args.window_ms / 1000.0)
    configs = served_configs(runtime.adacache_config, {**extra, "default": default})
    return GenerationService(
        batched, generator, configs, "default", max_concurrent=args.max_concurrent, max_queue=args.max_queue
    )


def run(args: argparse.Namespace) -> int:
    """Serve generation requests over HTTP (FastAPI + uvicorn)."""
    import uvicorn

    from ..errors import AdaCacheError
    from .http import create_app

    try:
        service = build_service(args)
    except AdaCacheError as e:  # a config the shared programs cannot serve: the message says which and why
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .generators import GenerationSpec, TestbedGenerator

    if isinstance(service.generator, TestbedGenerator) and not args.no_warmup:
        print("capturing the model with a 2-step generation ...", file=sys.stderr)
        warmup = service.submit(GenerationSpec(steps=2, seeds=(0,), labels=((0, 0),)))
        warmup.done.wait()
        if warmup.error is not None:
            print(f"error: the warm-up generation failed: {warmup.error}", file=sys.stderr)
            service.close()
            return 1
    print(
        f"serving {service.generator.kind} {service.generator.name!r} on http://{args.host}:{args.port} "
        f"(configs: {', '.join(sorted(service.configs))})",
        file=sys.stderr,
    )
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
    return 0
