"""Intermediate values of one subgraph, eager vs ONNX: per-layer hidden states and MoE routing.

Both sides name a value `debug.{layer}.{part}`:
  layer  `layers.{i}` (text decoder layer i), `mtp.{d}` (MTP depth d's decoder layer), `vision.{i}`;
  part   `hidden` (the layer's output), `attn` / `ffn` (its attention / MLP or MoE block output),
         `experts` (MoE only: the selected expert indices [T, k] of the routing TopK; absent from a
         graph whose lowering routes inside one custom node, such as the TensorRT plugin).
The ONNX side finds them from the module scopes the dynamo exporter records on every node
(`pkg.torch.onnx.name_scopes` / `class_hierarchy`), in the exported file as it is (no re-export);
the eager side from forward hooks on the same modules, so the model itself stays export-agnostic.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from m3export.errors import ArtifactError
from m3export.model import LAYER_TYPES, MOE_TYPE
from m3export.ops.moe import route
from m3export.parity.compare import (
    Kind,
    OutputParity,
    ParityReport,
    compare_output,
    compare_outputs,
    describe_bound,
)
from m3export.runners.ort_runner import OrtRunner
from m3export.runners.torch_runner import plan_dtypes, to_tensor
from m3export.spec.base import Tolerance

PREFIX = "debug."


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Module classes by qualified name, as the exporter's class_hierarchy metadata spells them.
LAYER_CLASSES = tuple(qualname(t) for t in LAYER_TYPES)
MOE_CLASS = qualname(MOE_TYPE)
PARTS = {"self_attn": "attn", "mlp": "ffn", "block_sparse_moe": "ffn"}  # child module -> part
SCOPES_KEY, CLASSES_KEY, FX_NODE_KEY = (
    "pkg.torch.onnx.name_scopes",
    "pkg.torch.onnx.class_hierarchy",
    "pkg.torch.onnx.fx_node",
)


def layer_name(path: str, cls: str) -> str:
    """Short layer name of a layer module path, e.g. `lm.model.mtp.layers.0.transformer_layer` -> `mtp.0`."""
    if cls == qualname(LAYER_TYPES[1]) and (m := re.search(r"layers\.(\d+)$", path)):
        return f"vision.{m.group(1)}"
    if m := re.search(r"mtp\.layers\.(\d+)\.transformer_layer$", path):
        return f"mtp.{m.group(1)}"
    if m := re.search(r"(?:^|\.)layers\.(\d+)$", path):
        return f"layers.{m.group(1)}"
    return path


def debug_name(layer: str, part: str) -> str:
    return f"{PREFIX}{layer}.{part}"


def split_debug_name(name: str) -> tuple[str, str]:
    """`debug.layers.2.hidden` -> (`layers.2`, `hidden`)."""
    assert name.startswith(PREFIX), name
    layer, part = name[len(PREFIX) :].rsplit(".", 1)
    return layer, part


# ------------------------------------------------------------------------------------- ONNX side


@dataclass(frozen=True)
class ExposedGraph:
    """A parity copy of an exported graph with `debug.*` outputs; its weights stay in `weights_dir`."""

    model: onnx.ModelProto
    weights_dir: Path  # directory the external data locations are relative to (the original's)
    names: dict[str, str]  # debug output -> the graph value it copies, in graph order
    path: Path | None = None  # where the copy was written, None when it lives in memory only

    def runner(
        self, providers: list[str] | None = None, pinned_data: Mapping[str, Any] | None = None
    ) -> OrtRunner:
        """onnxruntime on the copy: `infer(feed)` returns the graph outputs and every `debug.*`. With
        `pinned_data` (location -> `PinnedFile`) the weights come from those verified descriptors."""

        if pinned_data is not None:
            return OrtRunner.from_pinned(
                _Bytes(self.model.SerializeToString(), self.path), dict(pinned_data), "ort:debug"
            )
        return OrtRunner(self.model.SerializeToString(), providers, external_data_dir=self.weights_dir)


@dataclass(frozen=True)
class _Bytes:
    """A serialized graph in memory, with the `read()` / `path` of a PinnedFile."""

    data: bytes
    path: Path | None

    def read(self) -> bytes:
        return self.data


def expose_intermediates(
    onnx_path: str | Path, out_path: str | Path | None = None, graph_bytes: bytes | None = None
) -> ExposedGraph:
    """Copy of an exported graph whose extra outputs are each layer's `debug.*` values.

    The weights are not loaded or copied: the copy keeps the original's external-data references.
    With `out_path` (in the original's directory, so the references resolve) the copy is written
    there; otherwise it stays in memory (`ExposedGraph.runner()` runs it either way). `graph_bytes`:
    the graph as already read (and verified), instead of reading `onnx_path` again.
    """

    src = Path(onnx_path)
    model = (
        onnx.load_from_string(graph_bytes)
        if graph_bytes is not None
        else onnx.load(src, load_external_data=False)
    )
    names = find_intermediates(model)
    _add_outputs(model, names)
    path = None
    if out_path is not None:
        path = Path(out_path)
        if path.resolve().parent != src.resolve().parent:
            raise ValueError(
                f"{path}: write the parity copy next to {src.name} (in {src.parent}) so that it "
                "shares the original's external weights file"
            )
        onnx.save(model, path)
    return ExposedGraph(model, src.resolve().parent, names, path)


@dataclass
class _Scope:
    path: str
    cls: str
    nodes: list[int]


def _node_scopes(node: onnx.NodeProto) -> list[tuple[str, str]]:
    """(module path, module class) of every module scope enclosing `node`, outermost first."""
    meta = {p.key: p.value for p in node.metadata_props}
    if SCOPES_KEY not in meta or CLASSES_KEY not in meta:
        return []
    paths, classes = ast.literal_eval(meta[SCOPES_KEY]), ast.literal_eval(meta[CLASSES_KEY])
    # Entry 0 is the root module, the last one the FX node itself.
    return list(zip(paths[1:-1], classes[1:-1], strict=True))


def _scopes(model: onnx.ModelProto) -> dict[str, _Scope]:
    scopes: dict[str, _Scope] = {}
    for i, node in enumerate(model.graph.node):
        for path, cls in _node_scopes(node):
            scopes.setdefault(path, _Scope(path, cls, [])).nodes.append(i)
    return scopes


def _used_names(node: onnx.NodeProto) -> Iterator[str]:
    """Every value a node reads, including those its subgraphs (If/Loop bodies) capture."""

    yield from node.input
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in g.node:
                yield from _used_names(sub)


def _value_types(model: onnx.ModelProto) -> dict[str, Any]:
    """value name -> TypeProto, from value_info, graph I/O and initializers."""

    g = model.graph
    types = {v.name: v.type for v in (*g.value_info, *g.input, *g.output)}
    for init in g.initializer:
        types.setdefault(init.name, onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    return types


_FLOATS = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _scope_output(model: onnx.ModelProto, scope: _Scope, types: dict[str, Any], readers: Any) -> str:
    """The value a module scope hands on: the last floating value produced inside it and read
    outside it (or a graph output). Earlier ones are shared shape/rope values the exporter CSE'd."""
    inside = set(scope.nodes)
    graph_outputs = {o.name for o in model.graph.output}
    for i in reversed(scope.nodes):
        for out in model.graph.node[i].output:
            if not out or types.get(out) is None or types[out].tensor_type.elem_type not in _FLOATS:
                continue
            if out in graph_outputs or any(r not in inside for r in readers.get(out, ())):
                return str(out)
    raise ArtifactError(
        f"no floating value leaves module scope {scope.path!r} ({scope.cls}); the graph lacks value_info "
        "for it or was not produced by the dynamo exporter"
    )


def _routing_topk(model: onnx.ModelProto, scope: _Scope) -> str | None:
    """Expert indices of the lowering's routing TopK inside a MoE block scope; None when the lowering
    routes inside one custom node (e.g. the TensorRT plugin) and the selection is not a graph value."""
    topk = [i for i in scope.nodes if model.graph.node[i].op_type == "TopK"]
    # Lowering nodes carry the `m3.moe` FX node they translate; the MSA block TopK lives elsewhere.
    routed = [
        i
        for i in topk
        if any(p.key == FX_NODE_KEY and "m3.moe" in p.value for p in model.graph.node[i].metadata_props)
    ]
    found = routed or topk
    if not found:
        return None
    if len(found) != 1:
        raise ArtifactError(
            f"MoE scope {scope.path!r}: expected one routing TopK, found {len(found)}; "
            "the MoE lowering must route with one TopK (m3export.ops.lowering.onnx_route)"
        )
    return str(model.graph.node[found[0]].output[1])


def find_intermediates(model: onnx.ModelProto) -> dict[str, str]:
    """`debug.*` name -> graph value, for every layer scope in the graph, in graph order."""
    scopes = _scopes(model)
    if not scopes:
        raise ArtifactError(
            f"the graph has no {SCOPES_KEY!r} node metadata; the parity copy needs a graph exported by "
            "torch.onnx.export(dynamo=True) (m3export.export.export_onnx)"
        )
    types = _value_types(model)
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(model.graph.node):
        for name in set(_used_names(node)):
            readers.setdefault(name, []).append(i)
    found: list[tuple[int, str, str]] = []  # (graph position, debug name, value)
    for scope in scopes.values():
        if scope.cls not in LAYER_CLASSES:
            continue
        layer = layer_name(scope.path, scope.cls)
        value = _scope_output(model, scope, types, readers)
        found.append((scope.nodes[-1], debug_name(layer, "hidden"), value))
        for child, part in PARTS.items():
            sub = scopes.get(f"{scope.path}.{child}")
            if sub is None:
                continue
            found.append((sub.nodes[-1], debug_name(layer, part), _scope_output(model, sub, types, readers)))
            experts = _routing_topk(model, sub) if sub.cls == MOE_CLASS else None
            if experts is not None:
                found.append((sub.nodes[-1], debug_name(layer, "experts"), experts))
    return {name: value for _, name, value in sorted(found)}


def _add_outputs(model: onnx.ModelProto, names: Mapping[str, str]) -> None:
    """Append one graph output per debug name: Identity of the value, or a Cast to fp32 for other floats."""

    types = _value_types(model)
    for debug, value in names.items():
        tensor = types[value].tensor_type
        elem = tensor.elem_type
        if elem in _FLOATS and elem != onnx.TensorProto.FLOAT:
            node = onnx.helper.make_node("Cast", [value], [debug], name=debug, to=onnx.TensorProto.FLOAT)
            elem = onnx.TensorProto.FLOAT
        else:
            node = onnx.helper.make_node("Identity", [value], [debug], name=debug)
        model.graph.node.append(node)
        shape = (
            [d.dim_param or d.dim_value or None for d in tensor.shape.dim]
            if tensor.HasField("shape")
            else None
        )
        model.graph.output.append(onnx.helper.make_tensor_value_info(debug, elem, shape))


# ------------------------------------------------------------------------------------- eager side


def _first_tensor(x: Any) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first item of a tuple (x, cache)."""

    while isinstance(x, tuple | list):
        x = x[0]
    assert isinstance(x, torch.Tensor), type(x)
    return x


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()


def _call(stage: torch.nn.Module, inputs: dict[str, Any], input_names: Sequence[str] | None) -> Any:
    """Call a subgraph wrapper as its runner does: positionally in plan order for `forward(*tensors)`."""
    params = inspect.signature(stage.forward).parameters.values()
    if input_names is None and any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        plan: Any = stage.plan  # the split wrappers' SubgraphPlan
        input_names = plan.input_names
    if input_names is not None:
        return stage(*(inputs[n] for n in input_names))
    return stage(**inputs)


def capture_intermediates(
    stage: torch.nn.Module, feed: Mapping[str, np.ndarray], input_names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """The eager `debug.*` values of one forward of a subgraph wrapper on `feed`, in execution order.

    Forward hooks take each layer's and each part's output; a pre-hook on every MoE block recomputes
    the op's routing (`m3export.ops.moe.route`) from the block's input. `input_names` gives the
    positional order of a `forward(*tensors)` wrapper (default: its `plan.input_names`).
    """

    captured: dict[str, np.ndarray] = {}

    def store(name: str, value: torch.Tensor) -> None:
        if name in captured:
            raise AssertionError(f"{name}: the module ran twice in one forward; its value is ambiguous")
        captured[name] = _numpy(value)

    def output_hook(name: str) -> Any:
        return lambda _mod, _args, out: store(name, _first_tensor(out))

    def routing_hook(name: str) -> Any:
        def hook(mod: Any, args: tuple[Any, ...]) -> None:
            x = args[0]
            c = mod.cfg
            flat = x.reshape(-1, x.shape[-1])
            _, idx = route(
                flat, mod.gate.weight, mod.e_score_correction_bias, c.top_k, c.routed_scaling_factor
            )
            store(name, idx)

        return hook

    handles = []
    for path, mod in stage.named_modules():
        cls = qualname(type(mod))
        if cls not in LAYER_CLASSES:
            continue
        layer = layer_name(path, cls)
        handles.append(mod.register_forward_hook(output_hook(debug_name(layer, "hidden"))))
        for child, part in PARTS.items():
            sub = getattr(mod, child, None)
            if not isinstance(sub, torch.nn.Module):
                continue
            handles.append(sub.register_forward_hook(output_hook(debug_name(layer, part))))
            if qualname(type(sub)) == MOE_CLASS:
                handles.append(sub.register_forward_pre_hook(routing_hook(debug_name(layer, "experts"))))
    plan = getattr(stage, "plan", None)
    dtypes = plan_dtypes(plan) if plan is not None else {}
    try:
        with torch.no_grad():
            _call(stage, {k: to_tensor(v, dtypes.get(k)) for k, v in feed.items()}, input_names)
    finally:
        for h in handles:
            h.remove()
    return captured


# ------------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class LayerError:
    """One layer, ONNX vs eager: error of its output and parts, routing agreement, verdict."""

    layer: str  # `layers.2`, `mtp.0`, `vision.1`
    max_abs: float  # of the layer's output hidden state; inf when missing or of another shape
    parts: dict[str, float]  # max abs of `attn` / `ffn`, to tell which half of the layer diverged
    routing_agreement: float | None  # MoE layers: fraction of tokens with the same expert set
    diverged: bool  # the hidden state fails the tolerance (as `compare_output` judges a tensor)
    failures: tuple[str, ...]  # every failed check, hidden, parts and routing

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "max_abs": self.max_abs if math.isfinite(self.max_abs) else str(self.max_abs),
            "parts": self.parts,
            "routing_agreement": self.routing_agreement,
            "diverged": self.diverged,
            "failures": list(self.failures),
        }


def compare_intermediates(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], tol: Tolerance
) -> list[LayerError]:
    """Per layer of `want` (eager, execution order): hidden/part errors and routing agreement of `got`."""
    layers: dict[str, dict[str, str]] = {}
    for name in want:
        if name.startswith(PREFIX):
            layer, part = split_debug_name(name)
            layers.setdefault(layer, {})[part] = name
    errors = []
    for layer, parts in layers.items():
        results: dict[str, OutputParity] = {}
        failures: list[str] = []
        for part, name in parts.items():
            if name not in got:
                failures.append(f"{part}: missing")
                continue
            kind: Kind = "routing" if part == "experts" else "tensor"
            results[part] = r = compare_output(name, np.asarray(got[name]), np.asarray(want[name]), tol, kind)
            failures += [f"{part}: {f}" for f in r.failures]
        hidden, routing = results.get("hidden"), results.get("experts")
        errors.append(
            LayerError(
                layer=layer,
                max_abs=hidden.max_abs if hidden else math.inf,
                parts={p: r.max_abs for p, r in results.items() if p in ("attn", "ffn")},
                routing_agreement=routing.routing_agreement if routing else None,
                diverged=hidden is None or not hidden.passed,
                failures=tuple(failures),
            )
        )
    return errors


def first_divergent_layer(errors: Sequence[LayerError]) -> LayerError | None:
    """The first layer (execution order) whose output exceeds the tolerance, or None."""
    return next((e for e in errors if e.diverged), None)


def describe_divergence(errors: Sequence[LayerError], tol: Tolerance) -> str:
    """One line for a failed parity report: where the error first exceeds the tolerance."""
    first = first_divergent_layer(errors)
    if first is None:
        return f"every layer output is within {describe_bound(tol)}: the error arises after the last layer"
    parts = ", ".join(f"{p} {v:.3g}" for p, v in first.parts.items())
    routing = "" if first.routing_agreement is None else f", routing agreement {first.routing_agreement:.4f}"
    return f"first divergent layer {first.layer}: max abs {first.max_abs:.3g} ({parts}{routing})"


def routing_report(
    step: str,
    subject: str,
    case: str,
    got: Mapping[str, np.ndarray],
    want: Mapping[str, np.ndarray],
    tol: Tolerance,
) -> ParityReport:
    """Routing agreement of every MoE layer in `want` as a ParityReport (`min_routing_agreement`)."""
    expected = {n: v for n, v in want.items() if n.startswith(PREFIX) and n.endswith(".experts")}
    actual = {n: got[n] for n in expected if n in got}
    kinds: dict[str, Kind] = dict.fromkeys(expected, "routing")
    return compare_outputs(step, subject, case, actual, expected, tol, kinds)


def localise(
    rep: ParityReport, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], tol: Tolerance
) -> ParityReport:
    """`rep` with where a failing subgraph first diverges (layer by layer, `got` vs eager `want`)."""

    errors = compare_intermediates(got, want, tol)
    first = first_divergent_layer(errors)
    return replace(
        rep,
        localisation={
            "summary": describe_divergence(errors, tol),
            "first_divergent_layer": first.layer if first else None,
            "layers": [e.to_json() for e in errors],
        },
    )
