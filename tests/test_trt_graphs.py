"""The TensorRT target on CPU: TensorRT-flavoured ONNX of one tiny text stage, its checks against the
parser's operator matrix and the plugin signature, the graph diff against the ORT-flavoured export,
and the ORT twin's parity vs the eager stage. No TensorRT is imported or faked here.

One export of each flavour of a one-layer stage (layer 3: MoE + MSA, with final norm and lm_head);
~30 s on 2 CPU cores.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from m3export.build.trt_step import TrtResult, build_trt_targets
from m3export.export.onnx_export import export_onnx
from m3export.export.trt.graph_check import check_plugin_node, check_trt_graph, value_types
from m3export.export.trt.graph_diff import diff_graphs
from m3export.export.trt.rewrites import REWRITE_KEY, apply_trt_rewrites
from m3export.export.trt.twin import make_ort_twin
from m3export.ops.lowering import get_lowering
from m3export.ops.trt_signature import M3_MOE_PLUGIN
from m3export.spec import M3Spec
from m3export.split.plan import SubgraphPlan, plan_subgraphs

_REASON = "test-local TensorRT section (tests/test_trt_graphs.py); GPU numbers not yet measured: "
# The `export.trt` section the TensorRT tests use (the shipped m3-tiny.yaml has no TensorRT target).
TRT_SECTION: dict[str, Any] = {
    "profiles": {
        "batch": {"min": 1, "opt": 2, "max": 4},
        "seq": {"min": 1, "opt": 16, "max": 64},
        "past_seq": {"min": 0, "opt": 4, "max": 64},
    },
    "tolerances": {
        "plugin": {
            "fp32": {
                "max_abs": 1.0e-4,
                "reason": _REASON + "the same m3::moe on CUDA vs CPU in fp32 differs only in GEMM "
                "summation order; ORT vs eager on CPU measured 1.2e-6 at these shapes.",
            },
            "bf16": {
                "max_abs": 6.25e-2,
                "max_rel": 1.6e-2,
                "min_cosine": 0.999,
                "reason": _REASON + "bf16 I/O and expert GEMMs vs fp32 eager: ~4 bf16 ulps (2^-8 each) "
                "of outputs reaching ~15; routing stays fp32.",
            },
            "fp16": {
                "max_abs": 1.0e-2,
                "max_rel": 4.0e-3,
                "min_cosine": 0.9999,
                "reason": _REASON + "fp16 I/O and expert GEMMs vs fp32 eager: ~4 fp16 ulps (2^-11 each).",
            },
        },
        "engine": {
            "max_abs": 1.0e-4,
            "min_cosine": 0.9999,
            "min_top1_agreement": 1.0,
            "reason": _REASON + "fp32 engine (TF32 off) vs the eager stage: kernel summation order only.",
        },
    },
}

SIZES = {"batch": 2, "seq": 16, "past_seq": 3}  # trace shapes: >= 2 and distinct from fixed dims
CASES = {"b1_s12_p0": (1, 12, 0), "b2_s40_p5": (2, 40, 5)}  # seq 40 > 2 blocks of 8: MSA drops blocks


def trt_spec(base: M3Spec, layer_ranges: list[list[int]] | None = None) -> M3Spec:
    """`base` with targets [onnx, trt], TRT_SECTION and optional explicit stage ranges."""
    data = base.model_dump(mode="json")
    data["export"] = {**data["export"], "targets": ["onnx", "trt"], "trt": TRT_SECTION}
    if layer_ranges is not None:
        data["pipeline"] = {"layer_ranges": layer_ranges}
    return M3Spec.model_validate(data)


def feed_for(
    plan: SubgraphPlan, spec: M3Spec, batch: int, seq: int, past: int, seed: int
) -> dict[str, torch.Tensor]:
    """Random inputs named and typed as the plan's: positions continue after `past` cached ones."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"batch": batch, "seq": seq, "past_seq": past}
    out: dict[str, torch.Tensor] = {}
    for sig in plan.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in sig.dims]
        if sig.name == "position_ids":
            out[sig.name] = (torch.arange(seq) + past)[None].expand(batch, seq).contiguous()
        elif sig.dtype == "int64":
            out[sig.name] = torch.randint(3, spec.text.vocab_size, shape, generator=g)
        else:
            out[sig.name] = torch.randn(*shape, generator=g).to(getattr(torch, sig.dtype))
    return out


def eager_outputs(
    stage: torch.nn.Module, plan: SubgraphPlan, feed: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outs = stage(*(torch.from_numpy(feed[n]) for n in plan.input_names))
    return {n: o.float().numpy() for n, o in zip(plan.output_names, outs, strict=True)}


def export_both(spec: M3Spec, plan_name: str, out: Path) -> tuple[SubgraphPlan, TrtResult, Path, list[str]]:
    """Export `plan_name` with the ORT lowering, then run `build_trt_targets` on it."""
    import torch.fx.experimental._config as fx_config

    from m3export.model.factory import load_model
    from m3export.split.subgraphs import build_stage

    plan = next(p for p in plan_subgraphs(spec) if p.name == plan_name)
    stage = build_stage(load_model(spec), plan)
    trace = feed_for(plan, spec, SIZES["batch"], SIZES["seq"], SIZES["past_seq"], seed=7)
    axes = {s.name: {i: d for i, d in enumerate(s.dims) if isinstance(d, str)} for s in plan.inputs}
    ort_path = out / "ort" / f"{plan.name}.onnx"
    with fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
        export_onnx(
            stage,
            trace,
            ort_path,
            output_names=plan.output_names,
            dynamic_axes=axes,
            opset=23,
            lowering=get_lowering("ort"),
        )
    golden = {}
    for i, (case, (b, s, p)) in enumerate(CASES.items()):
        feed = {k: v.numpy() for k, v in feed_for(plan, spec, b, s, p, seed=100 + i).items()}
        golden[case] = (feed, eager_outputs(stage, plan, feed))
    said: list[str] = []
    res = build_trt_targets(
        spec, plan, stage, out / plan.name, trace, axes, golden, ort_onnx=ort_path, say=said.append
    )
    return plan, res, ort_path, said


@pytest.fixture(scope="module")
def built(
    tiny_text_spec: M3Spec, tmp_path_factory: pytest.TempPathFactory
) -> tuple[M3Spec, SubgraphPlan, TrtResult, Path, list[str]]:
    spec = trt_spec(tiny_text_spec, [[0, 3], [3, 4]])
    plan, res, ort_path, said = export_both(spec, "text_1", tmp_path_factory.mktemp("trt"))
    return spec, plan, res, ort_path, said


def _load(path: Path | None) -> onnx.ModelProto:
    assert path is not None
    return onnx.load(path, load_external_data=False)


def _plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [
        n for n in model.graph.node if (n.domain, n.op_type) == (M3_MOE_PLUGIN.domain, M3_MOE_PLUGIN.name)
    ]


def test_trt_graph_holds_one_plugin_node_per_moe_layer_with_the_op_constants(built: Any) -> None:
    spec, _plan, res, _, _ = built
    model = _load(res.onnx_path)
    (node,) = _plugin_nodes(model)  # stage text_1 = layer 3 only
    assert [n for n in model.graph.node if n.domain not in ("", "ai.onnx", M3_MOE_PLUGIN.domain)] == []
    prefix = "layers.3.block_sparse_moe."
    assert list(node.input[1:]) == [
        prefix + "gate.weight",
        prefix + "e_score_correction_bias",
        prefix + "experts.gate_up_proj",
        prefix + "experts.down_proj",
    ]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    t = spec.text
    assert attrs == {
        "top_k": t.num_experts_per_tok,
        "routed_scaling_factor": pytest.approx(t.routed_scaling_factor),
        "swiglu_alpha": pytest.approx(t.swiglu_alpha),
        "swiglu_beta": pytest.approx(t.swiglu_beta),
        "swiglu_limit": pytest.approx(t.swiglu_limit),
        "plugin_version": M3_MOE_PLUGIN.version.encode(),
        "plugin_namespace": M3_MOE_PLUGIN.namespace.encode(),
    }
    assert res.graph_check is not None and res.graph_check.passed, res.graph_check.issues
    assert res.graph_check.num_plugin_nodes == 1
    assert res.graph_check.source["tensorrt_version"] == "10.15"


def test_rewrites_are_exactly_what_the_operator_matrix_rejects(built: Any) -> None:
    """The ORT graph (its MoE aside) fails the TensorRT check only on BOOL Equal, and those are the
    nodes the rewrite replaced (the BOOL ScatterElements of the dense MSA block mask went with the
    gathered MSA attention, issue #15; the rewrite rule for it stays, tests/test_trt_rewrites.py)."""
    _, _, res, ort_path, _ = built
    issues = [i for i in check_trt_graph(_load(ort_path)).issues if "custom-domain" not in i.problem]
    assert issues and all("BOOL" in i.problem for i in issues)
    assert sorted(i.node for i in issues) == sorted(r.node for r in res.rewrites)
    assert {r.op for r in res.rewrites} == {"Equal"}
    tagged = {
        n.name for n in _load(res.onnx_path).graph.node if any(p.key == REWRITE_KEY for p in n.metadata_props)
    }
    assert len(tagged) >= 3 * len(res.rewrites)  # casts around each rewritten node


def test_trt_graph_differs_from_the_ort_graph_only_in_moe_and_rewrites(built: Any) -> None:
    _, _, res, ort_path, _ = built
    assert res.graph_diff is not None and res.graph_diff.equivalent, res.graph_diff
    assert res.graph_diff.num_moe_a == res.graph_diff.num_moe_b == 1
    ort, trt = _load(ort_path), _load(res.onnx_path)
    without_rewrites = diff_graphs(ort, trt, ort_path.parent, res.onnx_path.parent)
    assert not without_rewrites.equivalent and "Cast" in str(without_rewrites.first_difference)


def test_graph_diff_and_check_catch_a_change_outside_the_moe(built: Any) -> None:
    _, _, res, ort_path, _ = built
    ort = _load(ort_path)
    apply_trt_rewrites(ort)
    trt = _load(res.onnx_path)
    sigmoid = next(n for n in trt.graph.node if n.op_type == "Sigmoid")
    sigmoid.op_type = "Tanh"  # outside every MoE region
    diff = diff_graphs(ort, trt, ort_path.parent, res.onnx_path.parent)
    assert not diff.equivalent and "Tanh" in str(diff.first_difference)
    sigmoid.op_type = "Det"  # not in the parser's matrix
    assert [i.node for i in check_trt_graph(trt).issues] == [sigmoid.name]


def test_plugin_signature_mismatches_are_caught(built: Any) -> None:
    _, _, res, _, _ = built
    model = _load(res.onnx_path)
    types, ranks = value_types(model)
    (node,) = _plugin_nodes(model)
    assert check_plugin_node(node, types, ranks) == []
    bad = copy.deepcopy(node)
    del bad.attribute[[a.name for a in bad.attribute].index("swiglu_limit")]
    assert any("attributes" in p for p in check_plugin_node(bad, types, ranks))
    bad = copy.deepcopy(node)
    bad.input[1], bad.input[3] = bad.input[3], bad.input[1]  # expert weights where the router goes
    assert any("router_weight" in p for p in check_plugin_node(bad, types, ranks))
    bf16 = dict(types, **{node.input[2]: onnx.TensorProto.BFLOAT16})
    assert any("correction_bias" in p and "FP32" in p for p in check_plugin_node(node, bf16, ranks))


def test_ort_twin_passes_parity_against_the_eager_stage(built: Any) -> None:
    spec, plan, res, _, said = built
    twin = _load(res.twin_path)
    assert not _plugin_nodes(twin)
    assert sum(n.op_type == "MoE" and n.domain == "com.microsoft" for n in twin.graph.node) == 1
    reports = [r for r in res.reports if r.step == "trt_twin"]
    assert [r.case for r in reports] == list(CASES)
    assert all(r.passed for r in reports), [r.failures() for r in reports]
    assert spec.tolerances.onnx is not None
    assert all(o.max_abs <= spec.tolerances.onnx.max_abs for r in reports for o in r.outputs)
    assert {o.name for o in reports[0].outputs} == set(plan.output_names)
    assert any(m.startswith("[trt twin] text_1: pass") for m in said)


def test_twin_parity_catches_a_wrong_plugin_attribute(built: Any, tmp_path: Path) -> None:
    """The twin is built from the plugin node itself: a wrong constant on the node fails parity."""
    _, plan, res, _, _ = built
    model = _load(res.onnx_path)
    (node,) = _plugin_nodes(model)
    next(a for a in node.attribute if a.name == "routed_scaling_factor").f = 1.0
    bad = res.onnx_path.with_name("bad.trt.onnx")  # beside the weights file it references
    onnx.save(model, bad)
    from m3export.runners.ort_runner import OrtRunner

    feed, want = next(iter(res_golden(plan, built).values()))
    got = OrtRunner(make_ort_twin(bad).path).infer(feed)
    err = max(float(np.abs(got[n] - want[n]).max()) for n in plan.output_names)
    assert err > 100 * 1e-5, err


def res_golden(
    plan: SubgraphPlan, built: Any
) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Recompute one golden case for `built` (the fixture does not keep its feeds)."""
    from m3export.model.factory import load_model
    from m3export.split.subgraphs import build_stage

    spec = built[0]
    stage = build_stage(load_model(spec), plan)
    b, s, p = CASES["b2_s40_p5"]
    feed = {k: v.numpy() for k, v in feed_for(plan, spec, b, s, p, seed=5).items()}
    return {"b2_s40_p5": (feed, eager_outputs(stage, plan, feed))}


def test_engine_is_reported_skipped_with_the_reason_never_passed(built: Any) -> None:
    from m3export.export.trt.engine import tensorrt_unavailable

    reason = tensorrt_unavailable()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: the engine is built (see tests/test_trt_gpu.py)")
    _, _, res, _, said = built
    assert res.checks_passed and res.engine is None
    assert res.engine_status == "skipped" and res.engine_reason == reason
    assert res.status == "skipped"
    assert f"[trt engine] text_1: SKIPPED ({reason})" in said
    entry = res.manifest_entry()
    assert entry["status"] == "skipped" and entry["engine"]["status"] == "skipped"
    assert res.onnx_path is not None and not list(res.onnx_path.parent.glob("*.engine"))


def test_trt_backend_refuses_a_build_without_engine_naming_the_reason(built: Any) -> None:
    from m3export.errors import ArtifactError
    from m3export.runners.trt_runner import TrtRunner

    _, _, res, _, _ = built
    if res.engine_status == "built":
        pytest.skip("an engine was built here")
    root = res.onnx_path.parent.parent
    with pytest.raises(ArtifactError, match=r"text_1 has no engine \(skipped: .+\); rebuild"):
        TrtRunner.from_entry(root, "text_1", res.manifest_entry())
    with pytest.raises(ArtifactError, match="text_0 has no TensorRT build"):
        TrtRunner.from_entry(root, "text_0", None)


def test_manifest_entry_records_plugin_profile_and_files(built: Any) -> None:
    spec, _plan, res, _, _ = built
    entry = json.loads(json.dumps(res.manifest_entry()))  # strict JSON
    (plugin,) = entry["plugins"]
    assert plugin["id"] == M3_MOE_PLUGIN.plugin_id and plugin["digest"] == M3_MOE_PLUGIN.digest()
    p = spec.export.trt.profiles
    assert entry["profile"]["hidden_states.3"] == [  # text_1 (layers 3-4) takes the stream entering layer 3
        [p.batch.min, p.seq.min, spec.text.hidden_size],
        [p.batch.opt, p.seq.opt, spec.text.hidden_size],
        [p.batch.max, p.seq.max, spec.text.hidden_size],
    ]
    assert entry["profile"]["past.3.key"][2] == [p.batch.max, 2, p.past_seq.max, 32]
    assert entry["precision"] == "fp32" and entry["graph_check"]["passed"]
    assert set(entry["files"]) == {"text_1.trt.onnx", "text_1.trt.onnx.data", "text_1.trt.twin.onnx"}
    assert entry["node_counts"][f"{M3_MOE_PLUGIN.domain}::{M3_MOE_PLUGIN.name}"] == 1
