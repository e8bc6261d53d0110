"""Exporters: the concrete spec's lowered model as a deployable artifact.

* :func:`export_onnx` — ONNX (dynamic batch/seq axes, metadata, parity gate, fp16/int8/
  int8-static/int4/auto precisions) -> :class:`ExportReport`.
* :func:`export_safetensors` / :func:`load_bundle` — ``model.safetensors`` + ``spec.yaml``.

Import rule: exporters import archir (never the reverse, except the CLI's lazy imports).
"""

from exporters.bundle import export_safetensors, load_bundle
from exporters.onnx_export import ExportReport, TensorInfo, export_onnx, read_metadata
from exporters.parity import ParityReport

__all__ = [
    "ExportReport",
    "ParityReport",
    "TensorInfo",
    "export_onnx",
    "export_safetensors",
    "load_bundle",
    "read_metadata",
]
