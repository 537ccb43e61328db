"""`ort` lowering: standard-op routing feeding one ONNX Runtime `com.microsoft::MoE` node.

The contrib op routes by softmax over its `router_probs` input, M3 by sigmoid + correction bias
(export-notes §4). The exact mapping used here:
  - selection outside the op: MatMul (fp32) → Sigmoid → Add(bias) → TopK;
  - router_probs' = log(s_e) for the chosen experts and a huge negative finite value elsewhere,
    with normalize_routing_weights=0: the op's softmax yields s_e / Σ_chosen s and its top-k picks
    the same experts;
  - routed_scaling_factor: a power of two is folded into fc2 (exact, also in bf16); any other
    value is applied by one Mul on the op's output, because folding it would round every fc2
    weight (to 8 mantissa bits in bf16);
  - fc1 rows are interleaved (g0, u0, g1, u1, ...) because the CPU kernel accepts only
    swiglu_fusion=1, while M3 stores gate and up concatenated.
Weight transforms are graph ops tagged for folding, so the exported graph feeds the MoE node with
ready-made initializers.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from onnx.defs import OpSchema
from onnxscript import ir, values

from m3export.ops.lowering import FOLD_DOMAIN, MoELowering, mark_fold, onnx_ops, onnx_route, static_dims

DOMAIN = "com.microsoft"
# Exact on 1.32 (measured, export-notes §4). Up to 1.31 the CPU kernel uses router_probs as given:
# top-k of the raw values, those values as the weights, experts with weight <= 0 skipped, so the
# log-probabilities fed here drop every routed expert (errors of 0.1-0.46, no error raised); 1.32
# applies a softmax over all experts first. Versions after 1.32 are unverified until measured.
ORT_RANGE = ">=1.32,<1.33"
# Far below any log(sigmoid) yet finite in fp32/bf16, so the op's softmax gives exactly 0 there.
_NEG_FP32 = -1e30
_NEG_FP16 = -6.0e4


@functools.cache
def _moe_schema() -> Any:
    """onnx OpSchema for com.microsoft::MoE (onnxruntime ≥ 1.22 attribute set).

    torch 2.13's exporter needs it explicitly: ORT's contrib schemas are not in onnx's registry.
    `swiglu_limit_after_activation` (newer ORT only) is left out so older runtimes load the graph.
    """

    def param(name: str, optional: bool = False) -> OpSchema.FormalParameter:
        option = (
            OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
        )
        return OpSchema.FormalParameter(name, "T", param_option=option)

    ints = ("k", "normalize_routing_weights", "use_sparse_mixer", "swiglu_fusion")
    floats = ("activation_alpha", "activation_beta", "swiglu_limit")
    return OpSchema(
        "MoE",
        DOMAIN,
        1,
        inputs=[
            param("input"),
            param("router_probs"),
            param("fc1_experts_weights"),
            param("fc1_experts_bias", optional=True),
            param("fc2_experts_weights"),
            param("fc2_experts_bias", optional=True),
            param("fc3_experts_weights", optional=True),
            param("fc3_experts_bias", optional=True),
        ],
        outputs=[param("output")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[
            *(OpSchema.Attribute(n, OpSchema.AttrType.INT, required=False) for n in ints),
            *(OpSchema.Attribute(n, OpSchema.AttrType.FLOAT, required=False) for n in floats),
            OpSchema.Attribute("activation_type", OpSchema.AttrType.STRING, required=False),
        ],
    )


@functools.cache
def _qmoe_schema() -> Any:
    """onnx OpSchema for the com.microsoft::QMoE inputs this lowering feeds (onnxruntime 1.32's
    schema, read from the runtime's own registry: docs/precision.md); the rest are optional and
    trailing, so they are left out."""
    names = [
        ("input", "T"),
        ("router_probs", "T"),
        ("fc1_experts_weights", "T1"),
        ("fc1_scales", "T2"),
        ("fc1_experts_bias", "T"),
        ("fc2_experts_weights", "T1"),
        ("fc2_scales", "T2"),
    ]
    optional = {"fc1_experts_bias"}
    ints = (
        "k",
        "normalize_routing_weights",
        "use_sparse_mixer",
        "swiglu_fusion",
        "expert_weight_bits",
        "block_size",
        "accuracy_level",
        "weights_prepacked",
    )
    floats = ("activation_alpha", "activation_beta", "swiglu_limit")
    floating = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return OpSchema(
        "QMoE",
        DOMAIN,
        1,
        inputs=[
            OpSchema.FormalParameter(
                n,
                t,
                param_option=OpSchema.FormalParameterOption.Optional
                if n in optional
                else OpSchema.FormalParameterOption.Single,
            )
            for n, t in names
        ],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", floating, ""), ("T1", ["tensor(uint8)"], ""), ("T2", floating, "")],
        attributes=[
            *(OpSchema.Attribute(n, OpSchema.AttrType.INT, required=False) for n in ints),
            *(OpSchema.Attribute(n, OpSchema.AttrType.FLOAT, required=False) for n in floats),
            *(
                OpSchema.Attribute(n, OpSchema.AttrType.STRING, required=False)
                for n in ("activation_type", "quant_type")
            ),
        ],
    )


@functools.cache
def _qmoe_op() -> Any:

    return values.Op(values.Opset(DOMAIN, 1), "QMoE", op_schema=_qmoe_schema())


@functools.cache
def _fold_op(name: str) -> Any:
    """A weight transform of m3export's own (FOLD_DOMAIN), evaluated at export by
    m3export/ops/quant.py (onnx_export's fold rules): it never reaches a saved graph."""
    out = "T1" if name == "QuantizeBlockwise" else "T"
    schema = OpSchema(
        name,
        FOLD_DOMAIN,
        1,
        inputs=[OpSchema.FormalParameter("weight", "T")],
        outputs=[OpSchema.FormalParameter("output", out)],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            *([("T1", ["tensor(uint8)"], "")] if out == "T1" else []),
        ],
        attributes=[
            OpSchema.Attribute(n, OpSchema.AttrType.INT, required=False)
            for n in ("bits", "block_size", "n_major")
        ],
    )
    return values.Op(values.Opset(FOLD_DOMAIN, 1), name, op_schema=schema)


@functools.cache
def _moe_op() -> Any:

    return values.Op(values.Opset(DOMAIN, 1), "MoE", op_schema=_moe_schema())


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def _interleave_rows(gate_up: Any) -> Any:
    """[E, 2I, H] gate-then-up rows → g0, u0, g1, u1, ... (swiglu_fusion=1)."""
    op = onnx_ops()

    num_experts, two_inter, hidden = static_dims(gate_up, 3, "gate_up_proj")
    split = op.Reshape(gate_up, op.Constant(value_ints=[num_experts, 2, two_inter // 2, hidden]))
    swapped = op.Transpose(split, perm=[0, 2, 1, 3])
    out = op.Reshape(swapped, op.Constant(value_ints=[num_experts, two_inter, hidden]))
    mark_fold(split, swapped, out)
    return out


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
    *,
    interleave_gate_up: bool,
    apply_routed_scaling: bool,
    quant: tuple[int, int] | None,
    scales_n_major: bool,
) -> Any:

    op = onnx_ops()

    scores, idx = onnx_route(hidden, router_weight, correction_bias, top_k)
    neg = _NEG_FP16 if hidden.dtype == ir.DataType.FLOAT16 else _NEG_FP32
    floor = op.Expand(op.Constant(value_float=neg), op.Shape(scores))
    chosen_log = op.Log(op.GatherElements(scores, idx, axis=1))
    probs = op.ScatterElements(floor, idx, chosen_log, axis=1)
    if hidden.dtype != ir.DataType.FLOAT:
        probs = op.Cast(probs, to=hidden.dtype)

    fc1 = _interleave_rows(gate_up_proj) if interleave_gate_up else gate_up_proj
    scale = routed_scaling_factor if apply_routed_scaling else 1.0
    fc2 = down_proj
    if scale != 1.0 and _is_power_of_two(scale):
        fc2 = op.Mul(down_proj, op.Constant(value=ir.tensor(scale, dtype=down_proj.dtype)))
        mark_fold(fc2)
    activation = {
        "k": top_k,
        "activation_type": "swiglu",
        "swiglu_fusion": 1,
        "activation_alpha": float(swiglu_alpha),
        "activation_beta": float(swiglu_beta),
        "swiglu_limit": float(swiglu_limit),
        "normalize_routing_weights": 0,
        "use_sparse_mixer": 0,
    }
    if quant is None:
        out = _moe_op()(hidden, probs, fc1, None, fc2, **activation)
    else:
        bits, block = quant
        q1, s1 = _quantized(fc1, bits, block, scales_n_major)
        q2, s2 = _quantized(fc2, bits, block, scales_n_major)
        # accuracy_level 0: int4 blocks keep fp32 activations (exact against the dequantised weights);
        # the CPU kernel's int8 blocks quantise activations to int8 per block at every level (measured,
        # docs/precision.md), which the parity tolerances of int8 experts account for.
        out = _qmoe_op()(
            hidden,
            probs,
            q1,
            s1,
            None,
            q2,
            s2,
            expert_weight_bits=bits,
            block_size=block,
            quant_type="int",
            accuracy_level=0,
            weights_prepacked=0,
            **activation,
        )
    if scale != 1.0 and not _is_power_of_two(scale):
        out = op.Mul(out, op.Constant(value=ir.tensor(scale, dtype=hidden.dtype)))
    return out


def _quantized(weight: Any, bits: int, block: int, n_major: bool) -> tuple[Any, Any]:
    """QMoE's (packed uint8 weights, scales) of an [E, N, K] expert weight, both folded at export
    from the (dequantised) eager weights by m3export/ops/quant.py; `n_major=False` plants a bug:
    scales computed right but laid out [E, K / block, N] and read as [E, N, K / block]."""
    attrs = {"bits": bits, "block_size": block}
    packed = _fold_op("QuantizeBlockwise")(weight, **attrs)
    scales = _fold_op("BlockScales")(weight, **attrs, n_major=int(n_major))
    mark_fold(packed, scales)
    return packed, scales


def make_ort_lowering(
    *,
    interleave_gate_up: bool = True,
    apply_routed_scaling: bool = True,
    quant: tuple[int, int] | None = None,
    scales_n_major: bool = True,
) -> MoELowering:
    """The `ort` lowering; with `quant` = (bits, block) its `QMoE` form for int8 / int4 experts.
    The switches exist so tests can plant the bugs a parity check must catch."""
    bugs = [
        n
        for n, ok in (
            ("concat-fc1", interleave_gate_up),
            ("no-scaling", apply_routed_scaling),
            ("k-major-scales", scales_n_major),
        )
        if not ok
    ]
    translate = functools.partial(
        _translate,
        interleave_gate_up=interleave_gate_up,
        apply_routed_scaling=apply_routed_scaling,
        quant=quant,
        scales_n_major=scales_n_major,
    )
    op = "MoE" if quant is None else "QMoE"
    return MoELowering(
        name="ort" + (f"[planted:{','.join(bugs)}]" if bugs else ""),
        summary=f"ONNX Runtime com.microsoft::{op} (SwiGLU-OAI, interleaved fc1) with standard-op routing"
        + ("" if quant is None else f", int{quant[0]} experts in blocks of {quant[1]}"),
        translate=functools.update_wrapper(translate, _translate),
        custom_nodes={(DOMAIN, op): 1},
        onnxruntime=ORT_RANGE,
        quantised=None if quant is not None else _quantised,
    )


def _quantised(bits: int, block: int) -> MoELowering:
    return make_ort_lowering(quant=(bits, block))


ORT_LOWERING = make_ort_lowering()
