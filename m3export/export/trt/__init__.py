"""TensorRT-flavoured graphs, beside the ONNX export they rewrite.

Files: rewrites.py (the TensorRT-specific rewrites), graph_check.py (every node against the parser's
operator matrix, onnx_tensorrt_ops.json, or the plugin's signature), graph_diff.py (equal to the ORT
graph but for the MoE nodes and the rewrites), twin.py (the ORT twin: plugin nodes -> `ort` lowering),
engine.py (availability, optimisation profiles, one engine build).

Nothing imports `tensorrt` at module import time; engine builds import it inside functions.
"""
