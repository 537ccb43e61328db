"""Runners with one interface, `infer(feed) -> outputs` (name -> numpy array), and what runs them.

Files: base.py (the `Runner` protocol), ort_runner.py (onnxruntime, incl. verified pinned files, and
the onnxruntime version-range check), torch_runner.py (eager stage wrappers), trt_runner.py (TensorRT
engines), registry.py (the one backend registry: `open_runners`), chain.py (planned subgraphs in
order through the KV cache), decode.py (greedy and MTP speculative decoding through a chain).
"""

from m3export.runners.base import Runner

__all__ = ["Runner"]
