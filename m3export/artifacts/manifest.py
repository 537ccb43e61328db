"""The schema of `manifest.json`: every reader validates the file against it before using a value, so a
damaged or hostile manifest is one `ArtifactError` (exit 3), never a TypeError deep in a reader.

Strict (unknown keys are refused) where m3export reads values; the free-form parts (the spec, which
`parse_spec` validates, TensorRT entries, localisation details, tolerances) are plain mappings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from m3export.artifacts.io import write_json_atomic
from m3export.errors import ArtifactError
from m3export.parity.compare import jsonable

SCHEMA_VERSION = 3  # 3: ONNX graphs in onnx/, shared weights stored once
MANIFEST = "manifest.json"


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
    built: str | None = None
    localisation: dict[str, Any] | None = None
    passed: bool
    status: Literal["pass", "fail", "skip", "built"]


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

    schema_version: Literal[3]
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


MAX_MANIFEST_BYTES = 64 << 20


def read_manifest_bytes(out: Path) -> bytes:
    """The raw bytes of `out`'s manifest (read once: the seal and the parser see the same bytes)."""

    path = out / MANIFEST
    try:
        if not path.is_file():
            raise ArtifactError(
                f"{out}: no {MANIFEST} (not an m3export artifact directory, or the build did not finish)"
            )
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(
                f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest m3export wrote"
            )
        return path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"{path}: unreadable ({err.strerror})") from None


def load_manifest(out: Path, raw: bytes | None = None) -> tuple[dict[str, Any], Manifest]:
    """The manifest of the artifact directory `out` (or its already-read bytes `raw`) as JSON,
    validated against its schema; ArtifactError (one line) for a missing, unreadable, oversized,
    malformed or mis-typed one."""

    path = out / MANIFEST
    raw = read_manifest_bytes(out) if raw is None else raw
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise ArtifactError(f"{path}: JSON nests too deeply: not a manifest m3export wrote") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        version = data.get("schema_version") if isinstance(data, dict) else None
        raise ArtifactError(
            f"{path}: unsupported manifest (schema_version {version!r}; this m3export reads "
            f"{SCHEMA_VERSION}): rebuild it"
        )
    try:
        return data, Manifest.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ArtifactError(f"{path}: malformed manifest: {loc}: {first['msg']}") from None
    except RecursionError:
        raise ArtifactError(f"{path}: malformed manifest: nests too deeply") from None


def read_manifest(out: Path) -> dict[str, Any]:
    """The validated manifest of `out` as JSON (see `load_manifest`)."""
    return load_manifest(out)[0]


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write `manifest` as `root/manifest.json` (the only writer; strict JSON: no inf / nan)."""

    data = jsonable(manifest.model_dump(mode="json"))
    Manifest.model_validate(data)  # what is written is what a reader accepts
    path = root / MANIFEST
    write_json_atomic(path, data)
    return path


def listed_files(out: Path) -> set[str] | None:
    """The files a build directory's manifest lists, for any schema version (None when `out` holds no
    readable manifest): what `--out` may replace (m3export/artifacts/outdir.py)."""
    try:
        data = json.loads(read_manifest_bytes(out))
        return {rel for sub in data["subgraphs"].values() for rel in sub["files"]}
    except (ArtifactError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
