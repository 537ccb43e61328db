"""TensorRT-specific rewrites of the TensorRT-flavoured ONNX graph (the only changes besides the MoE).

Each rule answers an entry of the TensorRT parser's operator matrix (onnx_tensorrt_ops.json) that
the exported M3 graphs would otherwise violate; each is exact, and the ORT twin, which keeps the
rewrites, checks them numerically on CPU:

- `cast-bool-inputs`: the matrix lists no BOOL for Equal, ScatterElements, ScatterND and NonZero,
  while the MSA block selection scatters into a boolean mask and compares booleans (torchlib's
  floor_divide) and the image splice takes NonZero of a boolean mask. BOOL inputs are cast to a
  listed type holding 0/1 exactly (INT32, or FP32 for NonZero) and, where the output has the data
  type, the output is cast back to BOOL.
- `attention-mask-4d`: TensorRT's Attention needs a 4-D attn_mask; the vision tower's block-diagonal
  mask is [N, N]. It is unsqueezed to [1, 1, N, N], which ONNX broadcasting makes identical.

New nodes carry the metadata key `m3export.trt_rewrite` (= the rule) and the original node's
metadata, so graph diffs and error messages map them back to the PyTorch module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from m3export.export.trt.graph_check import value_types

REWRITE_KEY = "m3export.trt_rewrite"
CAST_BOOL = "cast-bool-inputs"
MASK_4D = "attention-mask-4d"
# op -> (ONNX type name its BOOL inputs are cast to, whether its output has the data type).
BOOL_CASTS: dict[str, tuple[str, bool]] = {
    "Equal": ("INT32", False),
    "ScatterElements": ("INT32", True),
    "ScatterND": ("INT32", True),
    "NonZero": ("FLOAT", False),
}


@dataclass(frozen=True)
class Rewrite:
    """One node replaced by a rule."""

    rule: str
    node: str
    op: str

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "node": self.node, "op": self.op}


class _Graph:
    """Value types / infos of the model being rewritten, and helpers to emit tagged nodes."""

    def __init__(self, model: onnx.ModelProto) -> None:

        self.types, self.ranks = value_types(model)
        self.infos = {v.name: v for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
        self.nodes: list[onnx.NodeProto] = []
        self.new_infos: list[onnx.ValueInfoProto] = []

    def emit(self, node: onnx.NodeProto, orig: onnx.NodeProto, rule: str) -> None:
        node.metadata_props.extend(orig.metadata_props)
        node.metadata_props.add(key=REWRITE_KEY, value=rule)
        self.nodes.append(node)

    def info(self, name: str, elem_type: int, like: str, dims: list[int] | None = None) -> None:

        vi = onnx.ValueInfoProto()
        if like in self.infos:
            vi.CopyFrom(self.infos[like])
        vi.name = name
        vi.type.tensor_type.elem_type = elem_type
        if dims is not None:  # leading 1s, then the original dims
            old = list(vi.type.tensor_type.shape.dim)
            vi.type.tensor_type.shape.ClearField("dim")
            for _ in dims:
                vi.type.tensor_type.shape.dim.add().dim_value = 1
            vi.type.tensor_type.shape.dim.extend(old)
        self.new_infos.append(vi)


def _cast_bool_inputs(g: _Graph, node: onnx.NodeProto) -> bool:

    bool_t = onnx.TensorProto.BOOL
    rule = BOOL_CASTS.get(node.op_type)
    if rule is None or not any(g.types.get(x) == bool_t for x in node.input):
        return False
    to = getattr(onnx.TensorProto, rule[0])
    prefix = f"{node.name or node.output[0]}/{CAST_BOOL}"
    core = onnx.NodeProto()
    core.CopyFrom(node)
    del core.metadata_props[:]
    for i, x in enumerate(node.input):
        if x and g.types.get(x) == bool_t:
            cast = f"{prefix}/in{i}"
            g.emit(onnx.helper.make_node("Cast", [x], [cast], name=cast, to=to), node, CAST_BOOL)
            g.info(cast, to, x)
            core.input[i] = cast
    cast_back = rule[1] and g.types.get(node.output[0]) == bool_t
    if cast_back:
        core.output[0] = f"{prefix}/out"
        g.info(core.output[0], to, node.output[0])
    g.emit(core, node, CAST_BOOL)
    if cast_back:
        back = onnx.helper.make_node(
            "Cast", [core.output[0]], [node.output[0]], name=f"{prefix}/back", to=bool_t
        )
        g.emit(back, node, CAST_BOOL)
    return True


def _attention_mask_4d(g: _Graph, node: onnx.NodeProto) -> bool:

    if node.op_type != "Attention" or len(node.input) < 4 or not node.input[3]:
        return False
    mask = node.input[3]
    rank = g.ranks.get(mask)
    if rank is None or rank >= 4:
        return False
    prefix = f"{node.name or node.output[0]}/{MASK_4D}"
    axes = f"{prefix}/axes"
    lead = list(range(4 - rank))
    g.emit(onnx.helper.make_node("Constant", [], [axes], name=axes, value_ints=lead), node, MASK_4D)
    mask4 = f"{prefix}/mask"
    g.emit(onnx.helper.make_node("Unsqueeze", [mask, axes], [mask4], name=mask4), node, MASK_4D)
    g.info(mask4, g.types[mask], mask, dims=lead)
    core = onnx.NodeProto()
    core.CopyFrom(node)
    del core.metadata_props[:]
    core.input[3] = mask4
    g.emit(core, node, MASK_4D)
    return True


_RULES: tuple[tuple[str, Callable[[_Graph, onnx.NodeProto], bool]], ...] = (
    (CAST_BOOL, _cast_bool_inputs),
    (MASK_4D, _attention_mask_4d),
)


def apply_trt_rewrites(model: onnx.ModelProto) -> list[Rewrite]:
    """Apply the rules to `model` in place (main graph, default domain); returns what was rewritten."""
    g = _Graph(model)
    done: list[Rewrite] = []
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            hit = next((name for name, rule in _RULES if rule(g, node)), None)
            if hit is not None:
                done.append(Rewrite(hit, node.name, node.op_type))
                continue
        g.nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(g.nodes)
    model.graph.value_info.extend(g.new_infos)
    return done
