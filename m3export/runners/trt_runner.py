"""TensorRT runner: one engine, `infer(feed) -> outputs` like the ORT runner. Needs TensorRT and a GPU.

The plugins the engine uses are registered first, from the manifest's plugin records (checked
against this m3export's plugin signatures). Inputs are numpy arrays; they are copied to the GPU
in the engine's input dtypes (floats cast, e.g. fp32 -> bf16) and outputs come back as numpy,
floating outputs as float32 (numpy has no bfloat16), like TorchRunner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m3export.errors import ArtifactError


class TrtRunner:
    """Runs one serialized TensorRT engine on the current CUDA device."""

    def __init__(
        self, engine_path: Path, plugin_records: Sequence[Mapping[str, Any]] = (), name: str | None = None
    ) -> None:
        from m3export.export.trt.engine import engine_io, tensorrt_unavailable
        from m3export.ops.trt_plugin import register_from_manifest

        engine_path = Path(engine_path)
        self.name = name or f"trt:{engine_path.name}"
        reason = tensorrt_unavailable()
        if reason is not None:
            raise ArtifactError(f"{engine_path}: cannot run a TensorRT engine here: {reason}")
        if not engine_path.is_file():
            raise ArtifactError(
                f"{engine_path}: no such engine (was the build run with targets [onnx, trt] on a GPU?)"
            )
        register_from_manifest(plugin_records, source=str(engine_path))

        import tensorrt as trt

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ArtifactError(
                f"{engine_path}: TensorRT cannot deserialize it (built by another TensorRT version or GPU?); rebuild"
            )
        self.context = self.engine.create_execution_context()
        self.input_names, self.output_names = engine_io(self.engine)

    @classmethod
    def from_entry(cls, root: Path, subgraph: str, entry: Mapping[str, Any] | None) -> TrtRunner:
        """The runner of `subgraph`'s engine in an artifact directory (`--backend trt`), with the
        plugins its manifest `trt` entry records; ArtifactError naming the reason when there is none."""
        if not entry:
            raise ArtifactError(
                f"{root}: subgraph {subgraph} has no TensorRT build; build with export.targets [onnx, trt]"
            )
        engine = entry.get("engine") or {}
        if engine.get("status") != "built" or not engine.get("path"):
            raise ArtifactError(
                f"{root}: subgraph {subgraph} has no engine ({engine.get('status')}: {engine.get('reason')}); "
                "rebuild on a machine with TensorRT and an NVIDIA GPU"
            )
        return cls(Path(root) / subgraph / engine["path"], entry.get("plugins") or [], name=f"trt:{subgraph}")

    def _torch_dtype(self, name: str) -> Any:
        import tensorrt as trt
        import torch

        table = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.bool: torch.bool,
            trt.uint8: torch.uint8,
        }
        return table[self.engine.get_tensor_dtype(name)]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"{self.name}: missing inputs {missing}")
        keep: list[torch.Tensor] = []  # device buffers must outlive the enqueue

        def bind(name: str, t: torch.Tensor) -> None:
            buf = t if t.numel() else torch.empty(1, dtype=t.dtype, device="cuda")  # never a null address
            keep.append(buf)
            self.context.set_tensor_address(name, buf.data_ptr())

        for name in self.input_names:
            t = (
                torch.from_numpy(np.ascontiguousarray(feed[name]))
                .to("cuda", self._torch_dtype(name))
                .contiguous()
            )
            self.context.set_input_shape(name, tuple(t.shape))
            bind(name, t)
        outputs: dict[str, torch.Tensor] = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.name}: output {name} has unresolved shape {shape}")
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            bind(name, outputs[name])
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed")
        stream.synchronize()
        return {n: (t.float() if t.is_floating_point() else t).cpu().numpy() for n, t in outputs.items()}
