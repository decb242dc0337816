"""Capture a model call as a plain, functional fx GraphModule with flat tensor inputs and outputs.

``torch.export.export(strict=False)`` is the only tracer that handles the diffusers video transformers
(docs/architecture.md, "Findings that shaped it": ``symbolic_trace`` fails on all of them). The exported program is
functionalized (``run_decompositions({})``, so no in-place op survives to confuse dead-code elimination or the
program split) and rebuilt as a plain GraphModule whose parameters are ``get_attr`` nodes shared with the original
module: no input-flattening code, no guards node, no input hook. The call's pytree structure is kept beside it so a
drop-in module can flatten a call and rebuild the model's own output type (``Transformer2DModelOutput``, tuples,
...).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

from .errors import CaptureError, InputMismatchError

__all__ = ["InputSpec", "CallSignature", "Captured", "capture", "normalize_call", "call_signature"]

logger = logging.getLogger(__name__)

# Ops that only assert metadata; they carry no value and would pin tensors alive through DCE.
_ASSERT_OPS = {torch.ops.aten._assert_tensor_metadata.default}
if hasattr(torch.ops.aten, "_assert_scalar"):
    _ASSERT_OPS.add(torch.ops.aten._assert_scalar.default)


@dataclass(frozen=True)
class InputSpec:
    """Shape/dtype/device of one flat tensor input; ``None`` marks a dynamic dim, ``ranges`` its (min, max)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: torch.dtype
    device: torch.device
    ranges: dict[int, tuple[int, int | None]] = field(default_factory=dict)

    def describe(self) -> str:
        """``float32 [*, 4, *, *, *] on cpu``: what this input must be (``*`` a dynamic dim)."""
        shape = "[" + ", ".join("*" if d is None else str(d) for d in self.shape) + "]"
        return f"{str(self.dtype).removeprefix('torch.')} {shape} on {self.device.type}"

    def check(self, tensor: torch.Tensor) -> None:
        """Raise :class:`InputMismatchError` naming this input and what it must be when ``tensor`` cannot be served."""
        if not isinstance(tensor, torch.Tensor):
            self._fail(f"expected a tensor, got {type(tensor).__name__}")
        if tensor.dim() != len(self.shape):
            self._fail(f"expected rank {len(self.shape)}, got shape {list(tensor.shape)}")
        for dim, (want, size) in enumerate(zip(self.shape, tensor.shape)):
            if want is not None and want != size:
                self._fail(f"dim {dim} must be {want}, got shape {list(tensor.shape)}")
            if want is None and dim in self.ranges:
                lo, hi = self.ranges[dim]
                if size < lo or (hi is not None and size > hi):
                    self._fail(f"dim {dim} = {size} is outside the captured range [{lo}, {hi}]")
        if tensor.dtype != self.dtype:
            self._fail(f"expected dtype {self.dtype}, got {tensor.dtype}")
        if tensor.device.type != self.device.type:
            self._fail(f"expected device {self.device}, got {tensor.device}")

    def _fail(self, why: str):
        error = InputMismatchError(f"input {self.name!r}: {why}; the capture takes {self.describe()}")
        error.input_name = self.name  # lets a caller prefer a per-input mismatch over a call-structure one
        raise error


@dataclass(frozen=True)
class CallSignature:
    """What a capture depends on besides dynamic sizes: call structure and the non-tensor argument values."""

    in_spec: pytree.TreeSpec
    constants: tuple[tuple[int, Any], ...]
    tensor_leaves: tuple[int, ...]


@dataclass
class Captured:
    """A captured call: ``graph_module(*flat_tensors) -> tuple(flat_outputs)``."""

    graph_module: fx.GraphModule
    signature: CallSignature
    out_spec: pytree.TreeSpec
    input_specs: list[InputSpec]
    input_names: list[str]
    output_names: list[str]
    model_class: str

    def flatten(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The flat tensor inputs of a call, checked against the capture (raises before any program runs)."""
        leaves, sig = call_signature(self.model_forward_signature, args, kwargs)
        sig = self.host_side(sig)
        if sig != self.signature:
            raise InputMismatchError(
                f"{self.model_class}: this call's structure or non-tensor arguments differ from the captured call "
                f"({_describe_difference(self.signature, sig)})"
            )
        tensors = [leaves[i] for i in sig.tensor_leaves]
        for spec, tensor in zip(self.input_specs, tensors):
            spec.check(tensor)
        return tensors

    def host_side(self, signature: CallSignature) -> CallSignature:
        """``signature`` with the arguments this capture honours on the host set to their captured values (none
        here: a torch capture with another ``return_dict`` is captured anew; see the exported runtime)."""
        return signature

    def unflatten(self, outputs, args: tuple = (), kwargs: dict | None = None) -> Any:
        """The model's output for ``outputs`` (the programs' flat outputs) of the call ``args, kwargs``."""
        return pytree.tree_unflatten(list(outputs), self.out_spec)

    model_forward_signature: inspect.Signature | None = None


def normalize_call(forward_sig: inspect.Signature | None, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Bind a call to the forward signature so positional and keyword spellings of one call capture once."""
    if forward_sig is None:
        return args, dict(sorted(kwargs.items()))
    kinds = {p.kind for p in forward_sig.parameters.values()}
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return args, dict(sorted(kwargs.items()))
    try:
        bound = forward_sig.bind(*args, **kwargs)
    except TypeError as e:
        raise InputMismatchError(f"call does not match the model's forward signature {forward_sig}: {e}") from e
    bound.apply_defaults()
    out = {}
    for name, value in bound.arguments.items():
        if forward_sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(sorted(value.items()))
        else:
            out[name] = value
    return (), out


def call_signature(forward_sig, args, kwargs) -> tuple[list, CallSignature]:
    args, kwargs = normalize_call(forward_sig, args, kwargs)
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    tensor_leaves = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    constants = tuple((i, _hashable(leaf)) for i, leaf in enumerate(leaves) if not isinstance(leaf, torch.Tensor))
    return leaves, CallSignature(in_spec, constants, tensor_leaves)


def _hashable(value):
    """A call constant as compared between calls: itself when hashable; an array by dtype, shape and a hash of its
    bytes (a repr elides the middle of a large array: two different arrays would compare equal); else its repr."""
    try:
        hash(value)
        return value
    except TypeError:
        pass
    if all(hasattr(value, a) for a in ("dtype", "shape", "tobytes")):  # numpy arrays and their kind
        digest = hashlib.sha256(value.tobytes()).hexdigest()
        return f"<{type(value).__name__} {value.dtype} {tuple(value.shape)} sha256:{digest}>"
    return repr(value)


def _describe_difference(want: CallSignature, got: CallSignature) -> str:
    if want.in_spec != got.in_spec:
        return _describe_structure_difference(want.in_spec, got.in_spec)
    names = _leaf_names(want.in_spec, want.in_spec.num_leaves)
    diffs = [
        f"argument {names[i]!r}: captured {a!r}, got {b!r}"
        for (i, a), (_, b) in zip(want.constants, got.constants)
        if a != b
    ]
    return "; ".join(diffs) or "tensor leaves differ"


def _describe_structure_difference(want: pytree.TreeSpec, got: pytree.TreeSpec) -> str:
    """Which arguments' structure differs (``argument 'attention_kwargs': captured None, got a dict with keys
    ['scale']``), naming each by its keyword or position."""
    want_args, want_kwargs = pytree.tree_unflatten([None] * want.num_leaves, want)
    got_args, got_kwargs = pytree.tree_unflatten([None] * got.num_leaves, got)
    named = {**{f"args.{i}": a for i, a in enumerate(want_args)}, **want_kwargs}
    other = {**{f"args.{i}": a for i, a in enumerate(got_args)}, **got_kwargs}
    diffs = []
    for name in [*named, *(n for n in other if n not in named)]:
        if name not in other:
            diffs.append(f"argument {name!r}: captured, not given")
        elif name not in named:
            diffs.append(f"argument {name!r}: given, not captured")
        elif pytree.tree_structure(named[name]) != pytree.tree_structure(other[name]):
            diffs.append(f"argument {name!r}: captured {_shape_of(named[name])}, got {_shape_of(other[name])}")
    return "; ".join(diffs) or f"captured structure {want}, got {got}"


def _shape_of(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(value)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def _leaf_paths(spec: pytree.TreeSpec, num_leaves: int) -> list[tuple[str, ...]] | None:
    """The key path of each flat leaf of ``spec`` as strings; None when a node was registered without key paths
    (diffusers' ``BaseOutput``)."""
    dummy = pytree.tree_unflatten(list(range(num_leaves)), spec)
    try:
        with_paths = pytree.tree_flatten_with_path(dummy)[0]
    except ValueError:
        return None
    paths: list[tuple[str, ...]] = [()] * num_leaves
    for path, leaf in with_paths:
        paths[leaf] = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    return paths


def _leaf_names(in_spec: pytree.TreeSpec, num_leaves: int) -> list[str]:
    """Readable names of flat input leaves: ``hidden_states``, ``added_cond_kwargs.resolution``, ``args.0``."""
    paths = _leaf_paths(in_spec, num_leaves)
    if paths is None:
        return [f"input.{i}" for i in range(num_leaves)]
    # path[0] selects args ("0") or kwargs ("1")
    return [".".join((("args",) if path[0] == "0" else ()) + path[1:]) for path in paths]


def _leaf_names_out(out_spec: pytree.TreeSpec, num: int) -> list[str]:
    paths = _leaf_paths(out_spec, num)
    if paths is None:
        return [f"output.{i}" for i in range(num)]
    return ["output." + ".".join(path) if path else "output" for path in paths]


# What capture tries, in order, when asked for dynamic shapes: every dim of size >= 2, then the batch dims only, then
# none. Each later mode is a fallback for a model whose forward does host math on a size (numpy on a SymInt, ...).
CAPTURE_MODES = ("dynamic", "batch", "static")
_STATIC_DIMS = {"batch": "every dim but dim 0 (batch) is now static", "static": "every dim is now static"}


def _dynamic_shapes(args, kwargs, mode: str):
    def spec(leaf):
        if not isinstance(leaf, torch.Tensor) or mode == "static":
            return None
        # Dim.AUTO lets export keep a dim dynamic where the model allows it and specialise it elsewhere; sizes < 2
        # would be specialised anyway (0/1 specialisation), so they are left static.
        dims = range(min(1, leaf.dim())) if mode == "batch" else range(leaf.dim())
        return {d: Dim.AUTO for d in dims if leaf.shape[d] >= 2} or None

    if args:  # only for forward(*args): export's dynamic_shapes cannot name those inputs, so they stay static
        return None
    return {name: pytree.tree_map(spec, value, is_leaf=lambda x: x is None) for name, value in kwargs.items()}


def _failing_frame(error: BaseException) -> str:
    """Where in the model's code an export failure happened: the innermost frame outside torch (and numpy)."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    library_dirs = tuple(str(__import__(m).__path__[0]) for m in ("torch", "numpy") if _importable(m))
    user = [f for f in frames if not f.filename.startswith(library_dirs) and f.filename != __file__]
    frame = user[-1] if user else (frames[-1] if frames else None)
    if frame is None:
        return "unknown frame"
    return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _export(model, args, kwargs, mode: str):
    # torch.export's own pytree code prints this deprecation on every capture (nothing the user can act on); only
    # that one warning is silenced.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
        )
        exported = torch.export.export(
            model, args, kwargs, dynamic_shapes=_dynamic_shapes(args, kwargs, mode), strict=False
        )
        return exported.run_decompositions({})


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *, dynamic: bool = True) -> Captured:
    """Export ``model(*args, **kwargs)`` and rebuild it as a plain functional GraphModule over flat tensors.

    With ``dynamic``, a dynamic capture that fails is retried with only the batch dims dynamic, then static, with one
    warning naming the failing frame (a call with other static sizes later captures anew); ``CaptureError`` (an
    ``UnsupportedModelError``) only when the static capture fails too."""
    kwargs = dict(kwargs or {})
    forward_sig = _forward_signature(model)
    args, kwargs = normalize_call(forward_sig, args, kwargs)
    model_class = type(model).__name__
    first_failure = last_failure = None
    if dynamic and args:
        logger.info("forward() takes *args: capturing with static shapes")
    for mode in CAPTURE_MODES if dynamic and not args else ("static",):
        try:
            exported = _export(model, args, kwargs, mode)
        except Exception as e:  # torch.export raises many unrelated types; all mean "cannot capture this way"
            first_failure = first_failure or e
            last_failure = e
            logger.debug("%s: %s capture failed: %s", model_class, mode, e)
            continue
        if first_failure is not None:
            logger.warning(
                "%s: dynamic capture failed (%s: %s, at %s); captured with %s shapes: %s. A call with other sizes is "
                "captured anew.",
                model_class,
                type(first_failure).__name__,
                _first_line(first_failure),
                _failing_frame(first_failure),
                mode,
                _STATIC_DIMS[mode],
            )
        break
    else:
        e = last_failure
        raise CaptureError(
            f"{model_class}: torch.export.export(strict=False) failed with static shapes: {type(e).__name__}: "
            f"{_first_line(e)} (at {_failing_frame(e)}). adacache-compile needs a model that torch.export can "
            "capture; data-dependent Python control flow on tensor values inside forward() is the usual cause."
        ) from e

    graph_module = _unlift(model, exported)
    leaves, signature = call_signature(forward_sig, args, kwargs)
    names = _leaf_names(signature.in_spec, len(leaves))
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    input_specs, input_names = [], []
    for leaf_index, node in zip(signature.tensor_leaves, placeholders):
        input_names.append(names[leaf_index])
        input_specs.append(_tensor_spec(names[leaf_index], node.meta["val"], leaves[leaf_index], exported))
    output_node = graph_module.graph.output_node()
    num_outputs = len(output_node.args[0])
    output_names = _leaf_names_out(exported.call_spec.out_spec, num_outputs)
    captured = Captured(
        graph_module=graph_module,
        signature=signature,
        out_spec=exported.call_spec.out_spec,
        input_specs=input_specs,
        input_names=input_names,
        output_names=output_names,
        model_class=model_class,
        model_forward_signature=forward_sig,
    )
    logger.info(
        "captured %s: %d tensor inputs (%s), %d outputs, %d nodes",
        model_class,
        len(input_specs),
        ", ".join(f"{s.name}{list(s.shape)}" for s in input_specs),
        num_outputs,
        len(graph_module.graph.nodes),
    )
    return captured


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else ""


def _forward_signature(model) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _tensor_spec(name: str, fake: torch.Tensor, real: torch.Tensor, exported) -> InputSpec:
    shape, ranges = [], {}
    for dim, size in enumerate(fake.shape):
        if isinstance(size, torch.SymInt) and size.node.expr.is_number:
            size = int(size.node.expr)  # a SymInt that export specialised to a constant
        if isinstance(size, torch.SymInt):
            shape.append(None)
            expr = size.node.expr
            ranges[dim] = _captured_range(exported.range_constraints.get(expr))
        else:
            shape.append(int(size))
    return InputSpec(name, tuple(shape), real.dtype, real.device, ranges)


def _captured_range(value_range) -> tuple[int, int | None]:
    """The sizes a dynamic dim's capture serves: export's range for its symbol, whose bounds carry the model's own
    guards (``if frames > 8`` captured at 16 frames gives [9, inf]: a call at 4 frames must capture anew, not run the
    other branch's graph). The one exception is a lower bound of exactly 2, export's 0/1-specialisation rule for
    every dynamic dim, which is taken as 1 so that a batch-2 (CFG) capture serves batch 1; a model that branches on
    ``size > 1`` itself is the case this cannot tell apart (capture it at size 1, or static)."""
    if value_range is None:
        return 1, None
    lower = int(value_range.lower) if value_range.lower.is_Integer else 2
    upper = int(value_range.upper) if value_range.upper.is_Integer else None
    return (1 if lower <= 2 else lower), upper


def _unlift(model: torch.nn.Module, exported) -> fx.GraphModule:
    """Rebuild the exported graph with parameters/buffers as get_attr nodes and only user tensors as inputs."""
    sig = exported.graph_signature
    src = exported.graph_module.graph
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    constants = dict(exported.constants)
    root = torch.nn.Module()
    state = dict(exported.state_dict)
    for spec, node in zip(sig.input_specs, [n for n in src.nodes if n.op == "placeholder"]):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            value = state[spec.target] if spec.target in state else constants[spec.target]
            if spec.kind is InputKind.CONSTANT_TENSOR:
                value = value.detach()
            _set_attr(root, spec.target, value, model)
            new = graph.get_attr(spec.target)
            new.meta.update(node.meta)
            env[node] = new
        elif spec.kind is InputKind.USER_INPUT:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                new = graph.placeholder(node.name)
                new.meta.update(node.meta)
                env[node] = new
            else:
                env[node] = val  # specialised non-tensor argument: part of the CallSignature
        else:
            raise CaptureError(f"{type(model).__name__}: unsupported exported input kind {spec.kind} ({spec.target})")
    for node in src.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outs = node.args[0]
            for spec in sig.output_specs:
                if spec.kind is not OutputKind.USER_OUTPUT:
                    raise CaptureError(
                        f"{type(model).__name__}: forward() mutates {spec.kind.name} {spec.target!r}; "
                        "a cached model must be a pure function of its inputs"
                    )
            graph.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in outs))
            continue
        if node.op == "call_function" and node.target in _ASSERT_OPS:
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph_module = fx.GraphModule(root, graph, class_name=f"Captured{type(model).__name__}")
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


def _set_attr(root: torch.nn.Module, target: str, value, model: torch.nn.Module) -> None:
    """Attach ``value`` at dotted ``target`` under ``root``, reusing the model's own Parameter objects."""
    try:
        value = model.get_parameter(target)
    except AttributeError:
        try:
            value = model.get_buffer(target)
        except AttributeError:
            pass
    *path, leaf = target.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if isinstance(value, torch.nn.Parameter):
        mod.register_parameter(leaf, value)
    else:
        mod.register_buffer(leaf, value)
