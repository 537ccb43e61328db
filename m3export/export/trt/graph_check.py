"""CPU check of a TensorRT-flavoured ONNX graph against the TensorRT ONNX parser's documented support.

Every node must be either an operator the parser supports (onnx-tensorrt's operator matrix,
transcribed with its source and version in onnx_tensorrt_ops.json), with its data input in the
listed element types and the checkable restrictions met, or our plugin node, whose attributes, I/O
count, dtypes and ranks must match the plugin's signature (m3export/trt/signature.py).
What this cannot see: restrictions that depend on values at build time, and anything TensorRT
decides while building. Those are checked only by an engine build on a GPU.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import onnx

from m3export.ops.trt_signature import ACT_TRT_TOKENS, M3_MOE_PLUGIN, PluginSignature

OPS_FILE = "onnx_tensorrt_ops.json"
_DEFAULT_DOMAINS = ("", "ai.onnx")
_REDUCE_OPS = {
    f"Reduce{s}"
    for s in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")
}


@dataclass(frozen=True)
class SupportedOps:
    """The parser's operator matrix: op -> (supported, element types, restrictions) and its source."""

    source: dict[str, Any]
    operators: dict[str, dict[str, Any]]

    @property
    def opset_range(self) -> tuple[int, int]:
        lo, hi = self.source["opset_range"]
        return int(lo), int(hi)

    def supported(self, op: str) -> bool:
        return bool(self.operators.get(op, {}).get("supported", False))

    def types(self, op: str) -> tuple[str, ...]:
        return tuple(self.operators.get(op, {}).get("types", ()))


@functools.cache
def load_supported_ops() -> SupportedOps:
    """The packaged operator matrix (m3export/trt/onnx_tensorrt_ops.json)."""
    data = json.loads(resources.files("m3export.export.trt").joinpath(OPS_FILE).read_text())
    return SupportedOps(source=data["source"], operators=data["operators"])


@dataclass(frozen=True)
class GraphIssue:
    """One reason the TensorRT parser would (per its documentation) reject a node."""

    node: str
    op: str
    problem: str


@dataclass(frozen=True)
class TrtGraphReport:
    """Result of `check_trt_graph`: pass iff no issues."""

    source: dict[str, Any]
    num_nodes: int
    num_plugin_nodes: int
    op_counts: dict[str, int]
    issues: tuple[GraphIssue, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return not self.issues

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def elem_token(elem_type: int) -> str:
    """ONNX element type -> the token the operator matrix uses (FP32, BF16, INT64, ...)."""

    name = onnx.TensorProto.DataType.Name(elem_type)
    table = {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "DOUBLE": "DOUBLE"}
    if name.startswith("FLOAT8"):
        return "FP8"
    if name.startswith("FLOAT4"):
        return "FP4"
    return table.get(name, name)


def value_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int | None]]:
    """(element type, rank) of every named value the graph declares (inputs, outputs, value_info,
    initializers)."""
    types: dict[str, int] = {}
    ranks: dict[str, int | None] = {}
    g = model.graph
    for v in (*g.input, *g.output, *g.value_info):
        tt = v.type.tensor_type
        types[v.name] = tt.elem_type
        ranks[v.name] = len(tt.shape.dim) if tt.HasField("shape") else None
    for init in g.initializer:
        types[init.name] = init.data_type
        ranks[init.name] = len(init.dims)
    return types, ranks


def _constant_values(model: onnx.ModelProto) -> set[str]:
    """Values known at build time: initializers and Constant outputs."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return consts


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _restriction_problems(node: onnx.NodeProto, ranks: dict[str, int | None], consts: set[str]) -> list[str]:
    """The documented restrictions that the graph alone decides."""
    attrs, op, ins = _attrs(node), node.op_type, list(node.input)
    problems: list[str] = []
    if op == "TopK" and attrs.get("sorted", 1) != 1:
        problems.append("TopK needs sorted=1")
    if op == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
        problems.append("ScatterND reduction must be none")
    if op == "Attention":
        if any(ins[4:]):
            problems.append("Attention: past_key / past_value / nonpad_kv_seqlen inputs are unsupported")
        if any(node.output[1:]):
            problems.append("Attention: present_* / qk_matmul_output outputs are unsupported")
        if attrs.get("qk_matmul_output_mode", 0) != 0 or attrs.get("softcap", 0.0) != 0.0:
            problems.append("Attention: qk_matmul_output_mode / softcap are unsupported")
        bad = [x for x in ins[:4] if x and ranks.get(x) not in (4, None)]
        if bad:
            problems.append(f"Attention: Q, K, V and attn_mask must be 4-D ({bad} are not)")
    axes_input = {"Squeeze": 1, "Unsqueeze": 1, "CumSum": 1, "OneHot": 1, **dict.fromkeys(_REDUCE_OPS, 1)}
    idx = axes_input.get(op)
    if idx is not None and len(ins) > idx and ins[idx] and ins[idx] not in consts:
        problems.append(f"{op}: input {idx} ({ins[idx]}) must be a build-time constant")
    return problems


def check_plugin_node(
    node: onnx.NodeProto,
    types: dict[str, int],
    ranks: dict[str, int | None],
    sig: PluginSignature = M3_MOE_PLUGIN,
) -> list[str]:
    """Problems of one plugin node against the registered signature (empty list: it matches)."""

    problems: list[str] = []
    attrs = _attrs(node)
    kinds = {a.name: a.type for a in node.attribute}
    want_kinds = {
        a.name: onnx.AttributeProto.INT if a.kind == "int" else onnx.AttributeProto.FLOAT
        for a in sig.attributes
    }
    want_kinds |= {
        "plugin_version": onnx.AttributeProto.STRING,
        "plugin_namespace": onnx.AttributeProto.STRING,
    }
    if kinds != want_kinds:
        problems.append(f"attributes {sorted(kinds)} (types {kinds}) != signature {want_kinds}")
    if (
        attrs.get("plugin_version") != sig.version.encode()
        or attrs.get("plugin_namespace") != sig.namespace.encode()
    ):
        problems.append(
            f"plugin_version/namespace {attrs.get('plugin_version')!r}/{attrs.get('plugin_namespace')!r} != "
            f"{sig.version!r}/{sig.namespace!r}"
        )
    if len(node.input) != len(sig.inputs) or not all(node.input):
        problems.append(f"inputs {list(node.input)} != the {len(sig.inputs)} of {sig.input_names}")
        return problems
    if len(node.output) != len(sig.outputs):
        problems.append(f"{len(node.output)} outputs, signature has {len(sig.outputs)}")
        return problems
    act: set[str] = set()
    for param, name in zip((*sig.inputs, *sig.outputs), (*node.input, *node.output), strict=True):
        token = elem_token(types[name]) if name in types else "unknown"
        if param.dtype == "float32" and token != "FP32":
            problems.append(f"{param.name} ({name}) is {token}, the signature needs FP32")
        if param.dtype == "T":
            act.add(token)
        if ranks.get(name) not in (param.rank, None):
            problems.append(
                f"{param.name} ({name}) has rank {ranks.get(name)}, the signature needs {param.rank}"
            )
    if len(act) != 1 or not act <= set(ACT_TRT_TOKENS):
        problems.append(
            f"hidden / expert weights / output dtypes {sorted(act)} must be one of {ACT_TRT_TOKENS}"
        )
    return problems


def check_trt_graph(model: onnx.ModelProto, sig: PluginSignature = M3_MOE_PLUGIN) -> TrtGraphReport:
    """Check every node of `model` (main graph) against the parser's matrix or the plugin signature."""
    table = load_supported_ops()
    types, ranks = value_types(model)
    consts = _constant_values(model)
    issues: list[GraphIssue] = []
    lo, hi = table.opset_range
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS and not lo <= imp.version <= hi:
            issues.append(
                GraphIssue("<model>", "opset", f"opset {imp.version} outside the parser's {lo}..{hi}")
            )
    if model.functions:
        issues.append(
            GraphIssue("<model>", "functions", f"local functions {[f.name for f in model.functions]}")
        )
    counts: dict[str, int] = {}
    num_plugin = 0
    for node in model.graph.node:
        key = node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
        if (node.domain, node.op_type) == (sig.domain, sig.name):
            num_plugin += 1
            issues += [GraphIssue(node.name, key, p) for p in check_plugin_node(node, types, ranks, sig)]
            continue
        if node.domain not in _DEFAULT_DOMAINS:
            issues.append(GraphIssue(node.name, key, "custom-domain node that is not the registered plugin"))
            continue
        if not table.supported(node.op_type):
            issues.append(
                GraphIssue(
                    node.name, key, f"not supported by the TensorRT {table.source['tensorrt_version']} parser"
                )
            )
            continue
        data = (
            node.output[0]
            if node.op_type in ("Constant", "ConstantOfShape")
            else (node.input[0] if node.input else "")
        )
        checked = [data] + ([node.output[0]] if node.op_type in ("Cast", "CastLike") else [])
        for name in checked:
            if name and name in types and elem_token(types[name]) not in table.types(node.op_type):
                issues.append(
                    GraphIssue(
                        node.name,
                        key,
                        f"{name} is {elem_token(types[name])}; supported: {table.types(node.op_type)}",
                    )
                )
        issues += [GraphIssue(node.name, key, p) for p in _restriction_problems(node, ranks, consts)]
    return TrtGraphReport(
        source=table.source,
        num_nodes=len(model.graph.node),
        num_plugin_nodes=num_plugin,
        op_counts=dict(sorted(counts.items())),
        issues=tuple(issues),
    )
