"""Export an nn.Module to ONNX with torch's dynamo exporter: named I/O, dynamic axes, external data.

The MoE custom op is lowered by the `MoELowering` the caller passes; weight transforms the
lowering tagged (interleave, scale) are folded into initializers here, whatever their size.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx.experimental._config as fx_config
from onnxscript import ir

import m3export.ops.moe  # noqa: F401  (torch.ops.m3.moe must exist to be counted)
from m3export.ops import quant
from m3export.ops.lowering import FOLD_DOMAIN, FOLD_KEY, MoELowering, check_lowered_graph, count_nodes


@dataclass(frozen=True, kw_only=True)
class OnnxArtifact:
    """One exported ONNX file and what a later stage needs to know about it."""

    path: Path
    data_path: Path | None  # external weights file, None when the graph holds no initializers
    shared_files: tuple[Path, ...]  # content-addressed weights files other graphs may reference too
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
    shared: Sequence[str] = (),
) -> OnnxArtifact:
    """Export `module(*inputs.values())`; axes sharing a name in `dynamic_axes` share one symbolic dim.

    Inputs are passed positionally in `inputs` order (the forward's parameter order, or its `*args`);
    their keys become the graph input names.
    Weights go to `<out_path>.data`, except those of the parameters named in `shared` (names in
    `module`, e.g. the embedding another graph also holds): each of those is written once, by content,
    under `<out_path's dir>/shared/` and referenced from there (`save_graph`). Raises if the graph holds
    non-standard nodes other than the lowering's own.
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
    release_rewriter_state()
    assert program is not None
    _fold_tagged(program.model)
    _drop_fold_domain(program.model)
    _uniform_norm_inputs(program.model)
    _strip_stack_traces(program.model)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data_path = out_path.with_name(out_path.name + ".data")
    data_path.unlink(missing_ok=True)  # never leave a stale weights file next to a new graph
    shared_files = save_graph(program.model, out_path, _shared_values(program.model, shared))

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
        shared_files=tuple(shared_files),
        opset=opset,
        input_names=tuple(i.name for i in model.graph.input),
        output_names=tuple(o.name for o in model.graph.output),
        lowering=lowering.name if lowering else None,
        node_counts={(f"{d}::{t}" if d else t): n for (d, t), n in sorted(counts.items())},
        export_seconds=time.perf_counter() - start,
    )


EXTERNAL_THRESHOLD = 256  # bytes: smaller tensors stay in the graph (onnx_ir's save default)
SHARED_DIR = "shared"


def _shared_values(model: object, shared: Sequence[str]) -> set[str]:
    """Initializers holding a shared parameter: the parameter itself, or a transform of it the
    exporter folded (e.g. the lm_head weight transposed for MatMul), whatever name it got."""
    assert isinstance(model, ir.Model)
    names = set(shared)
    found = set()
    for value in model.graph.initializers.values():
        origins = value.meta.get(FOLDED_FROM, set()) | {value.name}
        tensor = value.const_value
        if names & origins and tensor is not None and tensor.nbytes > EXTERNAL_THRESHOLD:
            found.add(str(value.name))
    return found


def save_graph(model: object, path: Path, shared: set[str]) -> list[Path]:
    """Write `model` to `path` with its weights streamed one tensor at a time (lazily folded tensors
    are computed as they are written, so no second copy of the weights is ever held): tensors over
    EXTERNAL_THRESHOLD bytes go to `<path>.data`, densely packed in initializer order; those named in
    `shared` each to `<dir>/shared/<sha256 of the bytes>.onnx.data` (offset 0), which a graph written
    earlier may already have created with the same bytes. Returns the shared files referenced."""

    assert isinstance(model, ir.Model)
    data_path = path.with_name(path.name + ".data")
    shared_dir = path.parent / SHARED_DIR
    referenced: list[Path] = []
    offset = 0
    with open(data_path, "wb") as own:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes <= EXTERNAL_THRESHOLD:
                    continue
                if value.name in shared:
                    # Hashed to name its file, through a view of the tensor's memory: `tobytes()`
                    # would copy it (the embedding of m3-full is 2.3 GiB).
                    raw = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8).data
                    digest = hashlib.sha256(raw).hexdigest()
                    target = shared_dir / f"{digest}.onnx.data"
                    if not target.exists():
                        shared_dir.mkdir(exist_ok=True)
                        part = target.with_name(target.name + ".part")
                        with open(part, "wb") as f:
                            f.write(raw)
                        part.replace(target)
                    del raw
                    location, start = f"{SHARED_DIR}/{target.name}", 0
                    referenced.append(target)
                else:
                    write = getattr(tensor, "tofile", None)  # onnx_ir's tensors stream; others copy once
                    if write is not None:
                        write(own)
                    else:
                        own.write(tensor.tobytes())
                    location, start = data_path.name, offset
                    offset += tensor.nbytes
                value.const_value = ir.ExternalTensor(
                    location,
                    start,
                    tensor.nbytes,
                    tensor.dtype,
                    shape=ir.Shape(tensor.shape.numpy()),
                    name=str(value.name),
                    doc_string=tensor.doc_string,
                    metadata_props=dict(tensor.metadata_props),
                    base_dir=path.parent,
                )
    if offset == 0:
        data_path.unlink()
    ir.save(model, path)  # every weight is external now: the graph references the files above
    return sorted(set(referenced))


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
FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


def _strip_stack_traces(model: object) -> None:
    """Drop the exporter's per-node Python stack traces: they hold absolute paths and line numbers of
    this checkout, so the same spec built from two clones (or after an unrelated edit) would give
    different bytes, and they leak the builder's file system layout into shipped artifacts. The
    module scopes (name_scopes / class_hierarchy) that map a node back to its module stay."""

    assert isinstance(model, ir.Model)
    for node in model.graph.all_nodes():
        node.metadata_props.pop(STACK_TRACE_KEY, None)


def _uniform_norm_inputs(model: object) -> None:
    """Cast a reduced-precision RMSNormalization input to its scale's dtype.

    onnxscript's RMSNorm fusion folds the model's `x.float()` into `stash_type`, giving
    RMSNormalization(X float16, scale float32): valid ONNX, but ONNX Runtime 1.32 refuses the mixed
    types ("Type parameter (T) of Optype (Mul) bound to different types"). The explicit Cast restores
    what the model computes (the norm in fp32, m3-architecture.md §2.2); the fp16 -> fp32 cast is exact.
    """

    assert isinstance(model, ir.Model)
    graph = model.graph
    for node in list(graph.all_nodes()):
        if node.op_type != "RMSNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        x, scale = node.inputs[0], node.inputs[1]
        if x is None or scale is None or x.dtype is None or scale.dtype is None or x.dtype == scale.dtype:
            continue
        cast = ir.node("Cast", [x], attributes={"to": scale.dtype}, name=f"{node.name}_input_cast")
        cast.outputs[0].name = f"{x.name}_as_{scale.dtype.name.lower()}"
        cast.outputs[0].dtype = scale.dtype
        cast.outputs[0].shape = x.shape
        assert node.graph is not None
        node.graph.insert_before(node, cast)
        node.replace_input_with(0, cast.outputs[0])


def _fold_tagged(model: object) -> None:
    """Replace the weight-transform nodes a lowering tagged by initializers computed lazily.

    Each folded initializer is an `ir.LazyTensor`: its values are computed from its sources when the
    graph is saved, one tensor at a time, so folding never holds a second copy of a subgraph's expert
    weights (a subgraph of m3-full holds ~100 GiB of them). Same names, order and values as
    onnxscript's constant folding, which this replaces.
    """

    assert isinstance(model, ir.Model)
    graph = model.graph
    for node in list(graph):
        if node.metadata_props.get(FOLD_KEY) != "1":
            continue
        sources = [_const_tensor(v, node) for v in node.inputs]
        (out,) = node.outputs
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        if node.op_type not in _FOLDS or attrs.get("allowzero"):
            raise AssertionError(f"weight transform {node.op_type} ({node.name}) has no folding rule")
        compute, infer_shape, *out_dtype = _FOLDS[node.op_type]
        shape = infer_shape([tuple(t.shape.numpy()) for t in sources], [_small(t) for t in sources], attrs)
        dtype = out_dtype[0] if out_dtype else sources[0].dtype  # a transform keeps its input's dtype
        folded = ir.Value(
            name=out.name,
            type=ir.TensorType(dtype),
            shape=ir.Shape(shape),
            const_value=ir.LazyTensor(
                functools.partial(_evaluate, compute, sources, attrs, dtype, out.name),
                dtype=dtype,
                shape=ir.Shape(shape),
                name=out.name,
            ),
        )
        # Provenance, as onnxscript's folding records it: the weights (and constants) it came from.
        origins = {str(v.name) for v in node.inputs if v is not None} | {
            o for v in node.inputs if v is not None for o in v.meta.get(FOLDED_FROM, set())
        }
        folded.meta[FOLDED_FROM] = origins
        folded.metadata_props[FOLDED_FROM] = repr(sorted(origins))
        graph.register_initializer(folded)
        inputs = [v for v in node.inputs if v is not None]
        ir.convenience.replace_all_uses_with(out, folded)
        graph.remove(node, safe=True)
        for value in inputs:
            if value.is_initializer() and not value.uses() and not value.is_graph_output():
                assert value.name is not None
                graph.initializers.pop(value.name)


def _drop_fold_domain(model: object) -> None:
    """The fold domain's opset import, once its transforms are folded (none may remain)."""
    assert isinstance(model, ir.Model)
    left = [n.op_type for n in model.graph.all_nodes() if n.domain == FOLD_DOMAIN]
    if left:
        raise AssertionError(f"weight transforms of {FOLD_DOMAIN} left unfolded: {left}")
    model.opset_imports.pop(FOLD_DOMAIN, None)
    model.graph.opset_imports.pop(FOLD_DOMAIN, None)


def _const_tensor(value: ir.Value | None, node: ir.Node) -> ir.TensorProtocol:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None:
        raise AssertionError(f"weight transform {node.op_type} ({node.name}) has a non-constant input")
    return tensor


def _small(tensor: ir.TensorProtocol) -> np.ndarray | None:
    """The values of a shape, perm or scalar input (read); None for a weight (never read here)."""
    return tensor.numpy() if tensor.size <= 64 else None


def _evaluate(
    compute: Any,
    sources: list[ir.TensorProtocol],
    attrs: dict[str, Any],
    dtype: ir.DataType,
    name: str | None,
) -> ir.TensorProtocol:
    array = np.ascontiguousarray(compute([t.numpy() for t in sources], attrs))
    return ir.Tensor(array, dtype=dtype, name=name)


Shapes = list[tuple[int, ...]]
Smalls = list[np.ndarray | None]


def _reshape_target(shapes: Shapes, smalls: Smalls) -> tuple[int, ...]:
    target = smalls[1]
    assert target is not None
    dims = [int(d) if int(d) != 0 else shapes[0][i] for i, d in enumerate(target.tolist())]
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = math.prod(shapes[0]) // known
    return tuple(dims)


# The transforms lowerings tag (mark_fold), as ONNX defines them: op -> (values, output shape[, output
# dtype when it is not the first input's]).
_FOLDS: dict[str, tuple[Any, ...]] = {
    "Transpose": (
        lambda x, attrs: np.transpose(x[0], attrs.get("perm")),
        lambda shapes, smalls, attrs: tuple(
            shapes[0][p] for p in (attrs.get("perm") or reversed(range(len(shapes[0]))))
        ),
    ),
    "Reshape": (
        lambda x, attrs: x[0].reshape(_reshape_target([a.shape for a in x], x)),
        lambda shapes, smalls, attrs: _reshape_target(shapes, smalls),
    ),
    "Mul": (
        lambda x, attrs: np.multiply(x[0], x[1].astype(x[0].dtype)),
        lambda shapes, smalls, attrs: tuple(np.broadcast_shapes(*shapes)),
    ),
    # m3export.fold: the QMoE initializers of an [E, N, K] expert weight (m3export/ops/quant.py).
    "QuantizeBlockwise": (
        lambda x, attrs: quant.quantize(x[0], attrs["bits"], attrs["block_size"])[0],
        lambda shapes, smalls, attrs: (*shapes[0][:-1], shapes[0][-1] * attrs["bits"] // 8),
        ir.DataType.UINT8,
    ),
    "BlockScales": (
        lambda x, attrs: _scales(x[0], attrs),
        lambda shapes, smalls, attrs: (*shapes[0][:-1], shapes[0][-1] // attrs["block_size"]),
    ),
}


def _scales(w: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    scales = quant.block_scales(w, attrs["bits"], attrs["block_size"])
    if attrs.get("n_major", 1):
        return scales
    # The planted layout bug (tests): [E, K / block, N] values read as [E, N, K / block].
    return np.ascontiguousarray(np.swapaxes(scales, -1, -2)).reshape(scales.shape)


def release_rewriter_state() -> None:
    """Drop what onnxscript's rewrite rules remember of the last graph they matched.

    The default and fusion rules are module-level objects whose pattern matchers keep their last
    graph, node and match in attributes, so after an export the whole ir.Graph, and through it every
    weight of the subgraph, stays alive until the next export overwrites them (measured: a 0.5 GiB
    stage stayed resident). A stage-at-a-time build must be able to release a subgraph's weights.
    """

    import gc

    from onnxscript.rewriter._matcher import PatternMatcher

    for obj in gc.get_objects():
        if isinstance(obj, PatternMatcher):
            for attr in ("_graph", "_current_node", "_match", "_tracer"):
                if hasattr(obj, attr):
                    setattr(obj, attr, None)


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
