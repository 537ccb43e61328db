"""Content keys for incremental builds: a subgraph's ONNX file is reused only when its key matches.

A key hashes everything the exported graph depends on: the subgraph's plan (modules, layers, named
I/O), the slice of the spec that shapes it, the bytes of every weight it owns or uses, the MoE lowering,
the trace shapes, the versions of torch / onnx / onnxscript / onnxruntime and the m3export source
itself. Nothing is reused because a file exists: the previous build must also pass `check`'s integrity
verification (m3export.artifacts.verify), so a damaged or edited artifact is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m3export.artifacts.manifest import MANIFEST, Manifest, SubgraphEntry
from m3export.artifacts.verify import verify_artifacts
from m3export.errors import ArtifactError
from m3export.spec import M3Spec, spec_hash
from m3export.split.plan import KINDS, SubgraphPlan


@cache
def source_digest() -> str:
    """sha256 over the m3export package's Python sources (a code change invalidates every key)."""
    root = Path(__file__).resolve().parents[1]  # the m3export package
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def weights_digest(model: nn.Module, prefixes: list[str]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every parameter and buffer under `prefixes`."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not any(name == p or name.startswith(p + ".") for p in prefixes):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        flat = t.detach().contiguous().reshape(-1)
        if flat.numel():  # hashed through a view: `tobytes()` would copy the tensor (2.3 GiB embeddings)
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def spec_slice(spec: M3Spec, plan: SubgraphPlan) -> dict[str, Any]:
    """The parts of the spec the exported graph of `plan` depends on (beyond its plan): its kind's
    spec sections (`split.plan.KINDS`) without the fields the kind ignores."""
    data = spec.model_dump(mode="json")
    traits = KINDS[plan.kind]
    out: dict[str, Any] = {"dtype": data["dtype"], "export": {k: data["export"][k] for k in ("moe", "opset")}}
    for section in traits.spec_sections:
        values = data[section]
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if f"{section}.{k}" not in traits.ignores}
        out[section] = values
    return out


def subgraph_key(
    spec: M3Spec,
    plan: SubgraphPlan,
    model: nn.Module,
    lowering: str,
    trace: dict[str, Any],
    tools: dict[str, str],
) -> str:
    """The content key of one subgraph's exported files."""
    owned = [*plan.modules, *(module for module, _ in plan.shared_uses)]
    doc = {
        "plan": plan.to_json(),
        "spec": spec_slice(spec, plan),
        "weights": weights_digest(model, owned),
        "lowering": lowering,
        "trace": trace,
        "tools": tools,
        "source": source_digest(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def previous_build(out: Path, say: Callable[[str], None]) -> tuple[Manifest, Path] | None:
    """The manifest (and directory) of a passing build in `out` that passes check's integrity
    verification, else None. A partial build counts: its unchanged subgraphs carry over too."""

    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = verify_artifacts(out, complete=False).manifest
    except ArtifactError as err:
        say(f"previous build in {out} is not reusable: {err}")
        return None
    return (manifest, out) if manifest.status == "pass" else None


def up_to_date(prev: Manifest, spec: M3Spec, keys: dict[str, str]) -> bool:
    """Same spec and the same subgraphs with the same keys: nothing to rebuild."""
    return (
        prev.spec_hash == spec_hash(spec)
        and set(prev.subgraphs) == set(keys)
        and all(prev.subgraphs[n].key == k for n, k in keys.items())
    )


def reuse_onnx(
    prev: tuple[Manifest, Path] | None, name: str, key: str, staging: Path
) -> SubgraphEntry | None:
    """Copy a subgraph's ONNX files (its graphs, their weights, the shared weights they reference)
    from the previous build into `staging` when its key matches; its manifest entry."""
    if prev is None:
        return None
    manifest, root = prev
    sub = manifest.subgraphs.get(name)
    if sub is None or sub.key != key:
        return None
    for rel in sub.files:
        if rel.endswith((".onnx", ".onnx.data")):
            dst = staging / rel
            if dst.exists():  # a shared weights file another reused subgraph brought (same sha256)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dst)  # verified by previous_build
    return sub
