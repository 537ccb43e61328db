"""The M3 MoE TensorRT plugin's signature, declared once.

The same object drives
  - the `trt` lowering (the ONNX plugin node: op type, domain, attributes, input order, dtypes),
  - the TensorRT Python plugin registration (`tensorrt.plugin.register` / `impl` / `autotune`
    functions are generated from it, m3export/trt/plugin.py),
  - the CPU checks of a TensorRT-flavoured graph (every plugin node matches it) and
  - the manifest (its JSON form and digest are recorded next to each engine).

Inputs and attributes are exactly the `m3::moe` op's parameters, in the op's order, so a plugin node
can be replaced by any other lowering of the op (the ORT twin) and the plugin's compute function is
the op itself. Dtype policy (TensorRT 11 networks are strongly typed): the router weight and the
correction bias are fp32 whatever the engine precision (selection is sensitive to rounding,
m3-architecture.md §2.6-2.7); hidden, expert weights and the output share the engine dtype `T`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from onnx.defs import OpSchema

TensorDtype = Literal["T", "float32"]  # "T": the engine dtype (fp32 / fp16 / bf16)

# ONNX element type names of T, and the tokens TensorRT's AutoTuneCombination grammar uses for them.
ACT_ONNX_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")
ACT_TRT_TOKENS = ("FP32", "FP16", "BF16")


@dataclass(frozen=True)
class TensorParam:
    """One plugin input or output: name, rank and dtype rule."""

    name: str
    rank: int
    dtype: TensorDtype


@dataclass(frozen=True)
class AttrParam:
    """One plugin attribute (an ONNX node attribute, a TensorRT plugin field)."""

    name: str
    kind: Literal["int", "float"]


@dataclass(frozen=True)
class PluginSignature:
    """Name, namespace, version, ONNX domain, I/O and attributes of one TensorRT plugin."""

    name: str
    namespace: str
    version: str
    domain: str
    inputs: tuple[TensorParam, ...]
    outputs: tuple[TensorParam, ...]
    attributes: tuple[AttrParam, ...]

    @property
    def plugin_id(self) -> str:
        """`namespace::name`, the id `tensorrt.plugin.register` takes."""
        return f"{self.namespace}::{self.name}"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.inputs)

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        """sha256 of the canonical JSON: recorded with each engine, checked when it is loaded."""
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def node_attributes(self, values: dict[str, Any]) -> dict[str, Any]:
        """The plugin node's attributes: the op constants (typed) plus plugin_version/namespace."""
        missing = [a.name for a in self.attributes if a.name not in values]
        if missing:
            raise ValueError(f"{self.plugin_id}: missing attribute values {missing}")
        typed = {
            a.name: int(values[a.name]) if a.kind == "int" else float(values[a.name]) for a in self.attributes
        }
        return {**typed, "plugin_version": self.version, "plugin_namespace": self.namespace}

    def autotune_combination(self) -> str:
        """AutoTuneCombination type string: position i of every `|` list forms one combination."""
        params = (*self.inputs, *self.outputs)
        return ", ".join("|".join(ACT_TRT_TOKENS) if p.dtype == "T" else "FP32" for p in params)

    def onnx_schema(self) -> OpSchema:
        """The onnx OpSchema torch's exporter needs to emit the plugin node (export-notes §3)."""
        return _onnx_schema(self)


@functools.cache
def _onnx_schema(sig: PluginSignature) -> OpSchema:

    def formal(p: TensorParam) -> OpSchema.FormalParameter:
        return OpSchema.FormalParameter(p.name, "T" if p.dtype == "T" else "R")

    attr_type = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}
    return OpSchema(
        sig.name,
        sig.domain,
        1,
        inputs=[formal(p) for p in sig.inputs],
        outputs=[formal(p) for p in sig.outputs],
        type_constraints=[("T", list(ACT_ONNX_TYPES), "engine dtype"), ("R", ["tensor(float)"], "fp32")],
        attributes=[
            *(OpSchema.Attribute(a.name, attr_type[a.kind], required=True) for a in sig.attributes),
            OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, required=True),
            OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, required=True),
        ],
    )


# The TensorRT ONNX parser maps a node it has no importer for to the registered plugin whose name is
# the op type, with `plugin_version` / `plugin_namespace` taken from the node's attributes; the node
# domain is not part of the lookup (export-notes §5). The namespace must not be one TensorRT reserves
# ("", "trt", "tensorrt", "std") and, like the name, must not contain a dot.
M3_MOE_PLUGIN = PluginSignature(
    name="M3MoE",
    namespace="m3export",
    version="1",
    domain="trt.plugins",
    inputs=(
        TensorParam("hidden", 2, "T"),  # [T_tokens, H]
        TensorParam("router_weight", 2, "float32"),  # [E, H]
        TensorParam("correction_bias", 1, "float32"),  # [E]
        TensorParam("gate_up_proj", 3, "T"),  # [E, 2I, H], gate rows then up rows
        TensorParam("down_proj", 3, "T"),  # [E, H, I]
    ),
    outputs=(TensorParam("routed", 2, "T"),),
    attributes=(
        AttrParam("top_k", "int"),
        AttrParam("routed_scaling_factor", "float"),
        AttrParam("swiglu_alpha", "float"),
        AttrParam("swiglu_beta", "float"),
        AttrParam("swiglu_limit", "float"),
    ),
)
