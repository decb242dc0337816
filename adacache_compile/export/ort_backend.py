"""Run an exported program with onnxruntime: torch tensors in, torch tensors out."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import InputMismatchError

__all__ = ["OrtProgram", "default_providers"]

logger = logging.getLogger(__name__)

# Best first. TensorRT EP builds engines lazily per shape; CUDA EP is the dependable GPU choice.
_PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

_ORT_TO_TORCH_DTYPE = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(int16)": torch.int16,
    "tensor(int8)": torch.int8,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("the onnxruntime backend needs onnxruntime: pip install adacache-compile[onnx]") from e
    return onnxruntime


def default_providers() -> list[str]:
    """The available execution providers in order of preference."""
    available = set(_onnxruntime().get_available_providers())
    return [p for p in _PREFERRED_PROVIDERS if p in available]


class OrtProgram:
    """One ONNX program in an onnxruntime ``InferenceSession``.

    ``program(*tensors)`` takes the inputs positionally in ``input_names`` order and returns all outputs as a tuple of
    torch tensors. On the CUDA providers inputs and outputs are bound on the device (io binding), so the outputs of one
    program (the deltas of the full program) feed the next (the skip program) without host copies.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        session_options=None,
    ):
        ort = _onnxruntime()
        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(self.path), sess_options=session_options, providers=list(providers or default_providers())
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._input_dtypes = [_ORT_TO_TORCH_DTYPE.get(i.type) for i in self.session.get_inputs()]
        self._output_dtypes = [_ORT_TO_TORCH_DTYPE.get(o.type) for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.device = torch.device("cuda", _device_id(self.session)) if self._on_cuda else torch.device("cpu")
        logger.debug("%s: providers %s", self.path.name, self.providers)

    @property
    def _on_cuda(self) -> bool:
        return self.providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")

    def __repr__(self) -> str:
        return f"OrtProgram({str(self.path)!r}, providers={self.providers})"

    def _check(self, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(self.input_names):
            raise InputMismatchError(
                f"{self.path.name}: expected {len(self.input_names)} inputs {self.input_names}, got {len(tensors)}"
            )
        for name, tensor, dtype in zip(self.input_names, tensors, self._input_dtypes):
            if not isinstance(tensor, torch.Tensor):
                raise InputMismatchError(f"{self.path.name}: input {name!r} is a {type(tensor).__name__}, not a tensor")
            if dtype is not None and tensor.dtype != dtype:
                raise InputMismatchError(f"{self.path.name}: input {name!r} has dtype {tensor.dtype}, expected {dtype}")

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._check(tensors)
        if self._on_cuda:
            return self._run_io_binding(tensors)
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self.input_names, tensors)}
        return tuple(torch.from_numpy(o) for o in self.session.run(self.output_names, feeds))

    def _run_io_binding(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        binding = self.session.io_binding()
        # Keep the contiguous copies alive until run() returns: the binding holds raw pointers.
        inputs = [t.detach().to(self.device).contiguous() for t in tensors]
        for name, tensor in zip(self.input_names, inputs):
            binding.bind_input(
                name,
                "cuda",
                tensor.device.index or 0,
                _numpy_dtype(tensor.dtype),
                tuple(tensor.shape),
                tensor.data_ptr(),
            )
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device.index)
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return tuple(_ortvalue_to_torch(value) for value in outputs)


def _numpy_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        raise InputMismatchError(
            "bfloat16 inputs cannot be bound through numpy dtypes; export the program in fp16/fp32"
        )
    return torch.empty((), dtype=dtype).numpy().dtype


def _ortvalue_to_torch(value) -> torch.Tensor:
    """Device OrtValue → torch tensor without a host copy (DLPack), falling back to a host round trip."""
    try:
        return torch.utils.dlpack.from_dlpack(value.to_dlpack())
    except (AttributeError, RuntimeError):
        return torch.from_numpy(value.numpy()).to("cuda")


def _device_id(session) -> int:
    """The GPU the session's first provider runs on: its ``device_id`` option (``("CUDAExecutionProvider",
    {"device_id": 1})``), 0 by default; inputs are moved there and outputs bound there."""
    provider = session.get_providers()[0]
    options = session.get_provider_options().get(provider, {})
    return int(options.get("device_id", 0) or 0)
