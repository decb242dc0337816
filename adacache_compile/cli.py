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

from .serving import command as serve_command

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


def _model_and_inputs(args) -> tuple[object, dict, dict]:
    """``(model, example inputs, where they came from)`` for ``--model`` or a MODEL_SPEC (adacache_compile.model_spec)."""
    if args.model_spec is None:
        print(f"building {args.model} ...", file=sys.stderr)
        model, example_inputs = build_model(args.model)
        return model, example_inputs, {"model": {"kind": "builtin", "name": args.model}, "inputs": "builtin"}
    from . import model_spec

    dtype = model_spec.parse_dtype(args.dtype)
    print(f"loading {args.model_spec} ...", file=sys.stderr)
    source = model_spec.load_model_spec(args.model_spec, transformer=args.transformer, device=args.device, dtype=dtype)
    if args.inputs is not None:
        inputs, how = model_spec.inputs_from_safetensors(args.inputs, device=args.device), f"safetensors {args.inputs}"
    elif args.shape:
        inputs, how = (
            model_spec.inputs_from_shapes(args.shape, device=args.device, dtype=dtype),
            "shapes " + " ".join(args.shape),
        )
    elif args.prompt is not None:
        pipe = source.pipeline
        if args.pipeline is not None:  # another pipeline directory, around the MODEL_SPEC's model
            pipe = model_spec.load_pipeline(
                args.pipeline, device=args.device, dtype=dtype, **{args.transformer: source.model}
            )
        if pipe is None:
            raise SystemExit("error: --prompt records the pipeline's first transformer call: give a pipeline directory")
        print("running the pipeline up to its first transformer call ...", file=sys.stderr)
        call = {"prompt": args.prompt, "num_inference_steps": args.steps, "output_type": "latent"}
        call.update(_pipeline_args(args.pipeline_arg))
        call.update(
            {
                k: v
                for k, v in (("height", args.height), ("width", args.width), ("num_frames", args.num_frames))
                if v is not None
            }
        )
        inputs, how = model_spec.record_first_call(pipe, args.transformer, **call), f"pipeline call {call}"
    elif source.example_inputs is not None:
        inputs, how = dict(source.example_inputs), "factory"
    else:
        raise SystemExit(
            f"error: {args.model_spec}: no example inputs; pass --prompt (a pipeline's first transformer call), "
            "--inputs FILE.safetensors or --shape NAME=D0,D1,..."
        )
    if "return_dict" in _forward_parameters(source.model):
        inputs.setdefault("return_dict", False)
    return source.model, inputs, {"model": source.description, "inputs": how}


def _pipeline_args(items: list[str]) -> dict:
    """``NAME=JSON`` items (``max_sequence_length=8``, ``negative_prompt="blurry"``) as pipeline call arguments."""
    import json

    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: --pipeline-arg {item!r}: expected NAME=JSON, e.g. max_sequence_length=226")
        try:
            values[name] = json.loads(text)
        except json.JSONDecodeError:
            values[name] = text  # a bare string
    return values


def _forward_parameters(model) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _optimize(args):
    from .runtime import optimize

    model, example_inputs, source = _model_and_inputs(args)
    print("capturing and planning (torch.export + passes) ...", file=sys.stderr)
    dynamic = not getattr(args, "no_dynamic", False)
    cached = optimize(model, _config(args.config), example_inputs=example_inputs, dynamic=dynamic)
    cached.example_source = source
    return cached


# --- inspect ---------------------------------------------------------------------------------------------------------
MODEL_SPEC_HELP = (
    "your model: a save_pretrained directory, a pipeline directory or package.module:factory (default: --model)"
)


def _add_model_arguments(parser: argparse.ArgumentParser, *, positional: bool = True) -> None:
    if positional:
        parser.add_argument("model_spec", nargs="?", default=None, help=MODEL_SPEC_HELP)
    source = parser.add_argument_group("MODEL_SPEC and its example inputs")
    source.add_argument("--transformer", default="transformer", help="of a pipeline directory (or transformer_2)")
    source.add_argument("--inputs", type=Path, default=None, help="a safetensors file of named example inputs")
    source.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...[:DTYPE]", help="random input")
    source.add_argument("--prompt", default=None, help="record the pipeline's first transformer call on this prompt")
    source.add_argument("--pipeline", default=None, help="pipeline directory for --prompt (default: MODEL_SPEC)")
    source.add_argument("--height", type=int, default=None)
    source.add_argument("--width", type=int, default=None)
    source.add_argument("--num-frames", type=int, default=None)
    source.add_argument("--steps", type=int, default=2, help="num_inference_steps of the recorded pipeline call")
    source.add_argument(
        "--pipeline-arg", action="append", default=[], metavar="NAME=JSON", help="another pipeline call argument"
    )
    source.add_argument("--device", default="cpu")
    source.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as saved)")
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
    parser.add_argument(
        "--testbed",
        default="latte-shapes",
        help="a bundled testbed: latte-shapes (default; moving shapes, Latte, DDIM) or ltx-textures (textures under a "
        "moving camera, LTX-Video, flow matching), or a testbed checkpoint directory",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_demo(args) -> int:
    """Uncached vs AdaCache on a bundled testbed model."""
    from .testbed.demo import run_demo

    run_demo(args.out, num_steps=args.steps, progress=not args.no_progress, testbed=args.testbed)
    return 0


# --- calibrate -------------------------------------------------------------------------------------------------------
def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    from .calibration import KINDS, SEARCH_ORDERS

    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--target",
        nargs="+",
        default=["fast", "slow"],
        help="compute fractions (0.28), fast / slow (0.28 / 0.45) or preset names (fast-50+f2: that preset's measured "
        "compute, the preset itself a candidate); the testbed takes several, --pipeline one",
    )
    parser.add_argument(
        "--testbed",
        default=None,
        help="bundled testbed name (latte-shapes, the default, or ltx-textures) or checkpoint directory",
    )
    parser.add_argument(
        "--videos", type=int, default=None, help="calibration videos, spread over the labels (default: all 12)"
    )
    parser.add_argument(
        "--forecast-order",
        type=int,
        nargs="+",
        default=None,
        choices=SEARCH_ORDERS,
        help="pin the forecast order(s) searched (default: all)",
    )
    parser.add_argument(
        "--policy", nargs="+", default=None, choices=KINDS, help="pin what decides the steps (default: all)"
    )
    parser.add_argument(
        "--decision-metric",
        default="change",
        choices=("change", "forecast"),
        help="the AdaCache rule's metric; 'forecast' needs one --forecast-order and --policy adacache",
    )
    parser.add_argument("--compare", nargs="*", default=[], help="presets to measure for the report")
    parser.add_argument(
        "--tolerance", type=float, default=None, help="measured fraction within target +- this (default 0.5 / steps)"
    )
    parser.add_argument("--max-candidates", type=int, default=6, help="candidates measured first, one per group")
    parser.add_argument("--max-evaluations", type=int, default=12, help="measurements per target, refinements too")
    parser.add_argument(
        "--out",
        help="testbed: write the report (configs, candidates, recorded scalars, cost) as JSON; --pipeline: write the "
        "calibrated AdaCacheConfig (AdaCacheConfig.from_json reads it)",
    )
    parser.add_argument("--no-progress", action="store_true")
    own = parser.add_argument_group("your own pipeline (instead of the bundled testbed)")
    own.add_argument("--pipeline", default=None, help="a pipeline directory written by save_pretrained")
    own.add_argument("--prompt", action="append", default=[], help="a calibration prompt (repeatable)")
    own.add_argument("--prompts-file", type=Path, default=None, help="calibration prompts, one per line")
    own.add_argument("--negative-prompt", default=None)
    own.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per prompt (default 0)")
    own.add_argument("--height", type=int, default=None)
    own.add_argument("--width", type=int, default=None)
    own.add_argument("--num-frames", type=int, default=None)
    own.add_argument("--guidance-scale", type=float, default=None)
    own.add_argument("--device", default="cpu")
    own.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as saved)")
    own.add_argument(
        "--pipeline-arg", action="append", default=[], metavar="NAME=JSON", help="another pipeline call argument"
    )
    own.add_argument("--report", type=Path, default=None, help="also write the calibration's candidates as JSON")


def _run_calibrate_pipeline(args) -> int:
    import json

    from .model_spec import load_pipeline, parse_dtype
    from .pipeline_calibration import calibrate

    prompts = list(args.prompt)
    if args.prompts_file is not None:
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        print("error: --pipeline needs --prompt or --prompts-file", file=sys.stderr)
        return 2
    if len(args.target) != 1:
        print("error: --pipeline calibrates one --target", file=sys.stderr)
        return 2
    target = _parse_target(args.target[0])
    pipe = load_pipeline(args.pipeline, device=args.device, dtype=parse_dtype(args.dtype))
    optional = {
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt,
    }
    calibration = calibrate(
        pipe,
        prompts,
        num_inference_steps=args.steps,
        target=target,
        seeds=args.seeds,
        forecast_order=args.forecast_order,
        policy=args.policy,
        decision_metric=args.decision_metric,
        progress=not args.no_progress,
        report=True,
        max_candidates=args.max_candidates,
        max_evaluations=args.max_evaluations,
        **{k: v for k, v in optional.items() if v is not None},
        **_pipeline_args(args.pipeline_arg),
    )
    winner = calibration.winner
    missed = "" if calibration.landed else " (no candidate landed on the target: the nearest)"
    print(
        f"{args.pipeline}: {winner.name}, measured compute {winner.measured_fraction:.3f} (target "
        f"{calibration.target:.3f}){missed}, error {winner.error:.2f}; cost "
        f"{calibration.cost['uncached_generations']} uncached + {calibration.cost['cached_generations']} cached "
        "generations"
    )
    if args.out:
        calibration.config.to_json(args.out)
        print(f"wrote {args.out}")
    if args.report is not None:
        args.report.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n")
    return 0


def _parse_target(text: str) -> str | float:
    """A --target: a compute fraction, or a name (fast, slow, a preset) kept as text."""
    try:
        return float(text)
    except ValueError:
        return text


def _run_calibrate(args) -> int:
    """The least measured error at a compute: the testbed, or --pipeline."""
    from .calibration import CalibrationError
    from .testbed.calibrate import CALIBRATION_VIDEOS, calibrate_testbed

    if args.pipeline is not None:
        try:
            return _run_calibrate_pipeline(args)
        except (CalibrationError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    count = len(CALIBRATION_VIDEOS)
    if args.videos is not None and not 1 <= args.videos <= count:
        print(f"error: --videos {args.videos}: expected 1..{count}", file=sys.stderr)
        return 2
    if args.decision_metric != "change":
        print("error: the testbed calibration searches with the 'change' metric", file=sys.stderr)
        return 2
    try:
        calibrate_testbed(
            args.steps,
            args.target,
            testbed=args.testbed,
            videos=args.videos,
            out=args.out,
            progress=not args.no_progress,
            forecast_orders=args.forecast_order,
            policies=args.policy,
            compare=args.compare,
            tolerance=args.tolerance,
            max_candidates=args.max_candidates,
            max_evaluations=args.max_evaluations,
        )
    except (CalibrationError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# --- export ----------------------------------------------------------------------------------------------------------
def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_spec", nargs="?", default=None, help=MODEL_SPEC_HELP)
    parser.add_argument("out_dir", type=Path, help="export directory (replaced atomically)")
    _add_model_arguments(parser, positional=False)
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    parser.add_argument("--no-dynamic", action="store_true", help="export static shapes (the example's)")
    parser.add_argument(
        "--single-file",
        action="store_true",
        help="one cached.onnx holding an ONNX If of the two programs (default: full.onnx and skip.onnx)",
    )


def _run_export(args) -> int:
    """Export the full and skip programs to ONNX."""
    from .export import to_onnx

    cached = _optimize(args)
    what = "one conditional program (cached.onnx)" if args.single_file else "full and skip programs"
    print(f"exporting {what} to {args.out_dir} ...", file=sys.stderr)
    to_onnx(
        cached,
        args.out_dir,
        dynamic=not args.no_dynamic,
        opset=args.opset,
        example_source=cached.example_source,
        single_file=args.single_file,
    )
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
    parser.add_argument(
        "model_spec", nargs="?", default=None, help="export this model to OUT_DIR first: " + MODEL_SPEC_HELP
    )
    parser.add_argument("out_dir", type=Path, help="export directory written by `export`")
    _add_model_arguments(parser, positional=False)
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset of the export (with MODEL_SPEC)")
    parser.add_argument("--no-dynamic", action="store_true", help="export static shapes (with MODEL_SPEC)")
    parser.add_argument("--precision", type=_precision, default="fp16", help="fp32, fp16 (default) or bf16")
    parser.set_defaults(single_file=False)  # engines are built from the two programs (MODEL_SPEC exports them)
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
    if args.model_spec is not None:
        _run_export(args)
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
    Command("serve", serve_command.add_arguments, serve_command.run, "serve"),
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
