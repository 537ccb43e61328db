"""Files of an artifact directory: pinned (verified-then-loaded) handles, hashing, the one atomic
write every writer of m3export uses, and the tool versions a build records."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


class PinnedFile:
    """An artifact file opened once: hashed through this descriptor and later loaded through it, so a
    file swapped (renamed over) after verification is never what runs (time of check = time of use).
    In-place rewrites by someone with write access are outside this guarantee (README, threat model)."""

    fd: int = -1  # until opened: __del__ runs even when __init__ raises before the open

    def __init__(self, path: Path) -> None:

        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode):
            self.close()  # once: a second close could hit a descriptor reused by another file
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


def atomic_write(path: Path, data: bytes | str, *, durable: bool = False) -> Path:
    """Write `data` to `path` through a temporary file in the same directory and a rename, so a reader
    sees the old file or the new one, never half of one, and nothing is left behind on failure.
    Permissions follow the umask (not mkstemp's 0600); `durable` also fsyncs before the rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    """`atomic_write` of indented, key-sorted JSON, fsynced (manifests and reports)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", durable=True)


def tool_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the artifacts depend on."""

    out = {}
    for pkg in ("m3export", "torch", "onnx", "onnxscript", "onnxruntime", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out
