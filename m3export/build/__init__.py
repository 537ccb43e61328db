"""`m3export build`: a short driver over a declared table of parity steps.

Files: driver.py (`build()`: validate, lock, prepare, export, run the steps, record, publish),
prepare.py (the eager side every step shares, computed once), export_step.py (per subgraph: export or
reuse, goldens, sessions, TensorRT flavour), steps.py (the `StepDef` table: split, onnx, routing,
end_to_end, decode, generate), cache.py (content keys and reuse of a previous build), trt_step.py /
trt_result.py (the TensorRT target of one subgraph and its record).
"""

from m3export.build.driver import BuildResult, build

__all__ = ["BuildResult", "build"]
