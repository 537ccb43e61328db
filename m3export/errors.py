"""Typed errors a user can cause. The CLI prints them on one line and exits non-zero.

Bugs are not M3ExportError: they raise normally and keep their traceback.
"""

from __future__ import annotations


class M3ExportError(Exception):
    """Base class for errors caused by user input (spec, checkpoint, artifact, CLI input)."""

    exit_code = 2


class SpecError(M3ExportError):
    """The spec file is malformed or describes an invalid variant."""


class CheckpointError(M3ExportError):
    """A checkpoint cannot be read or does not match the spec."""


class InputError(M3ExportError):
    """Runtime input (token ids, images, grids) is invalid."""


class OutputError(M3ExportError):
    """The output location cannot take the build: not writable, too little space, a directory that is
    not an m3export build, inside another build, or held by a concurrent build."""


class ResourceError(M3ExportError):
    """The command would need more memory than the machine (or M3EXPORT_MAX_MEMORY) allows."""


class RuntimeVersionError(M3ExportError):
    """The installed runtime (e.g. onnxruntime) is outside the range a build's graphs are valid on."""


class ArtifactError(M3ExportError):
    """An artifact directory is missing, incomplete or fails integrity checks."""

    exit_code = 3
