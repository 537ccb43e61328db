"""The seal and the signature of a manifest.

`manifest.sha256` (sha256sum format) is a checksum: it detects accidental damage of manifest.json,
which holds every other file's sha256. `manifest.sig` (optional) is an HMAC-SHA256 under a key the
CI holds: it detects tampering by anyone without the key (README, threat model).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from m3export.artifacts.io import atomic_write
from m3export.artifacts.layout import SEAL, SIGNATURE
from m3export.artifacts.manifest import MANIFEST, read_manifest_bytes
from m3export.errors import ArtifactError, InputError

MIN_KEY_BYTES = 16


def seal_line(manifest_bytes: bytes) -> str:
    """The one line of `manifest.sha256`, in `sha256sum -c` format."""
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n"


def seal_manifest(root: str | os.PathLike[str]) -> Path:
    """Write `manifest.sha256` for the manifest.json in `root` (call after the manifest is final)."""
    root = Path(root)
    return atomic_write(root / SEAL, seal_line((root / MANIFEST).read_bytes()))


def read_key(path: str | os.PathLike[str]) -> bytes:
    """An HMAC key from a file (its bytes, surrounding whitespace stripped); InputError when unusable."""

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

    return f"hmac-sha256:{hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()}  {MANIFEST}\n"


def sign_manifest(root: str | os.PathLike[str], key: bytes) -> Path:
    """Write `manifest.sig` for the (final) manifest.json in `root`."""
    root = Path(root)
    return atomic_write(root / SIGNATURE, signature_line((root / MANIFEST).read_bytes(), key))


def verify_signature(root: Path, raw: bytes, key: bytes) -> None:

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


def verify_seal(root: Path) -> bytes:
    """The manifest's bytes, checked against the seal (read once: what is parsed is what was sealed)."""
    seal, manifest = root / SEAL, root / MANIFEST
    for p in (manifest, seal):
        if p.is_symlink() or not p.is_file():
            hint = " (an unsealed build: rebuild, or seal one you trust with m3export.artifacts.seal.seal_manifest)"
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
