"""Export an nn.Module to ONNX with torch's dynamo exporter: named I/O, dynamic axes, external data.

The MoE custom op is lowered by the `MoELowering` the caller passes; weight transforms the
lowering tagged (interleave, scale) are folded into initializers here, whatever their size.
"""

from __future__ import annotations

import inspect
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.fx.experimental._config as fx_config
from onnxscript import ir, optimizer

import m3export.ops.moe  # noqa: F401  (torch.ops.m3.moe must exist to be counted)
from m3export.ops.lowering import FOLD_KEY, MoELowering, check_lowered_graph, count_nodes


@dataclass(frozen=True, kw_only=True)
class OnnxArtifact:
    """One exported ONNX file and what a later stage needs to know about it."""

    path: Path
    data_path: Path | None  # external weights file, None when the graph holds no initializers
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    lowering: str | None
    node_counts: dict[str, int]  # "op_type" or "domain::op_type" -> count
    export_seconds: float


def export_onnx(
    module: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    out_path: Path,
    *,
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int,
    lowering: MoELowering | None = None,
) -> OnnxArtifact:
    """Export `module(*inputs.values())`; axes sharing a name in `dynamic_axes` share one symbolic dim.

    Inputs are passed positionally in `inputs` order (the forward's parameter order, or its `*args`);
    their keys become the graph input names.
    Weights go to `<out_path>.data`. Raises if the graph holds non-standard nodes other than the
    lowering's own.
    """

    start = time.perf_counter()
    dynamic_shapes = _dynamic_shapes(module, inputs, dynamic_axes)

    # Size-oblivious reasoning keeps batch/seq symbolic through the MSA block logic (the exporter
    # would otherwise specialise them on guards such as "num_blocks >= 1").
    with torch.no_grad(), warnings.catch_warnings(), fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
        # Emitted once per input that shares a named dim with another; the names are applied anyway.
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape")
        program = torch.onnx.export(
            module,
            tuple(inputs.values()),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            input_names=list(inputs),
            output_names=list(output_names),
            custom_translation_table=lowering.translation_table() if lowering else None,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    _fold_tagged(program.model)
    _strip_stack_traces(program.model)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data_path = out_path.with_name(out_path.name + ".data")
    data_path.unlink(missing_ok=True)  # never leave a stale weights file next to a new graph
    program.save(out_path, external_data=True)

    model = onnx.load(out_path, load_external_data=False)
    _check_io_names(model, list(inputs), list(output_names))
    _check_dynamic_axes(model, dynamic_axes)
    assert program.exported_program is not None
    num_moe = sum(1 for n in program.exported_program.graph.nodes if n.target is torch.ops.m3.moe.default)
    check_lowered_graph(model, lowering, num_moe)
    counts = count_nodes(model)
    return OnnxArtifact(
        path=out_path,
        data_path=data_path if data_path.exists() else None,
        opset=opset,
        input_names=tuple(i.name for i in model.graph.input),
        output_names=tuple(o.name for o in model.graph.output),
        lowering=lowering.name if lowering else None,
        node_counts={(f"{d}::{t}" if d else t): n for (d, t), n in sorted(counts.items())},
        export_seconds=time.perf_counter() - start,
    )


def _dynamic_shapes(
    module: torch.nn.Module, inputs: Mapping[str, torch.Tensor], dynamic_axes: Mapping[str, Mapping[int, str]]
) -> Any:
    """torch.export dynamic shapes for `inputs`: one `Dim` per distinct symbolic name."""

    unknown = set(dynamic_axes) - set(inputs)
    if unknown:
        raise ValueError(f"dynamic_axes names unknown inputs {sorted(unknown)}; inputs: {list(inputs)}")
    dims: dict[str, torch.export.Dim] = {}
    per_input = tuple(
        {
            axis: dims.setdefault(dim, torch.export.Dim(_dim_name(dim)))
            for axis, dim in dynamic_axes.get(name, {}).items()
        }
        for name in inputs
    )
    # A `forward(*tensors)` takes all inputs as one pytree node; a plain forward one per parameter.
    varargs = any(
        p.kind is inspect.Parameter.VAR_POSITIONAL
        for p in inspect.signature(module.forward).parameters.values()
    )
    return (per_input,) if varargs else per_input


def _dim_name(dim: str) -> str:
    """A torch.export Dim name (an identifier) for a plan dim name such as `past_seq+seq`."""
    return re.sub(r"\W", "_", dim)


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _strip_stack_traces(model: object) -> None:
    """Drop the exporter's per-node Python stack traces: they hold absolute paths and line numbers of
    this checkout, so the same spec built from two clones (or after an unrelated edit) would give
    different bytes, and they leak the builder's file system layout into shipped artifacts. The
    module scopes (name_scopes / class_hierarchy) that map a node back to its module stay."""

    assert isinstance(model, ir.Model)
    for node in model.graph.all_nodes():
        node.metadata_props.pop(STACK_TRACE_KEY, None)


def _fold_tagged(model: object) -> None:
    """Fold the weight-transform nodes a lowering tagged, regardless of onnxscript's size limits."""

    assert isinstance(model, ir.Model)
    tagged = {n for n in model.graph.all_nodes() if n.metadata_props.get(FOLD_KEY) == "1"}
    if not tagged:
        return
    optimizer.fold_constants(model, should_fold=lambda node: True if node in tagged else None)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    for node in model.graph.all_nodes():
        if node.metadata_props.pop(FOLD_KEY, None) is not None:
            raise AssertionError(f"weight transform {node.op_type} ({node.name}) could not be folded")


def _check_io_names(model: object, inputs: list[str], outputs: list[str]) -> None:
    """The graph's I/O are exactly the names asked for, in order: the exporter renames an output that
    clashes with an input (`x` -> `x_1`) and drops unused inputs without an error."""

    assert isinstance(model, onnx.ModelProto)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != inputs or got_out != outputs:
        raise ValueError(
            f"exported graph I/O differ from the plan: inputs {got_in} (want {inputs}), "
            f"outputs {got_out} (want {outputs})"
        )


def _check_dynamic_axes(model: object, dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    """torch 2.13 silently specialises a dynamic axis traced at size 1 (no guard error): catch it."""

    assert isinstance(model, onnx.ModelProto)
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        for axis, name in dynamic_axes.get(graph_input.name, {}).items():
            if not dims[axis].dim_param:
                raise ValueError(
                    f"input {graph_input.name!r} axis {axis} ({name!r}) came out static "
                    f"({dims[axis].dim_value}): the exporter specialised it; trace with a size ≥ 2 "
                    "that no other dimension shares"
                )
