"""Ways to damage copies of the shared tiny build (the `tiny_build` fixture) for the `check` tests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from m3export.artifacts.io import sha256_file, write_json_atomic
from m3export.artifacts.manifest import MANIFEST
from m3export.artifacts.seal import seal_manifest


def copy_artifacts(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def rewrite_manifest(
    root: Path,
    edit: Callable[[dict[str, Any]], None] | None = None,
    *,
    rehash: bool = True,
    reseal: bool = True,
) -> None:
    """Apply `edit` to the manifest, then (by default) re-hash every listed file and re-seal: a
    consistent manifest, so that only the damage under test remains."""
    manifest = json.loads((root / MANIFEST).read_text())
    if edit is not None:
        edit(manifest)
    if rehash:
        for sub in manifest["subgraphs"].values():
            sub["files"] = {rel: sha256_file(root / rel) for rel in sub["files"]}
    write_json_atomic(root / MANIFEST, manifest)
    if reseal:
        seal_manifest(root)
