"""ONNX Runtime runner (CPU by default). onnxruntime is imported lazily."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m3export.errors import ArtifactError


class OrtRunner:
    """Runs one ONNX file with onnxruntime."""

    def __init__(self, onnx_path: Path, providers: list[str] | None = None, num_threads: int = 0) -> None:
        import onnxruntime as ort

        self.name = f"ort:{Path(onnx_path).name}"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if num_threads:
            opts.intra_op_num_threads = num_threads
        try:
            self.session = ort.InferenceSession(
                str(onnx_path), sess_options=opts, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises bare RuntimeErrors/Fail for unreadable models
            raise ArtifactError(
                f"{onnx_path}: onnxruntime cannot load it: {str(err).splitlines()[0]}"
            ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"{self.name}: missing inputs {missing}")
        outs = self.session.run(self.output_names, {n: feed[n] for n in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))
