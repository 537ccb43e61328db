"""Artifact directories: staging, atomic publication, hashing and the manifest.

A build writes everything into a staging directory next to the destination and publishes it with
renames only when the build finished: an interrupted build leaves at most a stale staging
directory (removed by the next build), never a manifest that claims success. A build whose parity
gate failed is published to `<out>.failed/` so it can be inspected without replacing a good build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


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


def remove_stale_staging(out: Path) -> None:
    """Remove staging directories of killed builds of `out` (every build starts with this)."""
    for stale in out.parent.glob(f".{out.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)


def new_staging_dir(out: Path) -> Path:
    """A fresh staging directory beside `out`; stale ones from killed builds are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))


def publish(staging: Path, out: Path) -> None:
    """Replace `out` by `staging` with renames (the old directory is removed only afterwards)."""
    backup = out.with_name(f".{out.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    if out.exists():
        os.replace(out, backup)
    os.replace(staging, out)
    shutil.rmtree(backup, ignore_errors=True)


def read_manifest(out: Path) -> dict[str, Any]:
    from m3export.errors import ArtifactError

    path = out / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{out}: no {MANIFEST} (not an m3export artifact directory, or the build did not finish)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: unsupported manifest (schema_version must be {SCHEMA_VERSION})")
    return data


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
