"""Integrity of a built artifact directory, verified before anything in it is loaded or run.

Any failure raises `ArtifactError` (exit 3):

- `manifest.sha256` (sha256sum format) matches manifest.json byte for byte: a manifest cannot hold
  its own hash, and without the seal an edited value (a tolerance, a version) would go unseen;
- the manifest's schema version, structure and spec (with its spec_hash);
- every listed file is a regular file inside the directory (no absolute path, no `..`, no symlink
  resolving outside) and has its sha256; no unlisted `.onnx` / `.data` / `.engine`
  file lies in the directory;
- every external-data `location` in every ONNX file stays inside the directory and is listed;
- the golden files hold `<case>/<name>` arrays of the subgraph's own I/O, every name for every case
  (cases are the manifest's golden cases and variants of them such as `<case>.decode`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from m3export.artifacts import MANIFEST, read_manifest, sha256_file
from m3export.errors import ArtifactError, M3ExportError
from m3export.parity.compare import Kind, kinds_by_name
from m3export.spec.models import M3Spec

Progress = Callable[[str], None]
SEAL = "manifest.sha256"
MODEL_SUFFIXES = (".onnx", ".data", ".engine")  # files a runtime may load: every one must be listed
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ------------------------------------------------------------------------------------- seal


def seal_line(manifest_bytes: bytes) -> str:
    """The one line of `manifest.sha256`, in `sha256sum -c` format."""
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n"


def seal_manifest(root: str | os.PathLike[str]) -> Path:
    """Write `manifest.sha256` for the manifest.json in `root` (call after the manifest is final)."""
    root = Path(root)
    path = root / SEAL
    tmp = root / f".{SEAL}.tmp"
    tmp.write_text(seal_line((root / MANIFEST).read_bytes()))
    os.replace(tmp, path)
    return path


def _verify_seal(root: Path) -> None:
    seal, manifest = root / SEAL, root / MANIFEST
    for p in (manifest, seal):
        _inside(root, p.name)
        if not p.is_file():
            hint = (
                " (an unsealed build: rebuild, or seal one you trust with m3export.integrity.seal_manifest)"
            )
            hint = hint if p == seal else ""
            raise ArtifactError(f"{root}: no {p.name}{hint}")
    if seal.read_bytes() != seal_line(manifest.read_bytes()).encode():
        raise ArtifactError(f"{manifest}: does not match {SEAL} (the manifest or its seal was modified)")


# ------------------------------------------------------------------------------------- integrity


@dataclass(frozen=True)
class SubgraphArtifact:
    """One verified subgraph: its ONNX file, I/O names and goldens (case -> name -> array)."""

    name: str
    onnx: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    golden_inputs: dict[str, dict[str, np.ndarray]]
    golden_outputs: dict[str, dict[str, np.ndarray]]
    kinds: dict[str, Kind]
    engine: Path | None = None  # <name>/<name>.engine when the build listed one (TensorRT target)


@dataclass(frozen=True)
class VerifiedArtifacts:
    """An artifact directory that passed every integrity check; subgraphs in plan order."""

    root: Path
    spec: M3Spec
    subgraphs: tuple[SubgraphArtifact, ...]
    cases: tuple[str, ...]
    files: dict[str, str]  # relative path -> sha256, every one verified


def _inside(root: Path, rel: str) -> Path:
    """`root/rel`, refused if `rel` is absolute, has `..` or resolves (symlinks) outside `root`."""
    pp = PurePosixPath(rel)
    if not rel or pp.is_absolute() or Path(rel).is_absolute() or ".." in pp.parts or "\\" in rel:
        raise ArtifactError(f"{root}: path {rel!r} escapes the artifact directory")
    path = root / pp
    if not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{root}: {rel} resolves outside the artifact directory ({path.resolve()})")
    return path


def _struct(cond: bool, root: Path, what: str) -> None:
    if not cond:
        raise ArtifactError(f"{root / MANIFEST}: malformed manifest: {what}")


def _names(sigs: Any, root: Path, where: str) -> tuple[str, ...]:
    ok = isinstance(sigs, list) and all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in sigs)
    _struct(ok, root, f"{where} must be a list of {{name, dtype, dims}}")
    return tuple(s["name"] for s in sigs)


def _sections(root: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The manifest's subgraphs and golden case names."""
    subs, cases = manifest.get("subgraphs"), manifest.get("golden_cases")
    _struct(isinstance(subs, dict) and bool(subs), root, "no subgraphs")
    ok = isinstance(cases, list) and all(
        isinstance(c, dict) and isinstance(c.get("name"), str) for c in cases
    )
    _struct(ok, root, "golden_cases must be a list of {name, ...}")
    assert isinstance(subs, dict) and isinstance(cases, list)
    return subs, tuple(c["name"] for c in cases)


def _load_spec(root: Path, manifest: dict[str, Any]) -> M3Spec:
    from m3export.spec import parse_spec, spec_hash

    _struct(isinstance(manifest.get("spec"), dict), root, "no 'spec' section")
    try:
        spec = parse_spec(manifest["spec"], source=f"{root / MANIFEST} (spec)")
    except M3ExportError as err:  # a spec the build wrote cannot be invalid unless it was altered
        raise ArtifactError(str(err)) from None
    if spec_hash(spec) != manifest.get("spec_hash"):
        raise ArtifactError(f"{root / MANIFEST}: spec_hash does not match the spec")
    return spec


def _plan_order(spec: M3Spec, built: dict[str, Any], root: Path) -> list[str]:
    from m3export.split.plan import plan_subgraphs

    planned = [p.name for p in plan_subgraphs(spec)]
    unknown = sorted(set(built) - set(planned))
    if unknown:
        raise ArtifactError(f"{root / MANIFEST}: subgraph(s) {unknown} are not in the spec's plan {planned}")
    return [n for n in planned if n in built]


def _listed_files(root: Path, subgraphs: dict[str, Any]) -> dict[str, str]:
    files: dict[str, str] = {}
    for name, sub in subgraphs.items():
        _struct(
            isinstance(sub, dict) and isinstance(sub.get("files"), dict), root, f"subgraph {name}: no files"
        )
        for rel, digest in sub["files"].items():
            _struct(isinstance(digest, str) and bool(_HEX64.fullmatch(digest)), root, f"{rel}: bad sha256")
            _inside(root, rel)
            files[str(PurePosixPath(rel))] = digest
        for need in (f"{name}.onnx", "golden_inputs.npz", "golden_outputs.npz"):
            _struct(f"{name}/{need}" in sub["files"], root, f"subgraph {name} does not list {name}/{need}")
    return files


def _verify_files(root: Path, files: dict[str, str]) -> None:
    """Unlisted model files first (cheap), then every listed file's existence and sha256."""
    real_root = root.resolve()
    for dirpath, _dirs, names in os.walk(root):
        for fname in names:
            rel = (Path(dirpath) / fname).relative_to(root).as_posix()
            if fname.endswith(MODEL_SUFFIXES) and rel not in files:
                raise ArtifactError(f"{root}: {rel} is not listed in the manifest (remove it or rebuild)")
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"{root}: {rel} is missing (listed in the manifest)")
        if not path.resolve().is_relative_to(real_root):
            raise ArtifactError(f"{root}: {rel} resolves outside the artifact directory")
        if sha256_file(path) != digest:
            raise ArtifactError(
                f"{root}: {rel} does not match its sha256 in the manifest (modified or corrupt)"
            )


def _tensors(graph: Any) -> Any:
    """Every TensorProto of a graph: initializers, sparse initializers, node attributes, subgraphs."""
    yield from getattr(graph, "initializer", ())  # FunctionProtos have nodes only
    for sp in getattr(graph, "sparse_initializer", ()):
        yield sp.values
        yield sp.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def _verify_external_data(root: Path, rel: str, files: dict[str, str]) -> None:
    import onnx

    path = root / rel
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends
        raise ArtifactError(f"{path}: not a readable ONNX model ({type(err).__name__})") from None
    base = PurePosixPath(rel).parent
    for g in [model.graph, *model.functions]:
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


def _load_goldens(root: Path, rel: str, names: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    try:
        with np.load(root / rel, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # zipfile / format errors
        raise ArtifactError(f"{root / rel}: unreadable golden file ({type(err).__name__}: {err})") from None
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        case, _, name = key.partition("/")
        if not case or name not in names:
            raise ArtifactError(f"{root / rel}: unexpected array {key!r} (not <case>/<I/O name>)")
        out.setdefault(case, {})[name] = arr
    for case, got in out.items():
        missing = [n for n in names if n not in got]
        if missing:
            raise ArtifactError(f"{root / rel}: case {case} lacks {missing}")
    return out


def _kinds(sub: dict[str, Any], outputs: tuple[str, ...]) -> dict[str, Kind]:
    """The kind the build compared each output as (from its parity records), else by name."""
    kinds = kinds_by_name(outputs)
    for rep in sub.get("parity") or []:
        for o in rep.get("outputs") or []:
            if o.get("name") in kinds and o.get("kind") in ("tensor", "logits", "routing"):
                kinds[o["name"]] = o["kind"]
    return kinds


def verify_artifacts(root: str | os.PathLike[str], progress: Progress | None = None) -> VerifiedArtifacts:
    """Every integrity check of the module docstring; raises ArtifactError on the first failure."""
    say = progress or (lambda _msg: None)
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory")
    _verify_seal(root)
    manifest = read_manifest(root)
    spec = _load_spec(root, manifest)
    subs, cases = _sections(root, manifest)
    order = _plan_order(spec, subs, root)
    files = _listed_files(root, subs)
    _verify_files(root, files)
    for rel in files:
        if rel.endswith(".onnx"):
            _verify_external_data(root, rel, files)
    subgraphs = []
    for name in order:
        sub = subs[name]
        ins, outs = (
            _names(sub.get("inputs"), root, f"{name}.inputs"),
            _names(sub.get("outputs"), root, f"{name}.outputs"),
        )
        g_in = _load_goldens(root, f"{name}/golden_inputs.npz", ins)
        g_out = _load_goldens(root, f"{name}/golden_outputs.npz", outs)
        if set(g_in) != set(g_out):
            raise ArtifactError(f"{root / name}: golden inputs and outputs cover different cases")
        onnx_path = root / name / f"{name}.onnx"
        engine = root / name / f"{name}.engine" if f"{name}/{name}.engine" in files else None
        subgraphs.append(SubgraphArtifact(name, onnx_path, ins, outs, g_in, g_out, _kinds(sub, outs), engine))
    say(f"integrity: pass ({len(files)} files, sha256)")
    return VerifiedArtifacts(root, spec, tuple(subgraphs), _case_order(cases, subgraphs), files)


def _case_order(golden: tuple[str, ...], subgraphs: list[SubgraphArtifact]) -> tuple[str, ...]:
    """Every case with goldens: the manifest's order, each followed by its variants (`<case>.decode`)."""
    found = list(dict.fromkeys(c for s in subgraphs for c in s.golden_inputs))
    rank = {g: i for i, g in enumerate(golden)}
    return tuple(
        sorted(found, key=lambda c: (rank.get(c.split(".", 1)[0], len(rank)), c != c.split(".", 1)[0]))
    )
