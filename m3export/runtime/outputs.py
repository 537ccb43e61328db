"""Files the commands write for the user (`--logits-out`, `spec from-hf -o`): refused onto anything but
a regular file in a writable directory, written atomically, nothing half-written left behind."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from torch import Tensor

from m3export.artifacts.io import atomic_write
from m3export.errors import InputError
from m3export.spec import M3Spec
from m3export.spec.load import spec_yaml


def check_output_file(out: Path, flag: str) -> Path:
    """`out` may be written: not a directory, link or device, in an existing writable directory."""
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise InputError(f"{flag} {out}: exists and is not a regular file")
    if not out.parent.is_dir():
        raise InputError(f"{flag} {out}: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {out}: directory {out.parent} is not writable")
    return out


def check_logits_path(out: Path) -> Path:
    if out.suffix != ".npy":
        raise InputError(f"--logits-out {out}: the file name must end in .npy")
    return check_output_file(out, "--logits-out")


def _write(out: Path, data: bytes | str, flag: str) -> Path:
    try:
        return atomic_write(out, data)
    except OSError as err:
        raise InputError(f"{flag} {out}: cannot write it ({err.strerror})") from None


def save_logits(logits: Tensor, path: str | os.PathLike) -> Path:
    """Write logits as a float32 .npy file."""
    out = check_logits_path(Path(path))
    buf = io.BytesIO()
    np.save(buf, logits.detach().cpu().numpy().astype(np.float32))
    return _write(out, buf.getvalue(), "--logits-out")


def write_spec_file(spec: M3Spec, output: Path) -> Path:
    """`spec from-hf -o`: the canonical YAML of `spec`."""

    return _write(check_output_file(output, "-o"), spec_yaml(spec), "-o")
