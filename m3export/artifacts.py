"""Artifact directories: hashing, atomic JSON writes and the manifest.

Where a build goes (staging, locking, atomic publication, recovery) is m3export/outdir.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from m3export.manifest import SCHEMA_VERSION, Manifest

MANIFEST = "manifest.json"


class PinnedFile:
    """An artifact file opened once: hashed through this descriptor and later loaded through it, so a
    file swapped (renamed over) after verification is never what runs (time of check = time of use).
    In-place rewrites by someone with write access are outside this guarantee (README, threat model)."""

    def __init__(self, path: Path) -> None:
        import stat

        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(self.fd)
            raise OSError(f"{path}: not a regular file")
        self.size = info.st_size

    def sha256(self) -> str:
        h = hashlib.sha256()
        offset = 0
        while offset < self.size:
            chunk = os.pread(self.fd, min(1 << 20, self.size - offset), offset)
            if not chunk:
                break
            h.update(chunk)
            offset += len(chunk)
        return h.hexdigest()

    def read(self) -> bytes:
        return os.pread(self.fd, self.size, 0) if self.size else b""

    def mapping(self) -> Any:
        """A read-only memory map of the pinned file (b"" when empty)."""
        import mmap

        return mmap.mmap(self.fd, 0, prot=mmap.PROT_READ) if self.size else b""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file + fsync + rename, so readers see the old or the new file only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MAX_MANIFEST_BYTES = 64 << 20


def read_manifest_bytes(out: Path) -> bytes:
    """The raw bytes of `out`'s manifest (read once: the seal and the parser see the same bytes)."""
    from m3export.errors import ArtifactError

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
    from pydantic import ValidationError

    from m3export.errors import ArtifactError

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


def tool_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the artifacts depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("m3export", "torch", "onnx", "onnxscript", "onnxruntime", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out
