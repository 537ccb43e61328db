"""One backend registry for `run`, `generate` and `check`: a name, a probe that says why the backend
cannot run here (a typed error, exit 2, before any work) and an opener giving one runner per subgraph.

- `ort`:   onnxruntime (CPU) on each subgraph's verified ONNX bytes, refused when the installed
           onnxruntime lies outside the range the build's MoE lowering is valid on;
- `torch`: the eager model of the spec (seed or checkpoint) cut into the same stage wrappers;
- `trt`:   the TensorRT engines the build listed, with the plugins its manifest records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from m3export.errors import InputError
from m3export.export.trt.engine import tensorrt_unavailable
from m3export.model.factory import load_model
from m3export.runners.base import Runner
from m3export.runners.ort_runner import require_onnxruntime
from m3export.runners.torch_runner import TorchRunner
from m3export.runners.trt_runner import TrtRunner
from m3export.spec import M3Spec
from m3export.split.plan import SubgraphPlan
from m3export.split.subgraphs import build_stage


class SubgraphSource(Protocol):
    """What a backend needs of one built subgraph (m3export.artifacts.verify.SubgraphArtifact)."""

    @property
    def plan(self) -> SubgraphPlan: ...

    @property
    def root(self) -> Path: ...

    @property
    def name(self) -> str: ...

    @property
    def trt_entry(self) -> dict[str, Any] | None: ...

    def ort_runner(self) -> Runner: ...


@dataclass(frozen=True)
class BuildInfo:
    """What a backend needs of the build as a whole."""

    spec: M3Spec
    moe_lowering: str
    onnxruntime: str  # the version range the ONNX graphs are valid on


class BackendUnavailable(InputError):
    """The backend cannot run on this machine (not installed, no GPU): a usage error, exit 2."""


@dataclass(frozen=True)
class Backend:
    name: str
    product: str  # what must be installed, as the refusal names it
    summary: str
    probe: Callable[[], str | None]  # why this backend cannot run here; None when it can
    open: Callable[[Sequence[SubgraphSource], BuildInfo], dict[str, Runner]]


def _open_ort(subs: Sequence[SubgraphSource], info: BuildInfo) -> dict[str, Runner]:

    require_onnxruntime(info.onnxruntime, info.moe_lowering)
    return {s.name: s.ort_runner() for s in subs}


def _open_torch(subs: Sequence[SubgraphSource], info: BuildInfo) -> dict[str, Runner]:

    model = load_model(info.spec).eval()
    return {s.name: TorchRunner.for_plan(build_stage(model, s.plan), s.plan) for s in subs}


def _open_trt(subs: Sequence[SubgraphSource], info: BuildInfo) -> dict[str, Runner]:

    return {s.name: TrtRunner.from_entry(s.root, s.name, s.trt_entry) for s in subs}


def _probe_trt() -> str | None:

    return tensorrt_unavailable()


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("ort", "onnxruntime", "the ONNX subgraphs in onnxruntime (CPU)", lambda: None, _open_ort),
        Backend("torch", "torch", "the eager stage wrappers of the spec's model", lambda: None, _open_torch),
        Backend("trt", "TensorRT", "the TensorRT engines (needs an NVIDIA GPU)", _probe_trt, _open_trt),
    )
}


def get_backend(name: str, allowed: Sequence[str] | None = None) -> Backend:
    """The backend called `name` if usable here; InputError for an unknown name, BackendUnavailable
    (naming why and what to use instead) for one that cannot run on this machine."""
    names = list(allowed or BACKENDS)
    if name not in names:
        raise InputError(f"--backend must be one of {', '.join(names)}, got {name!r}")
    backend = BACKENDS[name]
    reason = backend.probe()
    if reason is not None:
        raise BackendUnavailable(
            f"--backend {name}: {backend.product} is not available ({reason}); use --backend ort"
        )
    return backend


def open_runners(
    name: str, subs: Sequence[SubgraphSource], info: BuildInfo, allowed: Sequence[str] | None = None
) -> dict[str, Runner]:
    """One runner per subgraph with the backend called `name` (see `get_backend`)."""
    return get_backend(name, allowed).open(subs, info)
