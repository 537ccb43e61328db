"""ONNX export and graph passes.

Files: onnx_export.py (`export_onnx`: torch.onnx dynamo export with named I/O, dynamic axes, external
data, folded lowering weights, no stack traces); trt/ (TensorRT-flavoured graphs: rewrites, the check
against the parser's operator matrix, the diff against the ORT graph, the ORT twin, engine builds).
"""

from m3export.export.onnx_export import OnnxArtifact, export_onnx

__all__ = ["OnnxArtifact", "export_onnx"]
