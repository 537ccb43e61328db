"""The ORT twin of a TensorRT-flavoured graph: each plugin node replaced by the `ort` lowering.

The twin keeps everything else of the TensorRT graph, including its TensorRT-specific rewrites and
the very initializers the plugin nodes read, so running it in onnxruntime (CPU) against the eager
subgraph checks, without TensorRT, every part of the TensorRT graph except the plugin's kernel: the
non-MoE nodes, the rewrites, and the plugin nodes' wiring (inputs, weights, attributes).

The replacement for a plugin node is the `ort` lowering (or any other) exported once per distinct
(dtypes, weight shapes, attributes) from a module whose forward is `m3::moe` on its five inputs, the
weights being graph inputs; it is then wired to the plugin node's own inputs. The weight transforms
the lowering would fold at export (interleave, x2) stay as graph ops here: the twin is a check, not
a deployable graph. It references the TensorRT graph's external weights file, so it must sit in the
same directory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

import m3export.ops.moe  # noqa: F401  (registers torch.ops.m3.moe)
from m3export.export.onnx_export import STACK_TRACE_KEY
from m3export.export.trt.graph_check import value_types
from m3export.ops.lowering import FOLD_KEY, get_lowering
from m3export.ops.trt_plugin import decode_attributes
from m3export.ops.trt_signature import M3_MOE_PLUGIN

TWIN_KEY = "m3export.twin_of"


@dataclass(frozen=True)
class TwinArtifact:
    """The twin's path and how many plugin nodes it replaced."""

    path: Path
    num_replaced: int
    lowering: str


def _template_key(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[Any, ...]:

    types, _ = value_types(model)
    inits = {i.name: i for i in model.graph.initializer}
    dims = []
    for name in node.input[1:]:
        if name not in inits:
            raise ValueError(f"plugin node {node.name}: weight input {name!r} is not an initializer")
        dims.append((inits[name].data_type, tuple(inits[name].dims)))
    attrs = decode_attributes({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
    opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    return (types[node.input[0]], tuple(dims), tuple(attrs.items()), opset)


@functools.cache
def _template(key: tuple[Any, ...], lowering_name: str) -> bytes:
    """Serialized ONNX of `m3::moe` lowered by `lowering_name`, inputs named as the plugin's."""

    act_type, weights, attrs, opset = key
    consts = [v for _, v in attrs]

    class MoEOnly(nn.Module):
        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return torch.ops.m3.moe(*tensors, *consts)

    torch_dtype: dict[int, torch.dtype] = {
        int(onnx.TensorProto.FLOAT): torch.float32,
        int(onnx.TensorProto.FLOAT16): torch.float16,
        int(onnx.TensorProto.BFLOAT16): torch.bfloat16,
    }

    def tensor(elem: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(*shape).to(torch_dtype[elem])

    hidden_size = weights[0][1][1]
    used = {d for _, shape in weights for d in shape} | {hidden_size}
    tokens = next(n for n in range(17, 10_000) if n not in used)  # a size no weight dim shares
    args = (tensor(act_type, (tokens, hidden_size)), *(tensor(e, s) for e, s in weights))
    names = list(M3_MOE_PLUGIN.input_names)
    program = torch.onnx.export(
        MoEOnly().eval(),
        args,
        dynamo=True,
        opset_version=opset,
        input_names=names,
        output_names=[M3_MOE_PLUGIN.outputs[0].name],
        dynamic_shapes=(({0: torch.export.Dim("tokens")}, *(None for _ in weights)),),
        custom_translation_table=get_lowering(lowering_name).translation_table(),
        optimize=True,
        verbose=False,
    )
    assert program is not None
    return bytes(program.model_proto.SerializeToString())


def _spliced(template: onnx.ModelProto, node: onnx.NodeProto) -> tuple[list[Any], list[Any], list[Any]]:
    """The template's nodes, initializers and value_info, renamed under the plugin node's name and
    wired to its inputs and output."""

    g = template.graph
    prefix = f"{node.name}/twin/"
    mapping = {t.name: x for t, x in zip(g.input, node.input, strict=True)} | {
        g.output[0].name: node.output[0]
    }

    def rn(x: str) -> str:
        return x if not x else mapping.get(x, prefix + x)

    nodes = []
    for tn in g.node:
        n = onnx.NodeProto()
        n.CopyFrom(tn)
        n.name = prefix + (tn.name or tn.output[0])
        n.input[:] = [rn(x) for x in tn.input]
        n.output[:] = [rn(x) for x in tn.output]
        # The plugin node's module scopes, not the template's helper module: a twin node maps back to
        # the MoE block it stands for, and its bytes do not depend on where the template is defined.
        del n.metadata_props[:]
        n.metadata_props.extend(p for p in node.metadata_props if p.key not in (FOLD_KEY, STACK_TRACE_KEY))
        n.metadata_props.add(key=TWIN_KEY, value=node.name)
        nodes.append(n)
    inits = []
    for ti in g.initializer:
        i = onnx.TensorProto()
        i.CopyFrom(ti)
        i.name = rn(ti.name)
        inits.append(i)
    infos = []
    for tv in g.value_info:
        if tv.name not in mapping:
            v = onnx.ValueInfoProto()
            v.CopyFrom(tv)
            v.name = rn(tv.name)
            infos.append(v)
    return nodes, inits, infos


def make_ort_twin(trt_onnx: Path, out_path: Path | None = None, lowering: str = "ort") -> TwinArtifact:
    """Write the twin of `trt_onnx` (default `<stem>.twin.onnx` beside it) and return it."""

    trt_onnx = Path(trt_onnx)
    out = Path(out_path) if out_path is not None else trt_onnx.with_name(trt_onnx.stem + ".twin.onnx")
    if out.parent.resolve() != trt_onnx.parent.resolve():
        raise ValueError(f"the twin shares {trt_onnx.name}'s external weights: write it to {trt_onnx.parent}")
    model = onnx.load(trt_onnx, load_external_data=False)
    sig = M3_MOE_PLUGIN
    new_nodes: list[Any] = []
    replaced = 0
    opsets = {i.domain: i.version for i in model.opset_import}
    for node in model.graph.node:
        if (node.domain, node.op_type) != (sig.domain, sig.name):
            new_nodes.append(node)
            continue
        template = onnx.load_from_string(_template(_template_key(model, node), lowering))
        nodes, inits, infos = _spliced(template, node)
        new_nodes += nodes
        model.graph.initializer.extend(inits)
        model.graph.value_info.extend(infos)
        opsets |= {i.domain: i.version for i in template.opset_import if i.domain not in opsets}
        replaced += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    opsets.pop(sig.domain, None)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
    onnx.save(model, out)
    return TwinArtifact(out, replaced, lowering)
