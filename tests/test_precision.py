"""Reduced-precision builds (issue #14): `export.precision` and a float16 build of m3-tiny.

The float16 build is one test (one ~60 s build: a module fixture would be rebuilt by each xdist worker
that runs a test of this file). Every step is gated by the float16 defaults of m3export/spec/defaults.py,
and step f compares the float16 pipeline (eager and ONNX Runtime) with the fp32 eager model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from clihelp import run_cli
from pydantic import ValidationError

from m3export.build.plan_report import plan_figures
from m3export.spec import M3Spec
from m3export.split.inputs import golden_cases


def _with_precision(spec: M3Spec, **precision: Any) -> dict[str, Any]:
    data = spec.model_dump(mode="json")
    data["export"]["precision"] = {**data["export"]["precision"], **precision}
    data.pop("tolerances")
    return data


def test_float16_build_passes_every_step_gates_against_fp32_and_checks(
    tmp_path: Path, tiny_spec: M3Spec, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _with_precision(tiny_spec, dtype="float16")
    spec = M3Spec.model_validate(data)
    spec_file = tmp_path / "fp16.yaml"
    spec_file.write_text(json.dumps(data))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["build", str(spec_file), "--out", str(out)], capsys)
    assert code == 0, stdout[-4000:] + stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "pass"

    # fp16 graphs: fp16 activations at every boundary, weights stored at 2 bytes (router + bias fp32).
    for name in manifest["subgraphs"]:
        graph = onnx.load(out / "onnx" / f"{name}.onnx", load_external_data=False)
        floats = {
            i.name: i.type.tensor_type.elem_type
            for i in graph.graph.input
            if i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        }
        fp32 = sorted(n for n, t in floats.items() if t == onnx.TensorProto.FLOAT)
        assert fp32 == (["vision_cos", "vision_sin"] if name == "vision" else []), (name, fp32)
    on_disk = sum(f.stat().st_size for f in (out / "onnx").rglob("*.data"))  # with shared/
    fp16_bytes = plan_figures(spec).weight_bytes
    fp32_bytes = plan_figures(M3Spec.model_validate(_with_precision(tiny_spec))).weight_bytes
    assert fp16_bytes < 0.52 * fp32_bytes
    assert (
        0.95 * fp16_bytes <= on_disk <= 1.05 * fp16_bytes
    )  # small tensors stay in the graph, (on_disk, fp16_bytes)

    # Every step ran (none skipped); step f for each golden case, eager and ONNX Runtime, passed.
    reports = manifest["parity"] + [r for s in manifest["subgraphs"].values() for r in s["parity"]]
    assert not [r for r in reports if r["skipped"]], [r["step"] for r in reports if r["skipped"]]
    assert all(r["passed"] for r in reports)
    precision = {r["case"] for r in manifest["parity"] if r["step"] == "precision"}
    cases = [c.name for c in golden_cases(spec)]
    assert precision == {f"{c}:{b}" for c in cases for b in ("torch", "ort")}
    logits = [
        o
        for r in manifest["parity"]
        if r["step"] == "precision"
        for o in r["outputs"]
        if o["name"] == "logits"
    ]
    assert min(o["cosine"] for o in logits) >= 0.999  # issue #14's target vs fp32
    # ... and it is not a comparison of identical values: fp16 rounding shows.
    assert max(o["max_abs"] for o in logits) > 1e-4

    code, stdout, stderr = run_cli(["check", str(out)], capsys)
    assert code == 0, stdout[-4000:] + stderr[-2000:]
    assert "not re-run: precision (needs the fp32 eager model" in stdout


@pytest.mark.parametrize(
    ("precision", "needle"),
    [
        ({"dtype": "float8"}, "export.precision.dtype"),
        ({"experts": "int2"}, "export.precision.experts"),
        ({"block_size": 48}, "block_size must be a power of two"),
        ({"block_size": 8}, "export.precision.block_size"),
    ],
)
def test_precision_fields_are_validated(tiny_spec: M3Spec, precision: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        M3Spec.model_validate(_with_precision(tiny_spec, **precision))
    text = str(err.value)
    field = needle.rsplit(".", 1)[-1]
    assert field in text and ("export.precision" in text or "precision" in text), text


def test_a_reduced_precision_without_its_fp32_bound_is_refused(tiny_spec: M3Spec) -> None:
    data = _with_precision(tiny_spec, dtype="float16")
    data["tolerances"] = {"precision": None}
    with pytest.raises(ValidationError, match=r"tolerances\.precision is required"):
        M3Spec.model_validate(data)
    # A float32 spec has no fp32 comparison to make: no default, no step.
    assert M3Spec.model_validate(_with_precision(tiny_spec)).tolerances.precision is None


def test_storage_dtype_rounds_random_weights_and_keeps_the_router_fp32(tiny_text_spec: M3Spec) -> None:
    """`dtype: bfloat16` (the storage dtype) with float32 graphs: random weights hold bf16 values (what
    a bf16 checkpoint would), the model computes in fp32, the router is never rounded."""
    import torch

    from m3export.model.factory import load_model

    data = tiny_text_spec.model_dump(mode="json")
    data["dtype"] = "bfloat16"
    bf16_stored = load_model(M3Spec.model_validate(data))
    fp32 = load_model(tiny_text_spec)
    w = bf16_stored.model.layers["1"].self_attn.q_proj.weight
    assert w.dtype == torch.float32 and torch.equal(w, w.bfloat16().float())
    assert torch.equal(w, fp32.model.layers["1"].self_attn.q_proj.weight.bfloat16().float())
    gate = bf16_stored.model.layers["1"].block_sparse_moe.gate.weight
    assert torch.equal(gate, fp32.model.layers["1"].block_sparse_moe.gate.weight)


def _build_cli(
    tmp_path: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple:  # type: ignore[type-arg]
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps(data))
    out = tmp_path / "out"
    return (out, *run_cli(["build", str(spec_file), "--out", str(out), *extra], capsys))


def _reports(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return manifest["parity"] + [r for s in manifest["subgraphs"].values() for r in s["parity"]]


@pytest.mark.parametrize(("dtype", "experts", "vl"), [("float16", "int4", True), ("float32", "int8", False)])
def test_quantised_experts_build_passes_and_gates_the_quantisation_against_fp32(
    tmp_path: Path,
    tiny_spec: M3Spec,
    tiny_text_spec: M3Spec,
    capsys: pytest.CaptureFixture[str],
    dtype: str,
    experts: str,
    vl: bool,
) -> None:
    """int4 experts on float16 graphs of VL m3-tiny (what a deployment ships) and int8 on float32 graphs
    of text-only m3-tiny: every MoE layer is one QMoE node, the graphs match the eager model on the
    dequantised weights (every step, default tolerances), and step `precision` shows what the
    quantisation does against the fp32 model."""
    base = tiny_spec if vl else tiny_text_spec
    data = _with_precision(base, dtype=dtype, experts=experts)
    spec = M3Spec.model_validate(data)
    out, code, stdout, stderr = _build_cli(tmp_path, data, capsys)
    assert code == 0, stdout[-4000:] + stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    reports = _reports(manifest)
    assert manifest["status"] == "pass" and all(r["passed"] for r in reports)
    assert not [r for r in reports if r["skipped"]]
    moe_layers = {"vision": 0, "text_0": 1, "text_1": 2, "mtp": 1}  # m3-tiny: layer 0 dense, 1-3 MoE
    assert sorted(manifest["subgraphs"]) == sorted(n for n in moe_layers if vl or n != "vision")
    for name, sub in manifest["subgraphs"].items():
        counts = {k: v for k, v in sub["node_counts"].items() if "::" in k}
        assert counts == ({"com.microsoft::QMoE": moe_layers[name]} if moe_layers[name] else {}), name
    # The weights on disk are the plan's: experts at bits/8 bytes plus a scale per block.
    on_disk = sum(f.stat().st_size for f in (out / "onnx").rglob("*.data"))
    planned = plan_figures(spec).subgraphs
    assert 0.97 * sum(s.disk_bytes for s in planned) <= on_disk <= 1.03 * sum(s.disk_bytes for s in planned)
    same = plan_figures(M3Spec.model_validate(_with_precision(base, dtype=dtype)))
    assert on_disk < 0.9 * sum(s.disk_bytes for s in same.subgraphs)
    # The lowering is exact against the dequantised eager model; the quantisation shows against fp32.
    onnx_steps = [o for r in reports if r["step"] == "onnx" for o in r["outputs"]]
    bound = 1e-5 if dtype == "float32" else 0.1
    assert max(o["max_abs_scaled"] for o in onnx_steps) <= bound
    logits = [o for r in reports if r["step"] == "precision" for o in r["outputs"] if o["name"] == "logits"]
    assert len(logits) == 2 * len(golden_cases(spec))
    assert min(o["cosine"] for o in logits) >= 0.999
    # Not identical values: the quantisation shows, far above the lowering's own error (~1e-6 in fp32).
    assert max(o["max_abs_scaled"] for o in logits) > 1e-4
    if experts == "int4":
        code, stdout, stderr = run_cli(["check", str(out)], capsys)
        assert code == 0, stdout[-4000:] + stderr[-2000:]


def test_planted_scale_layout_bug_fails_the_quantised_build_naming_the_subgraph(
    tmp_path: Path,
    tiny_text_spec: M3Spec,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The QMoE scales laid out [E, K/block, N] where the op reads [E, N, K/block]: ONNX Runtime runs
    the graph without an error; the build's parity fails in the subgraph and publishes nothing at OUT."""
    import dataclasses

    from m3export.ops import lowering as lowering_registry
    from m3export.ops.lowering_ort import ORT_LOWERING, make_ort_lowering

    def planted(bits: int, block: int) -> Any:
        return dataclasses.replace(make_ort_lowering(quant=(bits, block), scales_n_major=False), name="ort")

    monkeypatch.setitem(
        lowering_registry._REGISTERED, "ort", dataclasses.replace(ORT_LOWERING, quantised=planted)
    )
    data = _with_precision(tiny_text_spec, experts="int4", block_size=16)
    out, code, stdout, stderr = _build_cli(tmp_path, data, capsys, "--only", "text_1")
    assert code == 1, stdout[-4000:] + stderr[-2000:]
    assert "parity FAILED in text_1" in stderr
    assert not out.exists() or not list(out.iterdir())
    failed = json.loads((tmp_path / "out.failed" / "manifest.json").read_text())
    assert not all(r["passed"] for r in failed["subgraphs"]["text_1"]["parity"])


def test_quantised_experts_need_a_block_dividing_their_inputs(tiny_spec: M3Spec) -> None:
    data = _with_precision(tiny_spec, experts="int4", block_size=256)  # hidden 128, expert width 64
    with pytest.raises(
        ValidationError, match=r"export.precision.block_size 256 must divide text.hidden_size"
    ):
        M3Spec.model_validate(data)
