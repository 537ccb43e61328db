"""The schema of `manifest.json`: every reader validates the file against it before using a value, so a
damaged or hostile manifest is one `ArtifactError` (exit 3), never a TypeError deep in a reader.

Strict (unknown keys are refused) where m3export reads values; the free-form parts (the spec, which
`parse_spec` validates, TensorRT entries, localisation details, tolerances) are plain mappings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SigRecord(_Strict):
    name: str
    dtype: str
    dims: list[int | str]


class OutputRecord(_Strict):
    name: str
    kind: Literal["tensor", "logits", "routing"]
    max_abs: float | str  # "inf" for a missing output (strict JSON has no infinity)
    max_rel: float | str
    cosine: float | str
    top1_agreement: float | None
    routing_agreement: float | None
    failures: list[str]
    ref_peak: float | str = 0.0
    max_abs_scaled: float | str = 0.0


class ParityRecord(_Strict):
    step: str
    subject: str
    case: str
    tolerance: dict[str, Any]
    outputs: list[OutputRecord] = Field(default_factory=list)
    error: str | None = None
    skipped: str | None = None
    localisation: dict[str, Any] | None = None
    passed: bool
    status: Literal["pass", "fail", "skip"]


class SubgraphEntry(_Strict):
    name: str
    kind: Literal["vision", "text", "mtp"]
    modules: list[str]
    layers: list[int]
    inputs: list[SigRecord]
    outputs: list[SigRecord]
    shared_uses: list[list[str]]
    files: dict[str, str]
    key: str
    reused: bool
    node_counts: dict[str, int]
    export_seconds: float | None
    parity: list[ParityRecord]
    trt: dict[str, Any] | None = None


class GoldenCaseRecord(_Strict):
    name: str
    batch: int
    seq: int
    grids: list[list[int]]
    video: list[int] | None


class Manifest(_Strict):
    """What a build recorded (see README "Artifacts")."""

    schema_version: Literal[2]
    spec: dict[str, Any]
    spec_hash: str
    tool_versions: dict[str, str]
    moe_lowering: str
    runtime: dict[str, str] = Field(description="package -> version range the graphs are valid on")
    status: Literal["pass", "fail"]
    only: list[str] | None
    complete: bool
    trace_shapes: dict[str, Any]
    golden_cases: list[GoldenCaseRecord]
    subgraphs: dict[str, SubgraphEntry]
    trt: dict[str, Any] | None = None
    parity: list[ParityRecord]
    golden_tokens: dict[str, dict[str, list[int]]]

    def failed_steps(self) -> list[str]:
        """`step subject` of every failed record, in manifest order."""
        records = [r for sub in self.subgraphs.values() for r in sub.parity] + self.parity
        return list(dict.fromkeys(f"{r.step} {r.subject}" for r in records if r.status == "fail"))
