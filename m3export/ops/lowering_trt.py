"""`trt` lowering: `m3::moe` as ONE TensorRT plugin node (m3export/trt/signature.py).

The node carries the op's five tensors unchanged, in the op's order, and the op's constants as
attributes (top_k, routed_scaling_factor, swiglu_alpha/beta/limit) plus `plugin_version` /
`plugin_namespace`, which the TensorRT ONNX parser uses to find the registered plugin. The plugin's
computation is the eager `m3::moe` itself (m3export/trt/plugin.py), so nothing of M3's routing
(sigmoid + selection-only correction bias, renormalised unbiased weights, scaling) or SwiGLU-OAI is
re-expressed here, and weights are not re-laid-out.

Dtype policy (strongly typed TensorRT): router weight and correction bias enter in fp32 (the model
keeps them fp32; a Cast is emitted only if a caller passes another dtype), the other tensors and the
output in the activation dtype.
"""

from __future__ import annotations

import functools
from typing import Any

from onnxscript import ir, values

from m3export.ops.lowering import MoELowering, onnx_ops
from m3export.ops.trt_signature import M3_MOE_PLUGIN, PluginSignature


@functools.cache
def _plugin_op(sig: PluginSignature) -> Any:

    return values.Op(values.Opset(sig.domain, 1), sig.name, op_schema=sig.onnx_schema())


def _translate(
    hidden: Any,
    router_weight: Any,
    correction_bias: Any,
    gate_up_proj: Any,
    down_proj: Any,
    top_k: int,
    routed_scaling_factor: float,
    swiglu_alpha: float,
    swiglu_beta: float,
    swiglu_limit: float,
) -> Any:

    sig = M3_MOE_PLUGIN
    tensors = dict(
        zip(sig.input_names, (hidden, router_weight, correction_bias, gate_up_proj, down_proj), strict=True)
    )
    act = hidden.dtype
    for param in sig.inputs:
        value = tensors[param.name]
        want = ir.DataType.FLOAT if param.dtype == "float32" else act
        if value.dtype != want:
            if param.dtype == "T":  # the expert weights follow the activations; a mismatch is a model bug
                raise AssertionError(f"m3::moe {param.name} is {value.dtype}, hidden is {act}")
            tensors[param.name] = onnx_ops().Cast(value, to=want)
    attrs = sig.node_attributes(
        {
            "top_k": top_k,
            "routed_scaling_factor": routed_scaling_factor,
            "swiglu_alpha": swiglu_alpha,
            "swiglu_beta": swiglu_beta,
            "swiglu_limit": swiglu_limit,
        }
    )
    return _plugin_op(sig)(*(tensors[n] for n in sig.input_names), **attrs)


TRT_LOWERING = MoELowering(
    name="trt",
    summary=f"one TensorRT plugin node {M3_MOE_PLUGIN.plugin_id} (v{M3_MOE_PLUGIN.version}) computing m3::moe",
    translate=_translate,
    custom_nodes={(M3_MOE_PLUGIN.domain, M3_MOE_PLUGIN.name): 1},
)
