"""ONNX Runtime runner (CPU by default). onnxruntime is imported lazily."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import onnxruntime as ort
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from m3export.errors import ArtifactError, RuntimeVersionError
from m3export.ops.lowering import get_lowering, lowering_names


class OrtRunner:
    """Runs one ONNX model with onnxruntime: a file, or serialized bytes whose external data lives in
    `external_data_dir` (e.g. an in-memory parity copy of a built graph)."""

    _half: set[str] | None = None  # the float16 inputs, found on first use

    def __init__(
        self,
        onnx_path: Path | bytes,
        providers: list[str] | None = None,
        num_threads: int = 0,
        external_data_dir: Path | None = None,
    ) -> None:

        where = external_data_dir if isinstance(onnx_path, bytes) else onnx_path
        self.name = f"ort:{Path(str(where)).name}"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if num_threads:
            opts.intra_op_num_threads = num_threads
        _no_private_weights(opts)
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

    @classmethod
    def from_pinned(cls, graph: Any, data: dict[str, Any], name: str) -> OrtRunner:
        """A runner on pinned files (`m3export.artifacts.PinnedFile`): the graph's bytes and its external
        data files (by location) read through the descriptors that were hashed, never by name again."""

        runner = cls.__new__(cls)
        runner.name = name
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        _no_private_weights(opts)
        maps = {loc: f.mapping() for loc, f in data.items()}
        buffers = [np.frombuffer(m, dtype=np.uint8) for m in maps.values()]
        try:
            if maps:
                opts.add_external_initializers_from_files_in_memory(
                    list(maps), buffers, [len(b) for b in buffers]
                )
            # ORT copies what it needs from the buffers while the session is created (its docs).
            runner.session = ort.InferenceSession(
                graph.read(), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises bare RuntimeErrors/Fail for unreadable models
            raise ArtifactError(
                f"{graph.path}: onnxruntime cannot load it: {str(err).splitlines()[0]}"
            ) from None
        finally:
            del buffers  # release the views before the maps are closed
            for m in maps.values():
                if not isinstance(m, bytes):
                    m.close()
        runner.input_names = [i.name for i in runner.session.get_inputs()]
        runner.output_names = [o.name for o in runner.session.get_outputs()]
        return runner

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"{self.name}: missing inputs {missing}")
        outs = self.session.run(self.output_names, {n: self._cast(n, feed[n]) for n in self.input_names})
        return {
            n: o.astype(np.float32) if o.dtype == np.float16 else o
            for n, o in zip(self.output_names, outs, strict=True)
        }

    def _cast(self, name: str, value: np.ndarray) -> np.ndarray:
        """A float32 array for a float16 input is cast (the chain's arrays are float32; torch_runner.py)."""
        if self._half is None:
            self._half = {i.name for i in self.session.get_inputs() if i.type == "tensor(float16)"}
        return value.astype(np.float16) if name in self._half and value.dtype == np.float32 else value


def _no_private_weights(opts: Any) -> None:
    """No prepacked copies of the MatMul weights: a session reads its weights straight from the
    memory-mapped external data and holds no private copy (measured on m3-small's text_1, 0.53 GiB of
    weights: +0.40 GiB of anonymous memory per session with prepacking, +0.01 GiB without), at some
    cost in GEMM speed. Every session m3export opens (build, check, run, generate) uses it, so a check
    reproduces the build's numbers exactly."""
    opts.add_session_config_entry("session.disable_prepacking", "1")


ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")


def installed_onnxruntime() -> tuple[str, list[str]]:
    """(the imported onnxruntime's version, every ONNX Runtime distribution installed)."""

    found = []
    for dist in ORT_DISTRIBUTIONS:
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            continue
    return str(onnxruntime.__version__), found


def onnxruntime_problem(valid: str, lowering: str, installed: str | None = None) -> str | None:
    """Why the installed onnxruntime must not run graphs of `lowering` valid on `valid` (a PEP 440
    specifier), or None. Graphs on a runtime outside their measured range compute wrong numbers
    silently (export-notes §4), so they are refused, naming the lowerings that would work."""

    have, dists = installed_onnxruntime()
    have = installed or have
    if installed is None and len(dists) > 1:
        return (
            f"several ONNX Runtime distributions are installed ({', '.join(dists)}); they share one module, "
            "so which one runs is undefined: uninstall all but one"
        )
    try:
        ok = Version(have) in SpecifierSet(valid)
    except (InvalidSpecifier, InvalidVersion):
        return f"onnxruntime {have}: cannot check it against the recorded range {valid!r}"
    if ok:
        return None
    others = []
    for name in lowering_names():
        rng = get_lowering(name).onnxruntime
        if name != lowering and rng and Version(have) in SpecifierSet(rng):
            others.append(f"export.moe: {name} (valid on onnxruntime {rng})")
    fix = f"; or rebuild with {' or '.join(others)}" if others else ""
    return (
        f"onnxruntime {have} is installed, but graphs with the {lowering!r} MoE lowering are valid on "
        f"onnxruntime {valid} only (outside it they compute wrong numbers without an error, "
        f"export-notes §4): pip install 'onnxruntime{valid}'{fix}"
    )


def require_onnxruntime(valid: str, lowering: str) -> None:
    """RuntimeVersionError (one line, exit 2) unless the installed onnxruntime may run these graphs."""
    problem = onnxruntime_problem(valid, lowering)
    if problem is not None:
        raise RuntimeVersionError(problem)
