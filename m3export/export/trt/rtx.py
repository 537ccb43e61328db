"""TensorRT-RTX engines built ahead of time on CPU, each in a child process.

TensorRT-RTX (`tensorrt-rtx-cu13-libs` / `-bindings`, module `tensorrt_rtx_bindings`) builds engines
without a GPU. Three facts of the pinned wheels shape this module (measured, issue #16):

- the ONNX parser `dlopen`s an unversioned `libtensorrt_rtx.so`, but only `libtensorrt_rtx.so.1`
  ships; without it any plugin node aborts the process. `loader_dir()` keeps a private directory
  with that one symlink, and the child is started with it on `LD_LIBRARY_PATH` (the loader reads the
  variable at process start, another reason for a child);
- the library can abort the process (heap corruption with a plugin and `ComputeCapability.CURRENT`
  on a machine without a GPU), so every build runs in `python -m m3export.export.trt.rtx` and a dead
  child becomes one line naming the subgraph; compute capabilities are always explicit;
- fp32 `Attention` has no dedicated kernel; marking the parsed layer decomposable
  (`IAttention.decomposable = True`) lets the builder lower it. The attribute is set on the network,
  never written into the ONNX file (onnx.checker and ONNX Runtime reject it there).

Execution needs a GPU; without one `check` can still ask `Runtime.get_engine_validity` whether a
file is a well-formed engine (diagnostics 0) or not.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3export.export.trt.engine import mark_attention_decomposable
from m3export.spec.export import RTX_DEFAULT_CAPABILITIES

RTX_MODULE = "tensorrt_rtx_bindings"
RTX_VERSION = "1.7.1.116"  # the pinned wheels (pyproject `trt-rtx` extra, make setup)
INSTALL_HINT = (
    f"pip install 'tensorrt-rtx-cu13-libs=={RTX_VERSION}' 'tensorrt-rtx-cu13-bindings=={RTX_VERSION}' "
    "(or make setup)"
)
BUILD_TIMEOUT_S = 600


class RtxBuildError(RuntimeError):
    """The parser or builder refused the graph, or the child process died: one line, with the name."""


def rtx_unavailable() -> str | None:
    """None when the TensorRT-RTX wheels are installed at the pinned version, else why not (+ hint)."""
    if importlib.util.find_spec(RTX_MODULE) is None or importlib.util.find_spec("tensorrt_rtx_libs") is None:
        return f"TensorRT-RTX is not installed; {INSTALL_HINT}"
    try:
        version = importlib.metadata.version("tensorrt-rtx-cu13-bindings")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    if version != RTX_VERSION:
        return f"TensorRT-RTX {version} is installed, m3export is pinned to {RTX_VERSION}; {INSTALL_HINT}"
    return None


def _libs_dir() -> Path:
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    assert spec is not None and spec.submodule_search_locations is not None
    return Path(next(iter(spec.submodule_search_locations)))


def loader_dir() -> Path:
    """A private directory holding `libtensorrt_rtx.so` -> the wheel's `libtensorrt_rtx.so.1`.

    It lives in the environment (`<sys.prefix>/lib/m3export-trt-rtx`, which make setup creates) or,
    where that is not writable, in the user's temp directory. Never in a system path.
    """
    target = _libs_dir() / "libtensorrt_rtx.so.1"
    for base in (Path(sys.prefix) / "lib", Path(tempfile.gettempdir()) / f"m3export-{os.getuid()}"):
        link = base / "m3export-trt-rtx" / "libtensorrt_rtx.so"
        try:
            if link.is_symlink() and Path(os.readlink(link)) == target:
                return link.parent
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(f".{link.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            tmp.replace(link)
            return link.parent
        except OSError:
            continue
    raise RtxBuildError(f"cannot create the libtensorrt_rtx.so link next to {sys.prefix} or in the temp dir")


@dataclass(frozen=True)
class RtxEngine:
    """A serialized TensorRT-RTX engine and how it was built."""

    path: Path
    precision: str
    profile: dict[str, list[list[int]]]
    compute_capabilities: tuple[str, ...]
    version: str
    build_seconds: float
    decomposed_attention: int  # Attention layers marked decomposable (fp32 has no dedicated kernel)


def _run_child(request: Mapping[str, Any], what: str, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(loader_dir()), env.get("LD_LIBRARY_PATH")) if p)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "m3export.export.trt.rtx"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RtxBuildError(f"{what}: TensorRT-RTX did not finish within {timeout:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        reply: dict[str, Any] = json.loads(lines[-1])
        if reply.get("error"):
            raise RtxBuildError(f"{what}: {reply['error']}")
        return reply
    tail = " | ".join(ln.strip() for ln in proc.stderr.splitlines()[-3:] if ln.strip())
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    raise RtxBuildError(f"{what}: the TensorRT-RTX child process died ({how}): {tail or 'no output'}")


def build_rtx_engine(
    onnx_path: Path,
    engine_path: Path,
    shapes: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]],
    *,
    subgraph: str,
    precision: str,
    compute_capabilities: Sequence[str] = RTX_DEFAULT_CAPABILITIES,
    optimization_level: int = 3,
    workspace_gib: float | None = None,
    timeout: float = BUILD_TIMEOUT_S,
) -> RtxEngine:
    """Parse `onnx_path` and build one engine in a child process; RtxBuildError naming `subgraph`."""
    start = time.perf_counter()
    tmp = engine_path.with_name(f".{engine_path.name}.partial")
    request = {
        "command": "build",
        "onnx": str(onnx_path),
        "engine": str(tmp),
        "shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
        "compute_capabilities": list(compute_capabilities),
        "optimization_level": optimization_level,
        "workspace_gib": workspace_gib,
    }
    try:
        reply = _run_child(request, f"TensorRT-RTX engine of {subgraph}", timeout)
        tmp.replace(engine_path)
    finally:
        tmp.unlink(missing_ok=True)
    return RtxEngine(
        path=engine_path,
        precision=precision,
        profile={k: [list(s) for s in v] for k, v in shapes.items()},
        compute_capabilities=tuple(compute_capabilities),
        version=str(reply["version"]),
        build_seconds=time.perf_counter() - start,
        decomposed_attention=int(reply["decomposed_attention"]),
    )


# EngineInvalidityDiagnostics bits that say the file itself is wrong; the others (compute capability,
# driver, runtime, GPU memory, CUDA errors) describe this machine, which has no GPU.
FILE_DIAGNOSTICS = {"VERSION_MISMATCH": 1, "MALFORMED_ENGINE": 32}


@dataclass(frozen=True)
class EngineHeader:
    """What `Runtime.get_engine_validity` says of one engine file, without a GPU."""

    path: Path
    validity: str  # VALID / SUBOPTIMAL / INVALID (INVALID on a machine without a GPU)
    diagnostics: int

    @property
    def file_problems(self) -> list[str]:
        return [name for name, bit in FILE_DIAGNOSTICS.items() if self.diagnostics & bit]


def engine_headers(paths: Sequence[Path], timeout: float = 120) -> list[EngineHeader]:
    """The header verdict of each engine, from one child process."""
    reply = _run_child({"command": "validity", "engines": [str(p) for p in paths]}, "engine check", timeout)
    return [EngineHeader(p, str(v), int(d)) for p, (v, d) in zip(paths, reply["validity"], strict=True)]


# ---- the child process: `python -m m3export.export.trt.rtx` reads one JSON request on stdin ----


def _logger(trt: Any) -> Any:
    class Collecting(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(" ".join(msg.split()))

    return Collecting()


def _child_build(trt: Any, req: Mapping[str, Any]) -> dict[str, Any]:
    from m3export.ops.trt_rtx_plugin import register_rtx_plugin

    logger = _logger(trt)
    register_rtx_plugin(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(req["onnx"]):
        errors = "; ".join(" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors))
        return {"error": f"the TensorRT-RTX ONNX parser refused the graph: {errors or logger.errors}"}
    decomposed = mark_attention_decomposable(trt, network)
    config = builder.create_builder_config()
    config.builder_optimization_level = int(req["optimization_level"])
    if req.get("workspace_gib"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(req["workspace_gib"] * (1 << 30)))
    caps = req["compute_capabilities"]
    config.num_compute_capabilities = len(caps)
    for i, cc in enumerate(caps):
        config.set_compute_capability(getattr(trt.ComputeCapability, cc), i)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in req["shapes"].items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        return {"error": f"TensorRT-RTX could not build an engine: {'; '.join(logger.errors[-3:])}"}
    Path(req["engine"]).write_bytes(bytes(serialized))
    return {"version": trt.__version__, "decomposed_attention": decomposed}


def _child_validity(trt: Any, req: Mapping[str, Any]) -> dict[str, Any]:
    runtime = trt.Runtime(_logger(trt))
    out = []
    for path in req["engines"]:
        validity, diagnostics = runtime.get_engine_validity(Path(path).read_bytes())
        out.append([validity.name, int(diagnostics)])
    return {"validity": out}


def _child_main() -> int:
    req = json.loads(sys.stdin.read())
    import tensorrt_rtx_bindings as trt

    handler = {"build": _child_build, "validity": _child_validity}[req["command"]]
    try:
        reply = handler(trt, req)
    except Exception as err:  # reported as one line by the parent
        reply = {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"}
    print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
