"""adacache-compile: cache plans, the testbed demo and calibration, ONNX export, TensorRT checks and engines.

Subcommands: inspect a model's cache plan, run the testbed demo, calibrate codebooks on the testbed, export to ONNX,
check the ONNX for TensorRT, build TensorRT engines.

Every subcommand is a :class:`Command` in :data:`COMMANDS`. The parsers import nothing beyond the core library; each
run function imports what it needs (the testbed, onnx, TensorRT) when it runs, so a missing optional dependency fails
that subcommand with a message naming the package and the extra to install, never ``--help`` or another subcommand.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COMMANDS", "Command", "build_model", "build_parser", "main", "model_names"]

logger = logging.getLogger(__name__)


def model_names() -> tuple[str, ...]:
    """The ``--model`` choices: the shipped testbed, or a tiny random-init model of each supported family (2 layers;
    nothing downloaded)."""
    from .testbed.tiny_models import FAMILIES

    return ("testbed", *(f"{family}-tiny" for family in FAMILIES))


def _model_name(name: str) -> str:
    """argparse ``type`` of ``--model``: checked when a subcommand that builds a model is parsed, not for ``--help``."""
    names = model_names()
    if name not in names:
        raise argparse.ArgumentTypeError(f"unknown model {name!r}; expected one of {', '.join(names)}")
    return name


def build_model(name: str, *, seed: int = 0):
    """``(model, example_inputs)`` for a ``--model`` choice: the shipped testbed (a tiny Latte if its checkpoint is
    absent) or a tiny random-init diffusers model."""
    import torch

    if name not in model_names():
        raise ValueError(f"unknown model {name!r}; expected one of {model_names()}")
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
    parser.add_argument(
        "--model",
        type=_model_name,
        default="testbed",
        help="testbed (default: the shipped trained model) or FAMILY-tiny, a tiny random-init model of a family of "
        "adacache_compile.testbed.tiny_models (tiny-dit-tiny, latte-tiny, wan-tiny, ...)",
    )
    parser.add_argument("--config", default=None, help="AdaCache preset name, JSON text or JSON file (default fast-30)")


def _run_inspect(args) -> int:
    """Print the cache plan of a model."""
    cached = _optimize(args)
    print(cached.plan.describe())
    return 0


# --- demo ------------------------------------------------------------------------------------------------------------
def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_demo(args) -> int:
    """Uncached vs AdaCache on the bundled testbed model."""
    from .testbed.demo import run_demo

    run_demo(args.out, num_steps=args.steps, progress=not args.no_progress)
    return 0


# --- calibrate -------------------------------------------------------------------------------------------------------
def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    from .calibrate import TEMPLATES

    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--target", nargs="+", default=["fast", "slow"], help="fast, slow, or a compute fraction")
    parser.add_argument(
        "--template", default="fast", choices=sorted(TEMPLATES), help="codebook shape scaled to a compute fraction"
    )
    parser.add_argument(
        "--videos", type=int, default=None, help="record only the first N calibration videos (default: all 12)"
    )
    parser.add_argument("--out", help="write the configs and the recorded metrics as JSON")
    parser.add_argument("--no-progress", action="store_true")


def _run_calibrate(args) -> int:
    """Codebook thresholds from uncached runs of the testbed (fast / slow / compute fraction)."""
    from .testbed.calibrate import CALIBRATION_VIDEOS, calibrate_testbed

    if args.videos is not None and not 1 <= args.videos <= len(CALIBRATION_VIDEOS):
        print(f"error: --videos {args.videos}: expected 1..{len(CALIBRATION_VIDEOS)}", file=sys.stderr)
        return 2
    calibrate_testbed(
        args.steps,
        args.target,
        template=args.template,
        videos=CALIBRATION_VIDEOS[: args.videos],
        out=args.out,
        progress=not args.no_progress,
    )
    return 0


# --- export ----------------------------------------------------------------------------------------------------------
def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="export directory (replaced atomically)")
    _add_model_arguments(parser)
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    parser.add_argument("--no-dynamic", action="store_true", help="export static shapes (the example's)")


def _run_export(args) -> int:
    """Export the full and skip programs to ONNX."""
    from .export import to_onnx

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
def _precision(name: str) -> str:
    """argparse ``type`` of ``--precision``, checked when ``build-engines`` is parsed (``--help`` imports nothing)."""
    from .export.tensorrt import PRECISIONS

    if name not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
    return name


def _add_build_engines_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="export directory written by `export`")
    parser.add_argument("--precision", type=_precision, default="fp16", help="fp32, fp16 (default) or bf16")
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


@dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` builds its parser (importing nothing optional); ``run(args)`` returns
    the exit status (its docstring's first line is the ``--help`` summary); ``extra`` names the pip extra whose
    packages it may import."""

    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    extra: str


# Every subcommand, in the order --help lists them.
COMMANDS: list[Command] = [
    Command("inspect", _add_model_arguments, _run_inspect, "diffusers"),
    Command("demo", _add_demo_arguments, _run_demo, "testbed"),
    Command("calibrate", _add_calibrate_arguments, _run_calibrate, "testbed"),
    Command("export", _add_export_arguments, _run_export, "onnx"),
    Command("check-trt", _add_check_trt_arguments, _run_check_trt, "onnx"),
    Command("build-engines", _add_build_engines_arguments, _run_build_engines, "tensorrt"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adacache-compile", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=(command.run.__doc__ or "").strip().rstrip("."))
        command.add_arguments(sub)
        sub.set_defaults(command_spec=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    command = args.command_spec
    try:
        return command.run(args)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == __package__:
            raise  # a broken module of this package is a bug, not a missing dependency
        print(
            f"error: adacache-compile {command.name} needs the {e.name.split('.')[0]!r} package, which is not "
            f"installed: pip install 'adacache-compile[{command.extra}]'",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
