"""Structural diff of two exports of one subgraph that differ only in how `m3::moe` was lowered.

Each graph is put in a canonical form: the nodes a lowering emitted for one `m3::moe` op (found by
the exporter's `pkg.torch.onnx.fx_node` metadata, which names the FX node they translate) collapse
into one placeholder `MoE(hidden) -> out`; constants (initializers with generated names, Constant
outputs) are named by content; every other intermediate value by its producer's position. Two
graphs are equivalent when the canonical node lists, graph inputs/outputs and named initializers
(name, dtype, dims) agree. Weights are compared by metadata only, not loaded.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

FX_NODE_KEY = "pkg.torch.onnx.fx_node"
_MOE_TARGET = "torch.ops.m3.moe.default"
_FX_NAME = re.compile(r"^%(\S+) :")
_GENERATED = re.compile(r"^val_\d+$")

Canonical = tuple[Any, ...]


@dataclass(frozen=True)
class GraphDiff:
    """Verdict of `diff_graphs` with the first difference found (None when equivalent)."""

    equivalent: bool
    first_difference: str | None
    num_moe_a: int
    num_moe_b: int
    num_nodes_a: int
    num_nodes_b: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def moe_region_of(node: onnx.NodeProto) -> str | None:
    """The FX node name (`moe`, `moe_1`, ...) of the `m3::moe` op a node was emitted for, if any."""
    for prop in node.metadata_props:
        if prop.key == FX_NODE_KEY and _MOE_TARGET in prop.value:
            match = _FX_NAME.match(prop.value)
            return match.group(1) if match else prop.value
    return None


def _tensor_key(t: onnx.TensorProto, base_dir: Path | None = None) -> Canonical:
    """A constant by content (dtype, dims, data), whatever its name; external data is read from
    `base_dir` (metadata only without one)."""

    if t.external_data:
        if base_dir is None:
            return ("const", t.data_type, tuple(t.dims), "external")
        data = onnx.numpy_helper.to_array(t, str(base_dir)).tobytes()
        return ("const", t.data_type, tuple(t.dims), hashlib.sha256(data).hexdigest())
    anon = onnx.TensorProto()
    anon.CopyFrom(t)
    anon.name = ""
    return ("const", t.data_type, tuple(t.dims), hashlib.sha256(anon.SerializeToString()).hexdigest())


def _attr_key(node: onnx.NodeProto) -> tuple[Any, ...]:

    out = []
    for a in sorted(node.attribute, key=lambda a: a.name):
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, onnx.TensorProto):
            value = _tensor_key(value)
        elif isinstance(value, list):
            value = tuple(value)
        out.append((a.name, value))
    return tuple(out)


def _regions(g: Any) -> tuple[dict[str, list[Any]], dict[str, set[str]], dict[str, list[str]]]:
    """Per MoE region: its nodes, the values it produces, and those read outside it (or graph outputs)."""
    regions: dict[str, list[Any]] = {}
    for node in g.node:
        region = moe_region_of(node)
        if region is not None:
            regions.setdefault(region, []).append(node)
    region_outputs = {r: {o for n in ns for o in n.output} for r, ns in regions.items()}
    consumed_outside: dict[str, list[str]] = {r: [] for r in regions}
    graph_outputs = {o.name for o in g.output}
    for node in g.node:
        for x in node.input:
            for r, outs in region_outputs.items():
                if x in outs and moe_region_of(node) != r and x not in consumed_outside[r]:
                    consumed_outside[r].append(x)
    for r, outs in region_outputs.items():
        consumed_outside[r] += sorted((outs & graph_outputs) - set(consumed_outside[r]))
    return regions, region_outputs, consumed_outside


def canonical_form(
    model: onnx.ModelProto, base_dir: Path | None = None
) -> tuple[list[Canonical], dict[str, Canonical], int]:
    """(canonical node list, named initializers, number of MoE regions) of the main graph; external
    data of folded constants is read from `base_dir`."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    names: dict[str, Any] = {i.name: ("input", i.name) for i in g.input}
    # Initializers only a lowering reads (raw or re-laid-out expert weights) are the lowering's own.
    used_outside = {x for n in g.node if moe_region_of(n) is None for x in n.input}
    named_inits: dict[str, Canonical] = {}
    for name, init in inits.items():
        if _GENERATED.match(name):  # a folded constant: its name depends on the exporter's counter
            names[name] = _tensor_key(init, base_dir)
        else:
            names[name] = ("init", name)
            if name in used_outside:
                named_inits[name] = (init.data_type, tuple(init.dims))
    consts = {o: n for n in g.node if n.op_type == "Constant" for o in n.output}

    regions, region_outputs, consumed_outside = _regions(g)
    graph_outputs = {o.name for o in g.output}

    canon: list[Canonical] = []
    emitted: set[str] = set()

    def ref(x: str) -> Any:
        if not x:
            return ""
        if x in consts:
            return ("const", _attr_key(consts[x]))
        return names.get(x, ("unknown", x))

    for node in g.node:
        region = moe_region_of(node)
        if node.op_type == "Constant" and region is None:
            continue
        if region is not None:
            if region in emitted:
                continue
            emitted.add(region)
            members = {id(n) for n in regions[region]}
            produced = region_outputs[region]
            external = [
                x
                for n in g.node
                if id(n) in members
                for x in n.input
                if x and x not in produced and x not in inits and x not in consts
            ]
            ins = tuple(dict.fromkeys(ref(x) for x in external))
            for k, out in enumerate(consumed_outside[region]):
                names[out] = ("moe", region, k) if out not in graph_outputs else ("output", out)
            canon.append(("MoE-region", ins, tuple(names[o] for o in consumed_outside[region])))
            continue
        for k, out in enumerate(node.output):
            if out:
                names[out] = ("output", out) if out in graph_outputs else ("node", len(canon), k)
        canon.append(
            (
                node.domain or "",
                node.op_type,
                tuple(ref(x) for x in node.input),
                tuple(ref(o) for o in node.output),
                _attr_key(node),
            )
        )
    return canon, named_inits, len(regions)


def diff_onnx_files(a: Path, b: Path) -> GraphDiff:
    """`diff_graphs` of two ONNX files (weights are not loaded; folded constants are)."""

    return diff_graphs(
        onnx.load(a, load_external_data=False), onnx.load(b, load_external_data=False), a.parent, b.parent
    )


def diff_graphs(
    a: onnx.ModelProto, b: onnx.ModelProto, base_dir_a: Path | None = None, base_dir_b: Path | None = None
) -> GraphDiff:
    """Whether `a` and `b` are the same graph once each MoE lowering is collapsed (see module doc)."""
    ca, ia, na = canonical_form(a, base_dir_a)
    cb, ib, nb = canonical_form(b, base_dir_b)
    first: str | None = None
    ios = (
        [(i.name, i.type.SerializeToString()) for i in a.graph.input],
        [(i.name, i.type.SerializeToString()) for i in b.graph.input],
    )
    outs = [o.name for o in a.graph.output], [o.name for o in b.graph.output]
    if ios[0] != ios[1]:
        first = f"graph inputs differ: {[n for n, _ in ios[0]]} vs {[n for n, _ in ios[1]]}"
    elif outs[0] != outs[1]:
        first = f"graph outputs differ: {outs[0]} vs {outs[1]}"
    elif na != nb:
        first = f"{na} vs {nb} MoE regions"
    elif ia != ib:
        keys = sorted(set(ia) ^ set(ib)) or sorted(k for k in ia if ia[k] != ib.get(k))
        first = f"named initializers differ: {keys[:5]}"
    else:
        for i, (x, y) in enumerate(zip(ca, cb, strict=False)):
            if x != y:
                first = f"node {i}: {str(x)[:300]} vs {str(y)[:300]}"
                break
        else:
            if len(ca) != len(cb):
                first = f"{len(ca)} vs {len(cb)} canonical nodes"
    return GraphDiff(first is None, first, na, nb, len(a.graph.node), len(b.graph.node))
