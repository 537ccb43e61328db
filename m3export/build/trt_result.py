"""`TrtResult`: what the TensorRT target did for one subgraph, and its manifest entry."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from m3export.export.trt.engine import EngineArtifact
from m3export.export.trt.rtx import RtxEngine
from m3export.ops.trt_plugin import plugin_record
from m3export.ops.trt_rtx_plugin import rtx_plugin_record
from m3export.ops.trt_signature import M3_MOE_PLUGIN
from m3export.parity.compare import ParityReport

if TYPE_CHECKING:
    from m3export.export.trt.graph_check import TrtGraphReport
    from m3export.export.trt.graph_diff import GraphDiff
    from m3export.export.trt.rewrites import Rewrite

Golden = Mapping[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]  # case -> (feed, eager outputs)
EngineStatus = Literal["built", "skipped", "failed", "not run"]


@dataclass
class TrtResult:
    """What the TensorRT target did for one subgraph."""

    subgraph: str
    precision: str
    profile: dict[str, list[list[int]]]
    onnx_path: Path | None = None
    twin_path: Path | None = None
    node_counts: dict[str, int] = field(default_factory=dict)
    rewrites: list[Rewrite] = field(default_factory=list)
    graph_check: TrtGraphReport | None = None
    graph_diff: GraphDiff | None = None
    reports: list[ParityReport] = field(default_factory=list)  # twin / engine parity and failed checks
    skips: list[ParityReport] = field(default_factory=list)  # steps that could not run here (the engine)
    engine: EngineArtifact | None = None
    engine_status: EngineStatus = "not run"
    engine_reason: str | None = None
    rtx_engine: RtxEngine | None = None  # the TensorRT-RTX target (`trt_rtx`)
    rtx_status: EngineStatus = "not run"
    rtx_reason: str | None = None
    timing_cache: Path | None = None
    files: dict[str, str] = field(default_factory=dict)  # name (relative to the subgraph dir) -> sha256
    seconds: float = 0.0

    @property
    def checks_passed(self) -> bool:
        """The CPU checks (graph check, diff, twin parity) and, if built, the engine checks."""
        return self.onnx_path is not None and all(r.passed for r in self.reports)

    @property
    def status(self) -> Literal["pass", "fail", "skipped"]:
        """pass: every asked-for engine built and every check passed; skipped: checks passed, an
        engine could not be built here; else fail."""
        engines = [s for s in (self.engine_status, self.rtx_status) if s != "not run"]
        if not self.checks_passed or "failed" in engines:
            return "fail"
        return "pass" if engines and all(s == "built" for s in engines) else "skipped"

    def manifest_entry(self) -> dict[str, Any]:
        """The `trt` section of this subgraph in manifest.json."""

        eng, rtx = self.engine, self.rtx_engine
        return {
            "status": self.status,
            "precision": self.precision,
            "profile": self.profile,
            "onnx": self.onnx_path.name if self.onnx_path else None,
            "twin": self.twin_path.name if self.twin_path else None,
            "node_counts": self.node_counts,
            "rewrites": [r.to_json() for r in self.rewrites],
            "graph_check": self.graph_check.to_json() if self.graph_check else None,
            "graph_diff": self.graph_diff.to_json() if self.graph_diff else None,
            "engine": {
                "status": self.engine_status,
                "reason": self.engine_reason,
                "path": eng.path.name if eng else None,
                "timing_cache": _relative(self.timing_cache, self.onnx_path),
                "tensorrt_version": eng.tensorrt_version if eng else None,
                "build_seconds": eng.build_seconds if eng else None,
            },
            "rtx_engine": {
                "status": self.rtx_status,
                "reason": self.rtx_reason,
                "path": rtx.path.name if rtx else None,
                "tensorrt_rtx_version": rtx.version if rtx else None,
                "compute_capabilities": list(rtx.compute_capabilities) if rtx else None,
                "decomposed_attention_layers": rtx.decomposed_attention if rtx else None,
                "build_seconds": rtx.build_seconds if rtx else None,
                "plugin": rtx_plugin_record() if rtx else None,
            },
            "plugins": [plugin_record()] if self.node_counts.get(_plugin_key(), 0) else [],
            "parity": [r.to_json() for r in self.reports],
            "files": self.files,
            "seconds": self.seconds,
        }


def _relative(path: Path | None, onnx_path: Path | None) -> str | None:
    """`path` relative to the artifact root (the subgraph dir's parent) when inside it."""
    if path is None:
        return None
    if onnx_path is not None and path.resolve().is_relative_to(onnx_path.parent.parent.resolve()):
        return str(path.resolve().relative_to(onnx_path.parent.parent.resolve()))
    return str(path)


def _plugin_key() -> str:

    return f"{M3_MOE_PLUGIN.domain}::{M3_MOE_PLUGIN.name}"


def failed_report(step: str, subject: str, err: BaseException | str) -> ParityReport:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {' '.join(str(err).splitlines())[:500]}"
    return ParityReport(step, subject, "-", {}, (), text)
