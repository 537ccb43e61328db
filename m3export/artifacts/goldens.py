"""The golden files of a subgraph: per case, the inputs it was fed, the eager outputs and the eager
layer intermediates (for localising a failure). The only reader and writer of `golden_*.npz`.

Arrays are stored as `<case>/<name>` in one `.npz` per kind (m3export/artifacts/layout.py names
the files); cases are the manifest's golden cases and their variants (`<case>.decode`,
`<case>.video`, m3export/split/inputs.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path

import numpy as np

from m3export.artifacts.layout import golden_name
from m3export.errors import ArtifactError

Cases = dict[str, dict[str, np.ndarray]]  # case -> name -> array


def golden_key(case: str, name: str) -> str:
    return f"{case}/{name}"


def split_key(key: str) -> tuple[str, str]:
    case, _, name = key.partition("/")
    return case, name


def write_goldens(sub_dir: Path, kind: str, cases: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """Write one golden file of a subgraph directory (in the staging directory: published atomically)."""
    path = sub_dir / golden_name(kind)
    arrays = {golden_key(c, n): v for c, values in cases.items() for n, v in values.items()}
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def read_goldens(path: Path, names: Iterable[str] | None = None) -> Cases:
    """A golden file as case -> name -> array; with `names`, every case must hold exactly those names.
    ArtifactError for an unreadable file or a foreign array."""
    allowed = None if names is None else tuple(names)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # zipfile / format errors
        raise ArtifactError(f"{path}: unreadable golden file ({type(err).__name__}: {err})") from None
    out: Cases = {}
    for key, arr in arrays.items():
        case, name = split_key(key)
        if not case or not name or (allowed is not None and name not in allowed):
            raise ArtifactError(f"{path}: unexpected array {key!r} (not <case>/<I/O name>)")
        out.setdefault(case, {})[name] = arr
    if allowed is not None:
        for case, got in out.items():
            missing = [n for n in allowed if n not in got]
            if missing:
                raise ArtifactError(f"{path}: case {case} lacks {missing}")
    return out


class GoldenStore:
    """The goldens of one verified subgraph, loaded on first use (`run` and `generate` never do)."""

    def __init__(self, sub_dir: Path, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
        self.sub_dir = sub_dir
        self._names = {"inputs": inputs, "outputs": outputs}

    def _load(self, kind: str) -> Cases:
        return read_goldens(self.sub_dir / golden_name(kind), self._names.get(kind))

    @cached_property
    def inputs(self) -> Cases:
        return self._load("inputs")

    @cached_property
    def outputs(self) -> Cases:
        got = self._load("outputs")
        if set(got) != set(self.inputs):
            raise ArtifactError(f"{self.sub_dir}: golden inputs and outputs cover different cases")
        return got

    @cached_property
    def intermediates(self) -> Cases:
        path = self.sub_dir / golden_name("intermediates")
        return read_goldens(path) if path.is_file() else {}
