"""ONNX export (and, later, graph clean-up and TensorRT engine builds, imported lazily)."""

from m3export.export.onnx_export import OnnxArtifact, export_onnx

__all__ = ["OnnxArtifact", "export_onnx"]
