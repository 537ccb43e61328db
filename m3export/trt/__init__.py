"""TensorRT target: the `m3::moe` plugin (signature, Python plugin), CPU-side graph checks, the ORT
twin of a TensorRT-flavoured graph and engine builds.

Nothing here imports `tensorrt` at module import time: `import m3export.trt` works on a CPU box.
TensorRT is imported inside the functions that need it (engine build, plugin registration, runner).
"""
