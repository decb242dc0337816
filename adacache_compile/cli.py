"""``adacache-compile``: inspect a model's cache plan, export it to ONNX, check the ONNX for TensorRT, build engines.

Subcommands are ``(name, add_arguments, run)`` triples in :data:`COMMANDS`; :data:`PLUGIN_MODULES` names modules
owned elsewhere (``demo``, ``calibrate``, ``bench``) that each expose ``register(subparsers)`` and are imported only
when present, so a missing optional dependency there never breaks the core commands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .testbed.tiny_models import FAMILIES

__all__ = ["COMMANDS", "PLUGIN_MODULES", "build_model", "main"]

logger = logging.getLogger(__name__)

# The shipped testbed, or a tiny random-init model of each supported family (2 layers; nothing downloaded).
MODELS = ("testbed", *(f"{family}-tiny" for family in FAMILIES))


def build_model(name: str, *, seed: int = 0):
    """``(model, example_inputs)`` for a ``--model`` choice: the shipped testbed (a tiny Latte if its checkpoint is
    absent) or a tiny random-init diffusers model."""
    import torch

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    if name == "testbed":
        try:
            from .testbed import load_testbed

            testbed = load_testbed()
        except (ImportError, FileNotFoundError) as e:
            print(f"testbed checkpoint unavailable ({e}); using latte-tiny", file=sys.stderr)
            return build_model("latte-tiny", seed=seed)
        model = testbed.transformer
        config = model.config
        generator = torch.Generator().manual_seed(seed)
        size = (2, config.in_channels, config.video_length, config.sample_size, config.sample_size)
        return model, {
            "hidden_states": torch.randn(size, generator=generator),
            "timestep": torch.full((2,), 500, dtype=torch.long),
            "encoder_hidden_states": torch.cat([testbed.make_condition([("disc", 1)]), testbed.cond.null(1)]),
            "return_dict": False,
        }
    from .testbed.tiny_models import build

    model, inputs = build(name.removesuffix("-tiny"), seed=seed)
    if name != "tiny-dit-tiny":
        inputs["return_dict"] = False
    return model.requires_grad_(False), inputs


def _config(spec: str | None):
    from .config import PRESETS, AdaCacheConfig

    if spec is None:
        return AdaCacheConfig.preset("fast-30")
    if spec in PRESETS:
        return PRESETS[spec]
    return AdaCacheConfig.from_json(spec)


def _optimize(args):
    from .runtime import optimize

    print(f"building {args.model} ...", file=sys.stderr)
    model, example_inputs = build_model(args.model)
    print("capturing and planning (torch.export + passes) ...", file=sys.stderr)
    dynamic = not getattr(args, "no_dynamic", False)
    return optimize(model, _config(args.config), example_inputs=example_inputs, dynamic=dynamic)


# --- inspect ---------------------------------------------------------------------------------------------------------
def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="testbed", help="model to build (default: testbed)")
    parser.add_argument("--config", default=None, help="AdaCache preset name, JSON text or JSON file (default fast-30)")


def _run_inspect(args) -> int:
    """Print the cache plan of a model."""
    cached = _optimize(args)
    print(cached.plan.describe())
    return 0


# --- export ----------------------------------------------------------------------------------------------------------
def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_spec", nargs="?", default=None, help="reserved for model paths; use --model for now")
    parser.add_argument("out_dir", type=Path, help="export directory (replaced atomically)")
    _add_model_arguments(parser)
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    parser.add_argument("--no-dynamic", action="store_true", help="export static shapes (the example's)")


def _run_export(args) -> int:
    """Export the full and skip programs to ONNX."""
    from .export import to_onnx

    if args.model_spec is not None:
        print(
            f"MODEL_SPEC {args.model_spec!r} is not supported yet; use --model {{{','.join(MODELS)}}}", file=sys.stderr
        )
        return 2
    cached = _optimize(args)
    print(f"exporting full and skip programs to {args.out_dir} ...", file=sys.stderr)
    to_onnx(cached, args.out_dir, dynamic=not args.no_dynamic, opset=args.opset)
    print(f"wrote {', '.join(sorted(p.name for p in args.out_dir.iterdir()))} in {args.out_dir}")
    return 0


# --- check-trt -------------------------------------------------------------------------------------------------------
def _add_check_trt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="directory of .onnx files")


def _run_check_trt(args) -> int:
    """Check every .onnx in a directory for TensorRT."""
    from .export.trt_check import check_onnx_for_tensorrt, format_findings

    files = sorted(args.out_dir.glob("*.onnx"))
    if not files:
        print(f"{args.out_dir}: no .onnx files", file=sys.stderr)
        return 2
    errors = 0
    for path in files:
        findings = check_onnx_for_tensorrt(path)
        errors += sum(f.severity == "error" for f in findings)
        print(f"== {path.name}")
        print(format_findings(findings))
    return 1 if errors else 0


# --- build-engines ---------------------------------------------------------------------------------------------------
def _add_build_engines_arguments(parser: argparse.ArgumentParser) -> None:
    from .export.tensorrt import PRECISIONS

    parser.add_argument("out_dir", type=Path, help="export directory written by `export`")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16")
    parser.add_argument("--timing-cache", type=Path, default=None, help="default: OUT_DIR/timing.cache")
    for bound in ("min", "opt", "max"):
        parser.add_argument(
            f"--{bound}",
            action="append",
            default=[],
            metavar="AXIS=SIZE",
            help=f"override the profile {bound} of a named axis (repeatable), e.g. --{bound} batch=4",
        )


def _axis_sizes(items: list[str], flag: str) -> dict[str, int]:
    sizes = {}
    for item in items:
        axis, sep, size = item.partition("=")
        if not sep or not size.isdigit():
            raise SystemExit(f"--{flag} {item!r}: expected AXIS=SIZE")
        sizes[axis] = int(size)
    return sizes


def _run_build_engines(args) -> int:
    """Build TensorRT engines for an export directory."""
    from .export import build_engines

    profiles = {bound: _axis_sizes(getattr(args, bound), bound) for bound in ("min", "opt", "max")}
    print(f"building TensorRT engines ({args.precision}) in {args.out_dir} ...", file=sys.stderr)
    try:
        engines = build_engines(
            args.out_dir,
            precision=args.precision,
            profiles={k: v for k, v in profiles.items() if v},
            timing_cache=args.timing_cache,
        )
    except RuntimeError as e:  # no TensorRT / no GPU: the message says what to install
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in engines.items():
        print(f"{name}: {path}")
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

# The core subcommands, in the order --help lists them.
COMMANDS: list[Command] = [
    ("inspect", _add_model_arguments, _run_inspect),
    ("export", _add_export_arguments, _run_export),
    ("check-trt", _add_check_trt_arguments, _run_check_trt),
    ("build-engines", _add_build_engines_arguments, _run_build_engines),
]

# ---------------------------------------------------------------------------------------------------------------------
# Subcommands owned by other modules (demo, calibrate, bench). Each module exposes ``register(subparsers)`` that adds
# its parsers with ``parser.set_defaults(run=<fn(args) -> int>)``. A module that is absent is skipped quietly; one
# that fails to import is reported at debug level and skipped.
PLUGIN_MODULES: list[str] = [
    "adacache_compile.testbed.demo",
    "adacache_compile.calibrate",
    "adacache_compile.bench",
]
# ---------------------------------------------------------------------------------------------------------------------


def _register_plugins(subparsers) -> None:
    for module_name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name):
                continue  # the module itself does not exist (yet)
            logger.debug("subcommands of %s unavailable: %s", module_name, e)
            continue
        except ImportError as e:
            logger.debug("subcommands of %s unavailable: %s", module_name, e)
            continue
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adacache-compile", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add_arguments, run in COMMANDS:
        sub = subparsers.add_parser(name, help=(run.__doc__ or "").strip().rstrip("."))
        add_arguments(sub)
        sub.set_defaults(run=run)
    _register_plugins(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
