"""Export a cached model's full and skip programs to ONNX, build TensorRT engines, and load them back.

``to_onnx(cached, out_dir)`` writes ``full.onnx``, ``skip.onnx`` and ``manifest.json`` (``single_file=True``: one
``cached.onnx`` holding an ONNX ``If`` of the two); ``build_engines(out_dir)``
adds ``full.plan`` / ``skip.plan``; ``load(out_dir, backend)`` returns an :class:`ExportedTransformer` with the cached
module's call signature, Schedule and Session API.

The modules, by job: ``onnx_directory`` (``to_onnx``), ``onnx_export`` (one program to one ONNX file), ``axes``
(dynamic axis names, profile ranges, the tap-shape formula), ``signature`` (the manifest's ``runtime`` section),
``manifest`` (the manifest and its checks), ``fingerprint``, ``staging`` (atomic writes), ``engines``
(``build_engines``), ``tensorrt``, ``trt_check``, ``ort_backend``, ``loader`` (``load``) and ``runtime`` (the loaded runtime).
"""

from __future__ import annotations

from .axes import TapShape
from .engines import build_engines
from .loader import load, verify_export
from .manifest import ExportManifest, read_export_manifest
from .onnx_directory import cond_examples, program_examples, to_onnx
from .signature import forward_signature_from

__all__ = [
    "ExportManifest",
    "TapShape",
    "build_engines",
    "cond_examples",
    "forward_signature_from",
    "load",
    "program_examples",
    "read_export_manifest",
    "to_onnx",
    "verify_export",
]
