"""`portable` lowering: `m3::moe` in default-domain ONNX ops only (m3-architecture.md Appendix A).

Every expert runs on every token (one batched MatMul over the stacked [E, ...] weights) and the
outputs are mixed by a scattered [T, E] weight matrix that is zero outside the chosen k. Exact,
runs on any ONNX runtime, and costs E/k times the FLOPs of a routed kernel: meant for tiny/small
variants and as a second opinion on the `ort` lowering, not for the full model.
Casts mirror the eager op: routing and SwiGLU in fp32, GEMMs in the hidden dtype.
"""

from __future__ import annotations

from typing import Any

from onnxscript import ir

from m3export.ops.lowering import MoELowering, mark_fold, onnx_ops, onnx_route, static_dims


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

    op = onnx_ops()

    f32 = ir.DataType.FLOAT
    dtype = hidden.dtype

    def cast(value: Any, to: ir.DataType) -> Any:
        return value if to == f32 and dtype == f32 else op.Cast(value, to=to)

    def const(x: float) -> Any:
        return op.Constant(value_float=float(x))

    scores, idx = onnx_route(hidden, router_weight, correction_bias, top_k)
    chosen = op.GatherElements(scores, idx, axis=1)
    weights = op.Mul(
        op.Div(chosen, op.ReduceSum(chosen, op.Constant(value_ints=[-1]))), const(routed_scaling_factor)
    )
    dense_weights = op.ScatterElements(
        op.Expand(const(0.0), op.Shape(scores)), idx, weights, axis=1
    )  # [T, E]

    _, two_inter, _ = static_dims(gate_up_proj, 3, "gate_up_proj")
    inter = two_inter // 2
    fc1 = op.Transpose(gate_up_proj, perm=[0, 2, 1])  # [E, H, 2I]
    fc2 = op.Transpose(down_proj, perm=[0, 2, 1])  # [E, I, H]
    mark_fold(fc1, fc2)

    gate_up = cast(op.MatMul(hidden, fc1), f32)  # [E, T, 2I]
    last = op.Constant(value_ints=[-1])
    gate = op.Slice(gate_up, op.Constant(value_ints=[0]), op.Constant(value_ints=[inter]), last)
    up = op.Slice(gate_up, op.Constant(value_ints=[inter]), op.Constant(value_ints=[two_inter]), last)
    gate = op.Min(gate, const(swiglu_limit))
    up = op.Clip(up, const(-swiglu_limit), const(swiglu_limit))
    act = op.Mul(op.Mul(gate, op.Sigmoid(op.Mul(gate, const(swiglu_alpha)))), op.Add(up, const(swiglu_beta)))
    expert_out = cast(op.MatMul(cast(act, dtype), fc2), f32)  # [E, T, H]

    mix = op.Unsqueeze(op.Transpose(dense_weights, perm=[1, 0]), op.Constant(value_ints=[-1]))  # [E, T, 1]
    out = op.ReduceSum(op.Mul(expert_out, mix), op.Constant(value_ints=[0]), keepdims=0)
    return cast(out, dtype)


PORTABLE_LOWERING = MoELowering(
    name="portable",
    summary="default-domain ONNX only: all experts densely, mixed by a scattered [T, E] weight matrix",
    translate=_translate,
    custom_nodes={},
    # Standard ops only: exact from 1.23 (1.22 lacks opset 23) to 1.32, measured (export-notes §4).
    onnxruntime=">=1.23,<1.33",
)
