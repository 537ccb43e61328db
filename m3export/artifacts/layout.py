"""Where each file of an artifact directory lives (one place for every path a build writes and a
reader opens). `root` is the artifact directory. The ONNX Runtime graphs live together in
`root/onnx/` (`<name>.onnx`, its own weights `<name>.onnx.data`, and `shared/<sha256>.onnx.data`, the
weights several graphs use, stored once: ONNX and ONNX Runtime only resolve external data inside the
graph's own directory); a subgraph's other files (goldens, TensorRT graph and engine) live in
`root/<name>/`."""

from __future__ import annotations

from pathlib import Path

GOLDEN_KINDS = ("inputs", "outputs", "intermediates")
TIMING_CACHE = "trt_timing.cache"


def subgraph_dir(root: Path, name: str) -> Path:
    return root / name


def onnx_name(name: str) -> str:
    return f"{name}.onnx"


ONNX_DIR = "onnx"


def onnx_dir(root: Path) -> Path:
    return root / ONNX_DIR


def onnx_file(root: Path, name: str) -> Path:
    return onnx_dir(root) / onnx_name(name)


def data_name(name: str) -> str:
    """The external-data file of the ONNX Runtime graph."""
    return f"{name}.onnx.data"


def trt_onnx_name(name: str) -> str:
    return f"{name}.trt.onnx"


def rtx_engine_name(name: str) -> str:
    """The TensorRT-RTX engine of subgraph `name` (next to its `.trt.onnx`)."""
    return f"{name}.rtx.engine"


def engine_name(name: str) -> str:
    return f"{name}.engine"


def engine_file(root: Path, name: str) -> Path:
    return subgraph_dir(root, name) / engine_name(name)


def golden_name(kind: str) -> str:
    assert kind in GOLDEN_KINDS, kind
    return f"golden_{kind}.npz"


def golden_rel(name: str, kind: str) -> str:
    """A golden file relative to the artifact root, as the manifest lists it."""
    return f"{name}/{golden_name(kind)}"


def onnx_rel(name: str) -> str:
    return f"{ONNX_DIR}/{onnx_name(name)}"


def engine_rel(name: str) -> str:
    return f"{name}/{engine_name(name)}"


SEAL = "manifest.sha256"
SIGNATURE = "manifest.sig"
MANIFEST_FILES = ("manifest.json", SEAL, SIGNATURE)  # the top-level files of every build
