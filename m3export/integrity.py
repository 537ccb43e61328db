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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from m3export.artifacts import MANIFEST, PinnedFile, load_manifest, read_manifest_bytes
from m3export.errors import ArtifactError, M3ExportError
from m3export.outdir import interrupted_publish_hint
from m3export.parity.compare import Kind, kinds_by_name
from m3export.spec.models import M3Spec

if TYPE_CHECKING:
    from m3export.runners.ort_runner import OrtRunner

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


SIGNATURE = "manifest.sig"
MIN_KEY_BYTES = 16


def read_key(path: str | os.PathLike[str]) -> bytes:
    """An HMAC key from a file (its bytes, surrounding whitespace stripped); InputError when unusable."""
    from m3export.errors import InputError

    try:
        key = Path(path).read_bytes().strip()
    except OSError as err:
        raise InputError(f"--key {path}: cannot read it ({err.strerror})") from None
    if len(key) < MIN_KEY_BYTES:
        raise InputError(
            f"--key {path}: a key must hold at least {MIN_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`)"
        )
    return key


def signature_line(manifest_bytes: bytes, key: bytes) -> str:
    """The one line of `manifest.sig`: HMAC-SHA256 of manifest.json under `key`."""
    import hmac

    return f"hmac-sha256:{hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()}  {MANIFEST}\n"


def sign_manifest(root: str | os.PathLike[str], key: bytes) -> Path:
    """Write `manifest.sig` for the (final) manifest.json in `root`."""
    root = Path(root)
    path, tmp = root / SIGNATURE, root / f".{SIGNATURE}.tmp"
    tmp.write_text(signature_line((root / MANIFEST).read_bytes(), key))
    os.replace(tmp, path)
    return path


def _verify_signature(root: Path, raw: bytes, key: bytes) -> None:
    import hmac

    path = root / SIGNATURE
    try:
        got = path.read_text()
    except FileNotFoundError:
        raise ArtifactError(
            f"{root}: no {SIGNATURE} (the build was not signed; --key requires a signed build)"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: unreadable ({err})") from None
    if not hmac.compare_digest(got, signature_line(raw, key)):
        raise ArtifactError(f"{path}: the signature does not match (wrong key, or the build was altered)")


def _verify_seal(root: Path) -> bytes:
    """The manifest's bytes, checked against the seal (read once: what is parsed is what was sealed)."""
    seal, manifest = root / SEAL, root / MANIFEST
    for p in (manifest, seal):
        _inside(root, p.name)
        if not p.is_file():
            hint = (
                " (an unsealed build: rebuild, or seal one you trust with m3export.integrity.seal_manifest)"
            )
            hint = hint if p == seal else ""
            raise ArtifactError(f"{root}: no {p.name}{hint}")
    raw = read_manifest_bytes(root)
    try:
        sealed = seal.read_bytes()
    except OSError as err:
        raise ArtifactError(f"{seal}: unreadable ({err.strerror})") from None
    if sealed != seal_line(raw).encode():
        raise ArtifactError(f"{manifest}: does not match {SEAL} (the manifest or its seal was modified)")
    return raw


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
    # The ONNX graph and its external data as verified (descriptors opened before hashing), by the
    # data files' locations relative to the graph: what `OrtRunner.from_pinned` loads.
    pinned_onnx: PinnedFile | None = None
    pinned_data: dict[str, PinnedFile] = field(default_factory=dict)

    def ort_runner(self) -> OrtRunner:
        """onnxruntime on the verified bytes (never re-opened by name: a swapped file is not run)."""
        from m3export.runners.ort_runner import OrtRunner

        if self.pinned_onnx is None:
            return OrtRunner(self.onnx)
        return OrtRunner.from_pinned(self.pinned_onnx, self.pinned_data, f"ort:{self.name}")

    def debug_runner(self) -> OrtRunner:
        """onnxruntime on the verified graph exposing every layer's `debug.*` values (routing, localisation)."""
        from m3export.parity.intermediates import expose_intermediates

        if self.pinned_onnx is None:
            return expose_intermediates(self.onnx).runner()
        exposed = expose_intermediates(self.onnx, graph_bytes=self.pinned_onnx.read())
        return exposed.runner(pinned_data=self.pinned_data)


@dataclass(frozen=True)
class VerifiedArtifacts:
    """An artifact directory that passed every integrity check; subgraphs in plan order."""

    root: Path
    spec: M3Spec
    subgraphs: tuple[SubgraphArtifact, ...]
    cases: tuple[str, ...]
    files: dict[str, str]  # relative path -> sha256, every one verified
    build_status: tuple[str, tuple[str, ...]] = ("pass", ())  # the build's verdict, its failed steps
    golden_tokens: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # step e's tokens
    runtime: dict[str, str] = field(default_factory=dict)  # package -> version range of the graphs
    moe_lowering: str = ""
    warnings: tuple[str, ...] = ()  # unlisted files that no runtime loads (reported, not fatal)


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


# Files a build writes at the top level besides the listed ones.
OWN_FILES = ("manifest.json", SEAL, "manifest.sig", "trt_timing.cache")  # manifest.sig: SIGNATURE


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
    import onnx

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
    raw = _verify_seal(root)
    if key is not None:
        _verify_signature(root, raw, key)
    manifest, typed = load_manifest(root, raw)
    spec = _load_spec(root, manifest)
    subs, cases = _sections(root, manifest)
    order = _plan_order(spec, subs, root)
    if complete:
        _require_complete(spec, order, root)
    files = _listed_files(root, subs)
    warnings, pinned = _verify_files(root, files)
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
        data = {
            r.split("/", 1)[1]: h
            for r, h in pinned.items()
            if r.startswith(f"{name}/") and r.endswith(".data")
        }
        subgraphs.append(
            SubgraphArtifact(
                name,
                onnx_path,
                ins,
                outs,
                g_in,
                g_out,
                _kinds(sub, outs),
                engine,
                pinned.get(f"{name}/{name}.onnx"),
                {k: v for k, v in data.items() if not k.endswith(".trt.onnx.data")},
            )
        )
    for w in warnings:
        say(f"integrity: warning: {w}")
    say(f"integrity: pass ({len(files)} files, sha256)")
    return VerifiedArtifacts(
        root,
        spec,
        tuple(subgraphs),
        _case_order(cases, subgraphs),
        files,
        build_status=(typed.status, tuple(typed.failed_steps())),
        golden_tokens=typed.golden_tokens,
        runtime=typed.runtime,
        moe_lowering=typed.moe_lowering,
        warnings=tuple(warnings),
    )


def _require_complete(spec: M3Spec, built: list[str], root: Path) -> None:
    from m3export.split.plan import plan_subgraphs

    missing = [p.name for p in plan_subgraphs(spec) if p.name not in built]
    if missing:
        raise ArtifactError(
            f"{root}: an incomplete build: it lacks {', '.join(missing)} of its spec's plan "
            "(built with --only?); rebuild them all"
        )


def _case_order(golden: tuple[str, ...], subgraphs: list[SubgraphArtifact]) -> tuple[str, ...]:
    """Every case with goldens: the manifest's order, each followed by its variants (`<case>.decode`)."""
    found = list(dict.fromkeys(c for s in subgraphs for c in s.golden_inputs))
    rank = {g: i for i, g in enumerate(golden)}
    return tuple(
        sorted(found, key=lambda c: (rank.get(c.split(".", 1)[0], len(rank)), c != c.split(".", 1)[0]))
    )
