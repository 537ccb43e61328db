"""ONNX Runtime runner (CPU by default). onnxruntime is imported lazily."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m3export.errors import ArtifactError


class OrtRunner:
    """Runs one ONNX model with onnxruntime: a file, or serialized bytes whose external data lives in
    `external_data_dir` (e.g. an in-memory parity copy of a built graph)."""

    def __init__(
        self,
        onnx_path: Path | bytes,
        providers: list[str] | None = None,
        num_threads: int = 0,
        external_data_dir: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        where = external_data_dir if isinstance(onnx_path, bytes) else onnx_path
        self.name = f"ort:{Path(str(where)).name}"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if num_threads:
            opts.intra_op_num_threads = num_threads
        if external_data_dir is not None:
            opts.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(external_data_dir)
            )
        model = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
        try:
            self.session = ort.InferenceSession(
                model, sess_options=opts, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises bare RuntimeErrors/Fail for unreadable models
            raise ArtifactError(f"{where}: onnxruntime cannot load it: {str(err).splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"{self.name}: missing inputs {missing}")
        outs = self.session.run(self.output_names, {n: feed[n] for n in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))
