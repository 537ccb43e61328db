"""Lowerings of `m3::moe` into ONNX: the interface, the registry and shared routing ops.

A lowering is a name plus an onnxscript translation of `m3::moe` (same signature as the op) that
the dynamo exporter calls through `custom_translation_table`. It also declares the non-standard
nodes it may emit, so the exported graph can be verified against that declaration.

Adding a target (e.g. a TensorRT plugin node) is one new module defining a `MoELowering` and one
entry in `_BUILTIN`; nothing else changes.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
from onnxscript import ir, opset18

import m3export.ops.moe  # noqa: F401  (registers torch.ops.m3.moe)
from m3export.errors import SpecError
from m3export.spec.lowerings import declare_lowering

# name -> "module:attribute"; imported on first use so listing names needs no onnxscript.
_BUILTIN: dict[str, str] = {
    "ort": "m3export.ops.lowering_ort:ORT_LOWERING",
    "portable": "m3export.ops.lowering_portable:PORTABLE_LOWERING",
    "trt": "m3export.ops.lowering_trt:TRT_LOWERING",
}
_REGISTERED: dict[str, MoELowering] = {}

# Nodes whose inputs are all weights (layout/scale transforms of initializers) carry this metadata
# key, so the export stage can fold them into new initializers whatever their size.
FOLD_KEY = "m3export.fold"
# The domain of m3export's own weight transforms (quantisation): folded at export, never saved.
FOLD_DOMAIN = "m3export.fold"


@dataclass(frozen=True, kw_only=True)
class MoELowering:
    """How `m3::moe` becomes ONNX for one target.

    translate: called by the exporter with the op's arguments (tensors as onnxscript values,
      scalars as Python numbers) inside an onnxscript tracing context; returns the [T, H] output.
    custom_nodes: the (domain, op_type) pairs outside the default ONNX domain it may emit, with
      the exact number each MoE op produces.
    onnxruntime: the onnxruntime versions (a PEP 440 specifier) on which the lowered graph computes
      `m3::moe` exactly, as measured; recorded in every build and enforced before a graph is run.
    """

    name: str
    summary: str
    translate: Callable[..., Any]
    custom_nodes: dict[tuple[str, str], int] = field(default_factory=dict)
    onnxruntime: str = ""
    # (bits, block) -> the lowering of int8 / int4 block-quantised experts; None: it has no such form.
    quantised: Callable[[int, int], MoELowering] | None = None

    def translation_table(self) -> dict[Callable[..., Any], Callable[..., Any]]:

        return {torch.ops.m3.moe.default: self.translate}


def lowering_names() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTERED})


def register_lowering(lowering: MoELowering) -> None:
    """Register an extra lowering (e.g. from a plugin package) under `lowering.name`."""
    if lowering.name in _BUILTIN or lowering.name in _REGISTERED:
        raise ValueError(f"a lowering named {lowering.name!r} is already registered")
    _REGISTERED[lowering.name] = lowering
    if lowering.onnxruntime:  # ONNX Runtime runs its graphs: a spec may select it as export.moe
        declare_lowering(lowering.name)


def get_lowering(name: str) -> MoELowering:
    """The lowering registered as `name`; SpecError naming the accepted values otherwise."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise SpecError(f"unknown MoE lowering {name!r}; accepted values: {', '.join(lowering_names())}")
    module, attr = _BUILTIN[name].split(":")
    lowering = getattr(importlib.import_module(module), attr)
    assert isinstance(lowering, MoELowering) and lowering.name == name
    return lowering


def lowering_for(spec: Any) -> MoELowering:
    """The lowering a spec's graphs use: export.moe, in its quantised form when
    export.precision.experts is int8 / int4 (SpecError naming the field when it has none)."""
    from m3export.ops.quant import BITS

    lowering = get_lowering(spec.export.moe)
    p = spec.export.precision
    if p.experts == "same":
        return lowering
    if lowering.quantised is None:
        raise SpecError(
            f"export.precision.experts {p.experts!r}: the {lowering.name!r} MoE lowering has no quantised "
            "form; use export.moe: ort (ONNX Runtime com.microsoft::QMoE)"
        )
    return lowering.quantised(BITS[p.experts], p.block_size)


def count_nodes(model: onnx.ModelProto) -> Counter[tuple[str, str]]:
    """(domain, op_type) -> count over the main graph ("" is the default ONNX domain)."""
    return Counter(("" if n.domain == "ai.onnx" else n.domain, n.op_type) for n in model.graph.node)


def check_lowered_graph(model: onnx.ModelProto, lowering: MoELowering | None, num_moe: int) -> None:
    """Raise if the graph holds non-standard nodes other than `num_moe` × the lowering's own."""
    counts = count_nodes(model)
    found = {key: n for key, n in counts.items() if key[0] != ""}
    expected = {key: n * num_moe for key, n in (lowering.custom_nodes if lowering else {}).items() if num_moe}
    if found != expected:
        name = lowering.name if lowering else "no lowering"
        raise AssertionError(
            f"{name}: non-standard nodes {found}, expected {expected} for {num_moe} MoE op(s)"
        )
    if model.functions:  # a function body would hide nodes from the check above
        raise AssertionError(f"unexpected local functions: {[f.name for f in model.functions]}")


def mark_fold(*values: Any) -> None:
    """Tag the producers of `values` (transforms of weights only) for folding at export."""
    for value in values:
        node = value.producer()
        assert node is not None, "mark_fold expects values produced by a node"
        node.metadata_props[FOLD_KEY] = "1"


def onnx_ops() -> Any:
    """The onnxscript opset lowerings build with (the exporter converts it to the target opset).

    Typed Any: onnxscript's per-op stubs reject the tracer's symbolic values.
    """

    return opset18


def onnx_route(hidden: Any, router_weight: Any, correction_bias: Any, top_k: int) -> tuple[Any, Any]:
    """§2.6 routing in standard ONNX, fp32: returns (sigmoid scores [T, E], expert indices [T, k]).

    The bias only picks the experts; mixing weights come from the unbiased scores.
    """

    op = onnx_ops()

    def fp32(value: Any) -> Any:
        return value if value.dtype == ir.DataType.FLOAT else op.Cast(value, to=ir.DataType.FLOAT)

    logits = op.MatMul(fp32(hidden), op.Transpose(fp32(router_weight), perm=[1, 0]))
    scores = op.Sigmoid(logits)
    _, idx = op.TopK(op.Add(scores, fp32(correction_bias)), op.Constant(value_ints=[top_k]), axis=-1)
    return scores, idx


def static_dims(value: Any, rank: int, what: str) -> tuple[int, ...]:
    """Concrete dims of a weight value (weights are never dynamic)."""
    dims = tuple(value.shape) if value.shape is not None else ()
    if len(dims) != rank or not all(isinstance(d, int) for d in dims):
        raise AssertionError(f"{what}: expected a static rank-{rank} shape, got {value.shape}")
    return dims  # type: ignore[return-value]
