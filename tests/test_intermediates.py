"""Intermediate values, ORT vs eager, on m3-tiny's last text stage (layers 2-3, MoE + MSA) and the MTP
subgraph, with each MoE lowering: they match, routing agrees, and planted bugs are localised.

Cost: four exports (~40 s of CPU); everything else is ORT/eager runs of a few hundred ms."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from m3export.build.export_step import export_plan
from m3export.errors import ArtifactError
from m3export.model.factory import load_model
from m3export.model.moe import SparseMoeBlock
from m3export.ops.lowering import get_lowering
from m3export.ops.moe import route
from m3export.parity.intermediates import (
    ExposedGraph,
    capture_intermediates,
    compare_intermediates,
    describe_divergence,
    expose_intermediates,
    find_intermediates,
    first_divergent_layer,
    routing_report,
)
from m3export.runners.ort_runner import OrtRunner
from m3export.spec import M3Spec, Tolerance
from m3export.split.inputs import trace_inputs as _trace_inputs
from m3export.split.plan import SubgraphPlan, plan_subgraphs
from m3export.split.subgraphs import build_stage

SUBGRAPHS = ("text_1", "mtp")
PARTS = ("hidden", "attn", "ffn", "experts")
EXPECTED = {
    "text_1": {f"debug.layers.{i}.{p}" for i in (2, 3) for p in PARTS},
    "mtp": {f"debug.mtp.0.{p}" for p in PARTS},
}


@pytest.fixture(scope="module")
def model(tiny_text_spec: M3Spec) -> torch.nn.Module:
    return load_model(tiny_text_spec)


@pytest.fixture(scope="module")
def plans(tiny_text_spec: M3Spec) -> dict[str, SubgraphPlan]:
    return {p.name: p for p in plan_subgraphs(tiny_text_spec)}


@pytest.fixture(scope="module", params=["ort", "portable"])
def exported(
    request: pytest.FixtureRequest,
    tiny_text_spec: M3Spec,
    model: torch.nn.Module,
    plans: dict[str, SubgraphPlan],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """text_1 and mtp exported with one lowering: subgraph name -> .onnx path."""
    out = tmp_path_factory.mktemp(request.param)
    lowering = get_lowering(request.param)
    return {
        name: export_plan(
            build_stage(model, plans[name]),
            plans[name],
            tiny_text_spec,
            lowering,
            out / f"{name}.onnx",
        ).path
        for name in SUBGRAPHS
    }


def _feed(spec: M3Spec, plan: SubgraphPlan) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in _trace_inputs(spec, plan).items()}


def _tol(spec: M3Spec) -> Tolerance:
    assert spec.tolerances.onnx is not None
    return spec.tolerances.onnx


def _bias_flips(stage: torch.nn.Module, feed: dict[str, np.ndarray]) -> list[int]:
    """Per MoE block: tokens whose expert set differs without the correction bias."""
    flips: list[int] = []

    def hook(mod: SparseMoeBlock, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        c = mod.cfg
        _, with_bias = route(x, mod.gate.weight, mod.e_score_correction_bias, c.top_k, 1.0)
        _, without = route(x, mod.gate.weight, torch.zeros_like(mod.e_score_correction_bias), c.top_k, 1.0)
        same = (with_bias.sort(-1).values == without.sort(-1).values).all(-1)
        flips.append(int((~same).sum()))

    handles = [m.register_forward_pre_hook(hook) for m in stage.modules() if isinstance(m, SparseMoeBlock)]
    try:
        capture_intermediates(stage, feed)
    finally:
        for h in handles:
            h.remove()
    return flips


def _perturbed_stage(model: torch.nn.Module, plan: SubgraphPlan, name: str, fn: Any) -> torch.nn.Module:
    """The wrapper of `plan` over a copy of the model whose parameter `name` is replaced by fn(param)."""
    bugged = copy.deepcopy(model)
    param = bugged.get_parameter(name)
    with torch.no_grad():
        param.copy_(fn(param))
    return build_stage(bugged, plan)


@pytest.mark.parametrize("name", SUBGRAPHS)
def test_exposed_intermediates_match_eager(
    name: str,
    exported: dict[str, Path],
    model: torch.nn.Module,
    plans: dict[str, SubgraphPlan],
    tiny_text_spec: M3Spec,
) -> None:
    plan, tol = plans[name], _tol(tiny_text_spec)
    feed = _feed(tiny_text_spec, plan)
    stage = build_stage(model, plan)
    exposed = expose_intermediates(exported[name])
    assert set(exposed.names) == EXPECTED[name]
    got = exposed.runner().infer(feed)
    want = capture_intermediates(stage, feed)
    assert set(want) == EXPECTED[name]
    # The parity copy still computes the subgraph's own outputs, unchanged.
    plain = OrtRunner(exported[name]).infer(feed)
    assert all(np.array_equal(got[k], v) for k, v in plain.items())
    # The correction bias changes the selection of some tokens in every MoE layer of this feed...
    assert all(n > 0 for n in _bias_flips(stage, feed))
    errors = compare_intermediates(got, want, tol)
    assert [e.layer for e in errors] == (["layers.2", "layers.3"] if name == "text_1" else ["mtp.0"])
    for e in errors:
        assert not e.diverged and not e.failures, e
        assert e.max_abs <= tol.max_abs and max(e.parts.values()) <= tol.max_abs, e
        assert e.routing_agreement == 1.0, e  # ... and ORT picks exactly the eager experts
    assert first_divergent_layer(errors) is None
    assert routing_report("onnx", name, "trace", got, want, tol).passed


def test_written_copy_shares_the_weights_file(
    exported: dict[str, Path], plans: dict[str, SubgraphPlan], tiny_text_spec: M3Spec
) -> None:
    src = exported["text_1"]
    before = sorted(p.name for p in src.parent.iterdir())
    dst = src.with_name("text_1.debug.onnx")
    exposed = expose_intermediates(src, dst)
    assert exposed.path == dst
    # One new graph file, no new weights file; ORT resolves the original's `.onnx.data` from it.
    assert sorted(p.name for p in src.parent.iterdir()) == sorted([*before, dst.name])
    assert dst.stat().st_size < src.stat().st_size + 64 * 1024  # the graph plus a few outputs
    feed = _feed(tiny_text_spec, plans["text_1"])
    from_file = OrtRunner(dst).infer(feed)
    from_memory = exposed.runner().infer(feed)
    assert set(exposed.names) <= set(from_file)
    assert all(np.array_equal(from_file[k], from_memory[k]) for k in exposed.names)
    with pytest.raises(ValueError, match="next to"):
        expose_intermediates(src, src.parent.parent / "elsewhere.onnx")
    dst.unlink()


def test_planted_eager_attention_bug_is_localised(
    exported: dict[str, Path], model: torch.nn.Module, plans: dict[str, SubgraphPlan], tiny_text_spec: M3Spec
) -> None:
    plan, tol = plans["text_1"], _tol(tiny_text_spec)
    feed = _feed(tiny_text_spec, plan)
    bugged = _perturbed_stage(model, plan, "model.layers.3.self_attn.o_proj.weight", lambda w: 1.5 * w)
    got = expose_intermediates(exported["text_1"]).runner().infer(feed)
    errors = compare_intermediates(got, capture_intermediates(bugged, feed), tol)
    first = first_divergent_layer(errors)
    assert first is not None and first.layer == "layers.3", errors
    assert not errors[0].diverged and errors[0].max_abs <= tol.max_abs  # layer 2 is clean
    assert first.parts["attn"] > 1e3 * tol.max_abs
    assert "first divergent layer layers.3" in describe_divergence(errors, tol)


@pytest.mark.parametrize("layer", [2, 3])
def test_planted_onnx_weight_bug_is_localised(
    layer: int,
    exported: dict[str, Path],
    model: torch.nn.Module,
    plans: dict[str, SubgraphPlan],
    tiny_text_spec: M3Spec,
) -> None:
    """Double one layer's shared-expert down projection in the ONNX copy only: the error starts in
    that layer's FFN, its attention and every earlier layer stay within tolerance."""
    plan, tol = plans["text_1"], _tol(tiny_text_spec)
    feed = _feed(tiny_text_spec, plan)
    exposed = expose_intermediates(exported["text_1"])
    _scale_initializer(exposed, f"layers.{layer}.block_sparse_moe.shared_experts.down_proj.weight", 2.0)
    got = exposed.runner().infer(feed)
    errors = compare_intermediates(got, capture_intermediates(build_stage(model, plan), feed), tol)
    first = first_divergent_layer(errors)
    assert first is not None and first.layer == f"layers.{layer}", errors
    assert all(not e.diverged for e in errors[: errors.index(first)])
    assert first.parts["attn"] <= tol.max_abs < first.parts["ffn"]
    assert first.routing_agreement == 1.0  # the bug is after the router


def _scale_initializer(exposed: ExposedGraph, name: str, factor: float) -> None:
    """Replace one external initializer of the in-memory copy by an embedded, scaled one."""
    inits = {i.name: i for i in exposed.model.graph.initializer}
    assert name in inits, sorted(inits)
    init = inits[name]
    onnx.external_data_helper.load_external_data_for_tensor(init, str(exposed.weights_dir))
    scaled = numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), name)
    init.CopyFrom(scaled)


def test_perturbed_router_shows_routing_disagreement(
    exported: dict[str, Path], model: torch.nn.Module, plans: dict[str, SubgraphPlan], tiny_text_spec: M3Spec
) -> None:
    plan, tol = plans["text_1"], _tol(tiny_text_spec)
    feed = _feed(tiny_text_spec, plan)
    g = torch.Generator().manual_seed(0)
    bugged = _perturbed_stage(
        model,
        plan,
        "model.layers.3.block_sparse_moe.gate.weight",
        lambda w: w + 0.05 * torch.randn(w.shape, generator=g),
    )
    got = expose_intermediates(exported["text_1"]).runner().infer(feed)
    want = capture_intermediates(bugged, feed)
    errors = {e.layer: e for e in compare_intermediates(got, want, tol)}
    assert errors["layers.2"].routing_agreement == 1.0
    agreement = errors["layers.3"].routing_agreement
    assert agreement is not None and agreement < 0.9
    report = routing_report("onnx", "text_1", "trace", got, want, tol)
    assert [o.name for o in report.outputs if not o.passed] == ["debug.layers.3.experts"]


def test_missing_values_and_missing_metadata_fail(exported: dict[str, Path], tiny_text_spec: M3Spec) -> None:
    want = {"debug.layers.2.hidden": np.zeros((2, 3)), "debug.layers.2.experts": np.zeros((6, 2), np.int64)}
    (err,) = compare_intermediates(
        {"debug.layers.2.experts": want["debug.layers.2.experts"]}, want, _tol(tiny_text_spec)
    )
    assert err.diverged and err.routing_agreement == 1.0 and err.failures == ("hidden: missing",)
    model = onnx.load(exported["mtp"], load_external_data=False)
    # A lowering that routes inside one node (the TensorRT plugin) leaves no selection to expose.
    for node in model.graph.node:
        if node.op_type == "TopK" and "block_sparse_moe" in node.name + str(node.metadata_props):
            node.op_type = "PluginTopK"
    assert set(find_intermediates(model)) == EXPECTED["mtp"] - {"debug.mtp.0.experts"}
    for node in model.graph.node:
        del node.metadata_props[:]
    with pytest.raises(ArtifactError, match="name_scopes"):
        find_intermediates(model)
