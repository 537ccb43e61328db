"""Integrity of a built artifact directory, verified before anything in it is loaded or run.

Any failure raises `ArtifactError` (exit 3):

- `manifest.sha256` matches manifest.json byte for byte, and with a key the signature too (seal.py);
- the manifest validates against its schema (manifest.py), its spec against the spec models, and its
  `spec_hash`; the build holds every subgraph its spec plans (unless `complete=False`);
- every listed file is a regular file inside the directory (no absolute path, no `..`, no NUL, no
  symlink resolving outside) and has its sha256, hashed through a descriptor that runners then load
  from (`PinnedFile`); unlisted model files, unlisted symbolic links and unreadable directories fail,
  other unlisted files are warnings;
- every external-data `location` of every tensor in every ONNX file stays inside the directory and is
  listed.

Goldens are checked when first read (`GoldenStore`): `run`, `generate` and build reuse never read them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import onnx

from m3export.artifacts.goldens import GoldenStore
from m3export.artifacts.io import PinnedFile
from m3export.artifacts.layout import (
    MANIFEST_FILES,
    ONNX_DIR,
    TIMING_CACHE,
    engine_rel,
    golden_rel,
    onnx_rel,
)
from m3export.artifacts.manifest import MANIFEST, Manifest, SubgraphEntry, load_manifest
from m3export.artifacts.outdir import interrupted_publish_hint
from m3export.artifacts.seal import verify_seal, verify_signature
from m3export.errors import ArtifactError, M3ExportError
from m3export.parity.compare import Kind, kinds_by_name
from m3export.parity.intermediates import expose_intermediates
from m3export.runners.ort_runner import OrtRunner
from m3export.runners.registry import BuildInfo
from m3export.spec import parse_spec, spec_hash
from m3export.spec.models import M3Spec
from m3export.split.inputs import base_case
from m3export.split.plan import SubgraphPlan, plan_subgraphs

Progress = Callable[[str], None]
MODEL_SUFFIXES = (".onnx", ".data", ".engine")  # files a runtime may load: every one must be listed
OWN_FILES = (*MANIFEST_FILES, TIMING_CACHE)  # what a build writes at the top level besides listed files
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class SubgraphArtifact:
    """One verified subgraph: its plan (as built), files, goldens (lazy) and how to run it."""

    plan: SubgraphPlan
    root: Path
    entry: SubgraphEntry
    # The ONNX graph and its external data as verified (descriptors opened before hashing), by the
    # data files' locations relative to the graph: what `OrtRunner.from_pinned` loads.
    pinned_onnx: PinnedFile | None = None
    pinned_data: dict[str, PinnedFile] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(self.plan.input_names)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.plan.output_names)

    @property
    def onnx(self) -> Path:
        return self.root / onnx_rel(self.name)

    @property
    def engine(self) -> Path | None:
        """<name>/<name>.engine when the build listed one (TensorRT target)."""
        rel = engine_rel(self.name)
        return self.root / rel if rel in self.entry.files else None

    @property
    def trt_entry(self) -> dict[str, Any] | None:
        """The manifest's `trt` entry of this subgraph (engine status, plugin records), if any."""
        return self.entry.trt

    @cached_property
    def goldens(self) -> GoldenStore:
        return GoldenStore(self.root / self.name, self.inputs, self.outputs)

    @property
    def golden_inputs(self) -> dict[str, dict[str, Any]]:
        return self.goldens.inputs

    @property
    def golden_outputs(self) -> dict[str, dict[str, Any]]:
        return self.goldens.outputs

    @cached_property
    def kinds(self) -> dict[str, Kind]:
        """The kind the build compared each output as (from its parity records), else by name."""
        kinds = kinds_by_name(self.outputs)
        for rep in self.entry.parity:
            for o in rep.outputs:
                if o.name in kinds:
                    kinds[o.name] = o.kind
        return kinds

    def ort_runner(self) -> OrtRunner:
        """onnxruntime on the verified bytes (never re-opened by name: a swapped file is not run)."""

        if self.pinned_onnx is None:
            return OrtRunner(self.onnx)
        return OrtRunner.from_pinned(self.pinned_onnx, self.pinned_data, f"ort:{self.name}")

    def debug_runner(self) -> OrtRunner:
        """onnxruntime on the verified graph exposing every layer's `debug.*` values (routing, localisation)."""

        if self.pinned_onnx is None:
            return expose_intermediates(self.onnx).runner()
        exposed = expose_intermediates(self.onnx, graph_bytes=self.pinned_onnx.read())
        return exposed.runner(pinned_data=self.pinned_data)


@dataclass(frozen=True)
class VerifiedArtifacts:
    """An artifact directory that passed every integrity check; subgraphs in plan order."""

    root: Path
    spec: M3Spec
    manifest: Manifest
    subgraphs: tuple[SubgraphArtifact, ...]
    files: dict[str, str]  # relative path -> sha256, every one verified
    warnings: tuple[str, ...] = ()  # unlisted files that no runtime loads (reported, not fatal)

    @property
    def plans(self) -> list[SubgraphPlan]:
        return [s.plan for s in self.subgraphs]

    @property
    def build_status(self) -> tuple[str, tuple[str, ...]]:
        """The build's verdict and its failed steps."""
        return self.manifest.status, tuple(self.manifest.failed_steps())

    @property
    def golden_tokens(self) -> dict[str, dict[str, list[int]]]:
        return self.manifest.golden_tokens

    @property
    def runtime(self) -> dict[str, str]:
        return self.manifest.runtime

    @property
    def moe_lowering(self) -> str:
        return self.manifest.moe_lowering

    def build_info(self) -> BuildInfo:
        """What the backend registry needs of this build (spec, lowering, valid runtime range)."""
        return BuildInfo(self.spec, self.moe_lowering, self.runtime.get("onnxruntime", ""))

    @cached_property
    def cases(self) -> tuple[str, ...]:
        """Every case with goldens: the manifest's order, each followed by its variants (`.decode`, ...)."""
        found = list(dict.fromkeys(c for s in self.subgraphs for c in s.golden_inputs))
        rank = {c.name: i for i, c in enumerate(self.manifest.golden_cases)}
        return tuple(sorted(found, key=lambda c: (rank.get(base_case(c), len(rank)), c != base_case(c))))


def _inside(root: Path, rel: str) -> Path:
    """`root/rel`, refused if `rel` is absolute, has `..`, a NUL or an over-long component, or
    resolves (symlinks) outside `root`."""
    pp = PurePosixPath(rel)
    if not rel or pp.is_absolute() or Path(rel).is_absolute() or ".." in pp.parts or "\\" in rel:
        raise ArtifactError(f"{root}: path {rel!r} escapes the artifact directory")
    if "\x00" in rel or any(len(part.encode()) > 255 for part in pp.parts):
        raise ArtifactError(f"{root}: path {rel[:80]!r} is not a valid file name")
    path = root / pp
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as err:  # symlink loops, unreadable components
        raise ArtifactError(f"{root}: {rel} cannot be resolved ({err})") from None
    if not resolved.is_relative_to(root.resolve()):
        raise ArtifactError(f"{root}: {rel} resolves outside the artifact directory ({resolved})")
    return path


def _load_spec(root: Path, manifest: dict[str, Any]) -> M3Spec:

    try:
        spec = parse_spec(manifest["spec"], source=f"{root / MANIFEST} (spec)")
    except M3ExportError as err:  # a spec the build wrote cannot be invalid unless it was altered
        raise ArtifactError(str(err)) from None
    if spec_hash(spec) != manifest["spec_hash"]:
        raise ArtifactError(f"{root / 'manifest.json'}: spec_hash does not match the spec")
    return spec


def _built_plans(spec: M3Spec, typed: Manifest, root: Path, complete: bool) -> list[SubgraphPlan]:
    """The built subgraphs' plans in plan order; every one must be the spec's plan of that name."""
    planned = {p.name: p for p in plan_subgraphs(spec)}
    unknown = sorted(set(typed.subgraphs) - set(planned))
    if unknown:
        raise ArtifactError(
            f"{root}/manifest.json: subgraph(s) {unknown} are not in the spec's plan {list(planned)}"
        )
    if complete and (missing := [n for n in planned if n not in typed.subgraphs]):
        raise ArtifactError(
            f"{root}: an incomplete build: it lacks {', '.join(missing)} of its spec's plan "
            "(built with --only?); rebuild them all"
        )
    plans = []
    for name, plan in planned.items():
        if name not in typed.subgraphs:
            continue
        if SubgraphPlan.from_json(typed.subgraphs[name].model_dump(mode="json")) != plan:
            raise ArtifactError(f"{root}/manifest.json: subgraph {name} does not match its spec's plan")
        plans.append(plan)
    return plans


def _listed_files(root: Path, typed: Manifest) -> dict[str, str]:
    files: dict[str, str] = {}
    for name, sub in typed.subgraphs.items():
        for rel, digest in sub.files.items():
            if not _HEX64.fullmatch(digest):
                raise ArtifactError(f"{root}/manifest.json: malformed manifest: {rel}: bad sha256")
            _inside(root, rel)
            rel = str(PurePosixPath(rel))
            if files.setdefault(rel, digest) != digest:  # a shared file two subgraphs list differently
                raise ArtifactError(f"{root}/manifest.json: {rel} is listed with two different sha256")
        for need in (onnx_rel(name), golden_rel(name, "inputs"), golden_rel(name, "outputs")):
            if need not in sub.files:
                raise ArtifactError(
                    f"{root}/manifest.json: malformed manifest: subgraph {name} does not list {need}"
                )
    return files


def _unlisted(root: Path, files: dict[str, str]) -> list[str]:
    """The rule for files the manifest does not list: a model file (`.onnx`, `.data`, `.engine`) or
    any symbolic link is an integrity failure (a runtime could load it); any other unlisted file is
    returned as a warning. Unreadable directories are failures (they could hide model files)."""

    def refuse(err: OSError) -> None:
        raise ArtifactError(
            f"{root}: cannot read {err.filename} ({err.strerror}): it could hide unlisted files"
        )

    warnings = []
    for dirpath, dirs, names in os.walk(root, onerror=refuse):
        for name in [*dirs, *names]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() and rel not in files:
                raise ArtifactError(
                    f"{root}: {rel} is a symbolic link the manifest does not list (remove it)"
                )
        for fname in names:
            rel = (Path(dirpath) / fname).relative_to(root).as_posix()
            if rel in files or rel in OWN_FILES:
                continue
            if fname.endswith(MODEL_SUFFIXES):
                raise ArtifactError(f"{root}: {rel} is not listed in the manifest (remove it or rebuild)")
            warnings.append(f"{rel} is not part of the build (not listed in the manifest)")
    return warnings


def _verify_files(root: Path, files: dict[str, str]) -> tuple[list[str], dict[str, PinnedFile]]:
    """Unlisted files first (cheap), then every listed file's existence and sha256, hashed through a
    descriptor kept open for the files a runtime loads; returns the warnings and those pinned files."""
    real_root = root.resolve()
    warnings = _unlisted(root, files)
    pinned: dict[str, PinnedFile] = {}
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"{root}: {rel} is missing (listed in the manifest)")
        if not path.resolve().is_relative_to(real_root):
            raise ArtifactError(f"{root}: {rel} resolves outside the artifact directory")
        try:
            handle = PinnedFile(path)
            ok = handle.sha256() == digest
        except OSError as err:
            raise ArtifactError(f"{root}: {rel} is unreadable ({err.strerror or err})") from None
        if not ok:
            handle.close()
            raise ArtifactError(
                f"{root}: {rel} does not match its sha256 in the manifest (modified or corrupt)"
            )
        if rel.endswith((".onnx", ".onnx.data")):
            pinned[rel] = handle
        else:
            handle.close()
    return warnings, pinned


def _tensors(graph: Any) -> Any:
    """Every TensorProto of a graph: initializers, sparse initializers, node attributes (dense and
    sparse), subgraphs."""
    yield from getattr(graph, "initializer", ())  # FunctionProtos have nodes only
    for sp in getattr(graph, "sparse_initializer", ()):
        yield sp.values
        yield sp.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sp in [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []:
                yield sp.values
                yield sp.indices
            for sp in attr.sparse_tensors:
                yield sp.values
                yield sp.indices
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def _graphs(model: Any) -> list[Any]:
    """The main graph, local functions and training-info graphs (initialization and algorithm)."""
    graphs = [model.graph, *model.functions]
    for info in model.training_info:
        graphs += [g for g in (info.initialization, info.algorithm) if g is not None]
    return graphs


def _verify_external_data(root: Path, rel: str, files: dict[str, str]) -> None:

    path = root / rel
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends
        raise ArtifactError(f"{path}: not a readable ONNX model ({type(err).__name__})") from None
    base = PurePosixPath(rel).parent
    for g in _graphs(model):
        for t in _tensors(g):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            pl = PurePosixPath(loc)
            if not loc or pl.is_absolute() or Path(loc).is_absolute() or ".." in pl.parts or "\\" in loc:
                raise ArtifactError(
                    f"{path}: tensor {t.name} has external data {loc!r} outside the directory"
                )
            target = str(base / pl)
            _inside(root, target)  # symlinks
            if target not in files:
                raise ArtifactError(
                    f"{path}: tensor {t.name} has external data {loc!r} not listed in the manifest"
                )


def verify_artifacts(
    root: str | os.PathLike[str],
    progress: Progress | None = None,
    *,
    complete: bool = True,
    key: bytes | None = None,
) -> VerifiedArtifacts:
    """Every integrity check of the module docstring; raises ArtifactError on the first failure.
    `complete`: also refuse a build lacking subgraphs of its spec's plan (`build --only`). `key`:
    also require `manifest.sig` to be the manifest's HMAC under that key (tampering by someone
    without the key is detected; the sha256 seal alone only detects accidents)."""
    say = progress or (lambda _msg: None)
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory{interrupted_publish_hint(root)}")
    try:
        return _verify(root, say, complete, key)
    except RecursionError:
        raise ArtifactError(f"{root}: the manifest or a graph nests too deeply") from None


def _verify(root: Path, say: Progress, complete: bool, key: bytes | None) -> VerifiedArtifacts:
    raw = verify_seal(root)
    if key is not None:
        verify_signature(root, raw, key)
    manifest, typed = load_manifest(root, raw)
    spec = _load_spec(root, manifest)
    plans = _built_plans(spec, typed, root, complete)
    files = _listed_files(root, typed)
    warnings, pinned = _verify_files(root, files)
    for rel in files:
        if rel.endswith(".onnx"):
            _verify_external_data(root, rel, files)
    subgraphs = []
    prefix = f"{ONNX_DIR}/"
    for plan in plans:
        # The ORT graph's weights, by location relative to it: its own and the shared ones it lists.
        data = {
            r.removeprefix(prefix): pinned[r]
            for r in typed.subgraphs[plan.name].files
            if r.startswith(prefix) and r.endswith(".onnx.data") and r in pinned
        }
        subgraphs.append(
            SubgraphArtifact(plan, root, typed.subgraphs[plan.name], pinned.get(onnx_rel(plan.name)), data)
        )
    for w in warnings:
        say(f"integrity: warning: {w}")
    say(f"integrity: pass ({len(files)} files, sha256)")
    return VerifiedArtifacts(root, spec, typed, tuple(subgraphs), files, tuple(warnings))
