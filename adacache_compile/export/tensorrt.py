"""TensorRT engines for the full and skip programs: optimisation profiles, engine builds with polygraphy, and a
runtime that shares one activation buffer between engines and CUDA-graphs each (engine, shape).

``tensorrt`` and polygraphy's TensorRT backend are imported when used; profile derivation and memory planning are
plain Python. Practice followed (docs/architecture.md, "Export"): separate engines chosen on the host per step,
contexts with user-managed device memory pointing at one shared buffer (the programs never run at the same time), a
CUDA graph per engine and shape.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import InputMismatchError
from .manifest import Manifest
from .staging import publish, staging_dir

__all__ = [
    "PRECISIONS",
    "TrtProgram",
    "build_engine",
    "derive_profiles",
    "load_trt_programs",
    "plan_shared_activation_memory",
    "require_tensorrt",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
# TensorRT requires user-managed device memory aligned to the CUDA allocation granularity it queries (256 bytes).
_DEVICE_MEMORY_ALIGNMENT = 256
_INSTALL_HINT = (
    "pip install adacache-compile[tensorrt] (TensorRT >= 10 from NVIDIA's index) on a machine with a CUDA GPU"
)

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]


def require_tensorrt():
    """Import tensorrt and check for a CUDA device, or raise RuntimeError saying what to install."""
    try:
        import tensorrt
    except ImportError as e:
        raise RuntimeError(f"TensorRT engines need the tensorrt package: {_INSTALL_HINT}") from e
    if not torch.cuda.is_available():
        raise RuntimeError(f"TensorRT engines need a CUDA GPU, none is visible to torch: {_INSTALL_HINT}")
    return tensorrt


def _require_polygraphy_trt():
    require_tensorrt()
    try:
        from polygraphy.backend import trt as polygraphy_trt
    except ImportError as e:
        raise RuntimeError(f"building engines needs polygraphy: {_INSTALL_HINT}") from e
    return polygraphy_trt


def _axis_range(
    axis_name: str, ranges: Mapping[str, Mapping[str, int]], overrides: dict[str, Mapping[str, int] | None]
) -> tuple[int, int, int]:
    bounds = dict(ranges.get(axis_name, {}))
    for key, override in overrides.items():
        if override and axis_name in override:
            bounds[key] = override[axis_name]
    missing = [key for key in ("min", "opt", "max") if key not in bounds]
    if missing:
        raise ValueError(f"dynamic axis {axis_name!r} has no {'/'.join(missing)} in the manifest's profile ranges")
    low, opt, high = (int(bounds[key]) for key in ("min", "opt", "max"))
    if not 1 <= low <= opt <= high:
        raise ValueError(f"dynamic axis {axis_name!r}: need 1 <= min <= opt <= max, got {low}/{opt}/{high}")
    return low, opt, high


def derive_profiles(
    manifest_io_spec: Manifest,
    *,
    opt: Mapping[str, int] | None = None,
    min: Mapping[str, int] | None = None,  # min/opt/max: TensorRT's profile vocabulary, shadowing only in here
    max: Mapping[str, int] | None = None,
) -> dict[str, list[ProfileShapes]]:
    """One TensorRT optimisation profile per program: ``{program: [{input: (min_shape, opt_shape, max_shape)}]}``.

    A dynamic axis (named in the input's shape or in the program's ``dynamic_axes``) takes its min/opt/max from the
    manifest's ``profile_ranges``, overridden per axis name by ``min``/``opt``/``max``; static axes are fixed. Axes
    are named, so the deltas and ``tap_prev`` follow the model inputs' batch (and frames) ranges by construction.
    """
    overrides = {"min": min, "opt": opt, "max": max}
    profiles: dict[str, list[ProfileShapes]] = {}
    for program_name, program in manifest_io_spec.programs.items():
        profile: ProfileShapes = {}
        for tensor in program.inputs:
            named_axes = program.dynamic_axes.get(tensor.name, {})
            shapes: list[list[int]] = [[], [], []]
            for axis, size in enumerate(tensor.shape):
                axis_name = named_axes.get(axis, size if isinstance(size, str) else None)
                if axis_name is None and isinstance(size, int):
                    bounds = (size, size, size)
                elif axis_name is None:
                    raise ValueError(
                        f"program {program_name!r} input {tensor.name!r} axis {axis} is dynamic but has no axis name; "
                        "name it in dynamic_axes so that a profile range applies"
                    )
                else:
                    bounds = _axis_range(axis_name, manifest_io_spec.profile_ranges, overrides)
                for shape, bound in zip(shapes, bounds):
                    shape.append(bound)
            profile[tensor.name] = (tuple(shapes[0]), tuple(shapes[1]), tuple(shapes[2]))
        profiles[program_name] = [profile]
    return profiles


def plan_shared_activation_memory(engine_sizes: Mapping[str, int]) -> int:
    """Bytes of the one activation buffer that every engine's context uses: the programs run one at a time on one
    stream, so the largest requirement serves all. Rounded up to TensorRT's alignment."""
    for name, size in engine_sizes.items():
        if size < 0:
            raise ValueError(f"engine {name!r}: negative device memory size {size}")
    largest = max(engine_sizes.values(), default=0)
    return -(-largest // _DEVICE_MEMORY_ALIGNMENT) * _DEVICE_MEMORY_ALIGNMENT


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    profiles: Sequence[ProfileShapes],
    precision: str = "fp16",
    timing_cache: str | os.PathLike | None = None,
) -> Path:
    """Build a serialized TensorRT engine from ``onnx_path`` (polygraphy ``NetworkFromOnnxPath`` → ``CreateConfig``
    → ``EngineFromNetwork`` → ``SaveEngine``) and write it atomically to ``engine_path``. ``timing_cache`` is read if
    it exists and written back, so a second build (the skip program after the full one) reuses the tactic timings."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if not profiles:
        raise ValueError("build_engine needs at least one optimisation profile")
    polygraphy_trt = _require_polygraphy_trt()

    trt_profiles = []
    for shapes in profiles:
        profile = polygraphy_trt.Profile()
        for name, (low, opt, high) in shapes.items():
            profile.add(name, min=low, opt=opt, max=high)
        trt_profiles.append(profile)
    timing_cache = Path(timing_cache) if timing_cache is not None else None
    config = polygraphy_trt.CreateConfig(
        profiles=trt_profiles,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        load_timing_cache=str(timing_cache) if timing_cache is not None and timing_cache.exists() else None,
    )
    engine = polygraphy_trt.EngineFromNetwork(
        polygraphy_trt.NetworkFromOnnxPath(str(onnx_path)),
        config=config,
        save_timing_cache=str(timing_cache) if timing_cache is not None else None,
    )
    engine_path = Path(engine_path)
    with staging_dir(engine_path) as staging:
        polygraphy_trt.SaveEngine(engine, path=str(staging / engine_path.name))()
        publish(staging / engine_path.name, engine_path)
    logger.info("built %s (%s) from %s", engine_path, precision, onnx_path)
    return engine_path


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.int8: torch.int8,
        trt.uint8: torch.uint8,
        trt.bool: torch.bool,
    }
    return table[dtype]


def _device_memory_size(engine) -> int:
    # TensorRT 10.1 added the _v2 variant (int64); 10.0 has only the original.
    return int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)


def _runtime(trt):
    """A TensorRT runtime with the standard plugin library registered first: an engine that uses a plugin layer
    deserialises only when its creator is registered."""
    logger_ = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger_, "")
    return trt.Runtime(logger_)


def _output_allocator(trt, device):
    """TensorRT's ``IOutputAllocator`` for outputs whose shape is known only while the engine runs (the single-file
    engine's ``If``: its deltas are empty on a skip step): TensorRT asks for the memory and reports the shape. The
    class is made here because its base comes from the lazily imported ``tensorrt``."""

    class Allocator(trt.IOutputAllocator):
        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, torch.Tensor] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            buffer = self.buffers.get(tensor_name)
            if buffer is None or buffer.numel() < size:
                buffer = torch.empty(max(int(size), 1), dtype=torch.uint8, device=device)
                self.buffers[tensor_name] = buffer
            return buffer.data_ptr()

        def reallocate_output(self, tensor_name, memory, size, alignment):  # TensorRT before 10.0
            return self.reallocate_output_async(tensor_name, memory, size, alignment, None)

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(shape)

    return Allocator()


class TrtProgram:
    """One engine with one execution context whose activations live in memory the caller provides.

    ``program(*tensors)`` takes CUDA torch tensors in input order and returns CUDA torch tensors: outputs of one
    program (the full engine's deltas) feed another (the skip engine) with no host copy. With ``cuda_graphs`` the
    first call per input-shape set runs eagerly, the second captures a CUDA graph that later calls replay.
    """

    def __init__(
        self,
        engine_path: str | os.PathLike,
        *,
        runtime=None,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        cuda_graphs: bool = True,
    ):
        trt = require_tensorrt()
        self._trt = trt
        self.path = Path(engine_path)
        runtime = runtime or _runtime(trt)
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{self.path}: TensorRT could not deserialize the engine (built by another version?)")
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        engine_inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        engine_outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_names = list(input_names or engine_inputs)
        self.output_names = list(output_names or engine_outputs)
        if sorted(self.input_names) != sorted(engine_inputs) or sorted(self.output_names) != sorted(engine_outputs):
            raise InputMismatchError(
                f"{self.path.name}: engine I/O {engine_inputs} -> {engine_outputs} does not match "
                f"{self.input_names} -> {self.output_names}"
            )
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.device_memory_size = _device_memory_size(self.engine)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, tuple] = {}
        self._seen_shapes: set[tuple] = set()
        self._device_memory: torch.Tensor | None = None
        self._allocator = None  # created at the first output whose shape depends on input values

    def bind_device_memory(self, buffer: torch.Tensor) -> None:
        """Point the context's activations at ``buffer`` (a CUDA uint8 tensor of at least ``device_memory_size``
        bytes that the caller keeps alive and may share with other engines run on the same stream)."""
        if buffer.numel() * buffer.element_size() < self.device_memory_size:
            raise ValueError(f"{self.path.name}: needs {self.device_memory_size} bytes of device memory")
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(buffer.data_ptr(), buffer.numel() * buffer.element_size())
        else:
            self.context.device_memory = buffer.data_ptr()
        self._device_memory = buffer
        self._graphs.clear()  # captured graphs baked in the old address

    def _bind(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Bind inputs and outputs; an output whose shape depends on input values (-1 in its shape once the input
        shapes are set) goes to the output allocator and is None here (read by :meth:`_collect` after the run)."""
        for name, tensor in zip(self.input_names, tensors):
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(size < 0 for size in shape):
                if self._allocator is None:
                    self._allocator = _output_allocator(self._trt, self.device)
                self.context.set_output_allocator(name, self._allocator)
                outputs.append(None)
                continue
            output = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            self.context.set_tensor_address(name, output.data_ptr())
            outputs.append(output)
        return outputs

    def _collect(self, outputs: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        """The outputs of a run: the allocator's buffers viewed with the shapes TensorRT reported (cloned: the
        allocator reuses its buffers on the next run)."""
        collected = []
        for name, output in zip(self.output_names, outputs):
            if output is None:
                shape, dtype = self._allocator.shapes[name], self._dtypes[name]
                count = math.prod(shape)
                data = self._allocator.buffers[name][: count * torch.empty((), dtype=dtype).element_size()]
                output = data.view(dtype)[:count].reshape(shape).clone()
            collected.append(output)
        return tuple(collected)

    def _execute(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.path.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _prepare(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(tensors) != len(self.input_names):
            raise InputMismatchError(
                f"{self.path.name}: expected {len(self.input_names)} inputs {self.input_names}, got {len(tensors)}"
            )
        prepared = []
        for name, tensor in zip(self.input_names, tensors):
            if tensor.dtype != self._dtypes[name]:
                raise InputMismatchError(
                    f"{self.path.name}: input {name!r} has dtype {tensor.dtype}, engine expects {self._dtypes[name]}"
                )
            prepared.append(tensor.to(self.device).contiguous())
        return prepared

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._device_memory is None:
            raise RuntimeError(f"{self.path.name}: no device memory bound; use load_trt_programs or bind_device_memory")
        inputs = self._prepare(tensors)
        # A graph replays one control path: the values of boolean scalar inputs (the single-file engine's
        # ``compute``) choose it, so they are part of the key with the shapes.
        key = (tuple(tuple(t.shape) for t in inputs), _flags(tensors))
        if self.cuda_graphs and key in self._graphs:
            graph, static_inputs, static_outputs = self._graphs[key]
            for static, tensor in zip(static_inputs, inputs):
                static.copy_(tensor)
            graph.replay()
            # The static outputs are overwritten by the next replay; callers keep what they return.
            return tuple(output.clone() for output in static_outputs)
        if self.cuda_graphs and key in self._seen_shapes:
            self._capture(key, inputs)
            return self(*inputs)
        outputs = self._bind(inputs)
        self._execute()
        self._seen_shapes.add(key)
        if any(output is None for output in outputs):
            torch.cuda.current_stream(self.device).synchronize()  # the reported shapes are final after the run
            self.cuda_graphs = False  # memory allocated during the run cannot be baked into a graph
            return self._collect(outputs)
        return tuple(outputs)

    def _capture(self, key: tuple, inputs: Sequence[torch.Tensor]) -> None:
        static_inputs = [t.clone() for t in inputs]
        static_outputs = self._bind(static_inputs)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._execute()
        except RuntimeError as e:
            # Engines with data-dependent shapes (If, NonZero) sync with the host and cannot be captured.
            logger.warning("%s: CUDA graph capture failed, running without graphs: %s", self.path.name, e)
            self.cuda_graphs = False
            return
        self._graphs[key] = (graph, static_inputs, static_outputs)


def _flags(tensors: Sequence[torch.Tensor]) -> tuple[bool, ...]:
    """The values of the one-element boolean inputs (read on the host: the runtime makes them there)."""
    return tuple(bool(t.item()) for t in tensors if t.dtype == torch.bool and t.numel() == 1)


def load_trt_programs(
    engine_paths: Mapping[str, str | os.PathLike],
    *,
    io_names: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None,
    cuda_graphs: bool = True,
) -> dict[str, TrtProgram]:
    """Deserialize the engines and bind all contexts to one shared activation buffer sized by
    ``plan_shared_activation_memory``. ``io_names`` maps a program to its (input names, output names) in manifest
    order; without it the engine's order is used."""
    trt = require_tensorrt()
    runtime = _runtime(trt)
    io_names = io_names or {}
    programs = {}
    for name, path in engine_paths.items():
        input_names, output_names = io_names.get(name, (None, None))
        programs[name] = TrtProgram(
            path, runtime=runtime, input_names=input_names, output_names=output_names, cuda_graphs=cuda_graphs
        )
    size = plan_shared_activation_memory({name: p.device_memory_size for name, p in programs.items()})
    shared = torch.empty(size, dtype=torch.uint8, device=torch.device("cuda", torch.cuda.current_device()))
    for program in programs.values():
        program.bind_device_memory(shared)
    logger.info("TensorRT engines %s share %d bytes of activation memory", list(programs), size)
    return programs
