"""m3export: a configuration-driven compiler for MiniMax M3 (PyTorch -> ONNX / TensorRT) with parity gates."""

__version__ = "0.1.0"
