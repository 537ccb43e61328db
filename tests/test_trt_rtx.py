"""TensorRT-RTX for real on CPU (issue #16): NVIDIA's ONNX parser reads every TensorRT-flavoured graph
of a tiny build and TensorRT-RTX builds one engine per subgraph ahead of time, with our IPluginV3 MoE
plugin; `check` reads the engines' headers. Needs the pinned wheels, which `make setup` installs
(CI has them); where they are missing the engine tests skip and the SKIP-path tests still run.

One full tiny build with `targets: [onnx, trt, trt_rtx]` (~2 min on 2 cores) plus a few engine builds
of single graphs (~5 s each: a child process, the parser and the builder).
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from clihelp import run_cli, run_cli_uncaptured

from m3export.export.trt import rtx
from m3export.export.trt.rtx import RtxBuildError, build_rtx_engine, engine_headers, rtx_unavailable
from m3export.ops.trt_rtx_plugin import check_fields
from m3export.ops.trt_signature import M3_MOE_PLUGIN
from m3export.spec import M3Spec

needs_rtx = pytest.mark.skipif(rtx_unavailable() is not None, reason=str(rtx_unavailable()))

SUBGRAPHS = ("vision", "text_0", "text_1", "mtp")


@pytest.fixture(scope="session")
def rtx_build(tiny_spec: M3Spec, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """m3-tiny with `targets: [onnx, trt, trt_rtx]`, built through the CLI once per test run (with or
    without the TensorRT-RTX wheels): under
    pytest-xdist the workers share one build (the first builds it under a lock, the others wait and
    reuse it; `--dist loadgroup` does not group tests with pytest 9 here)."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    tmp = tmp_path_factory.getbasetemp().parent / f"rtx-{run}" if run else tmp_path_factory.mktemp("rtx")
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = tmp / "result.json"
        if not done.is_file():
            data = tiny_spec.model_dump(mode="json")
            data["export"]["targets"] = ["onnx", "trt", "trt_rtx"]
            spec_file = tmp / "rtx.yaml"
            spec_file.write_text(json.dumps(data))
            code, stdout, stderr = run_cli_uncaptured(["build", str(spec_file), "--out", str(tmp / "out")])
            assert code == 0, stdout[-4000:] + stderr[-2000:]
            done.write_text(json.dumps({"stdout": stdout, "stderr": stderr}))
        said = json.loads(done.read_text())
    return tmp / "out", said["stdout"], said["stderr"]


@needs_rtx
def test_build_makes_one_engine_per_subgraph_and_reports_them_built_not_run(rtx_build: Any) -> None:
    out, stdout, _ = rtx_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "pass"
    for name in SUBGRAPHS:
        sub = manifest["subgraphs"][name]
        eng = sub["trt"]["rtx_engine"]
        assert eng["status"] == "built", (name, eng)
        assert eng["tensorrt_rtx_version"] == rtx.RTX_VERSION
        assert eng["compute_capabilities"] == ["SM80", "SM86", "SM89", "SM120"]
        assert eng["plugin"]["digest"] == M3_MOE_PLUGIN.digest()
        path = out / name / eng["path"]
        assert path.stat().st_size > 100_000
        assert f"{name}/{eng['path']}" in sub["files"]  # hashed: integrity covers the engine
        steps = {(r["step"], r["status"]) for r in sub["parity"]}
        assert ("trt_rtx_engine", "built") in steps and ("trt_rtx_run", "skip") in steps
        assert ("trt_twin", "pass") in steps
        # the parity table: the engine as BUILT (not SKIP, not pass) and its execution as SKIP
        assert any(
            f"{name}" in ln and "trt_rtx_engine" in ln and "BUILT (" in ln for ln in stdout.splitlines()
        )
        assert any(f"{name}" in ln and "trt_rtx_run" in ln and "SKIP (" in ln for ln in stdout.splitlines())
    # every MoE layer's plugin node went through our creator; fp32 Attention was decomposed
    attn = {
        n: manifest["subgraphs"][n]["trt"]["rtx_engine"]["decomposed_attention_layers"] for n in SUBGRAPHS
    }
    # SDPA is left only in full-attention layers (vision's 2, text layer 0); MSA layers attend over
    # gathered blocks with MatMul / Einsum (issue #15), with no Attention layer to decompose.
    assert attn == {"vision": 2, "text_0": 1, "text_1": 0, "mtp": 0}


@needs_rtx
def test_check_reads_the_engine_headers_and_skips_their_execution(
    rtx_build: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, _, _ = rtx_build
    report = tmp_path / "check.json"
    code, stdout, stderr = run_cli(["check", str(out), "--report", str(report)], capsys)
    assert code == 0, stdout + stderr
    doc = json.loads(report.read_text())
    assert [e["subgraph"] for e in doc["engines"]] == list(SUBGRAPHS)
    assert all(e["header"] == "well-formed" and e["diagnostics"] & 33 == 0 for e in doc["engines"])
    assert any("trt_rtx execution of" in s and "needs an RTX GPU" in s for s in doc["skipped"])


@needs_rtx
def test_engine_header_tells_an_engine_from_garbage(rtx_build: Any, tmp_path: Path) -> None:
    out, _, _ = rtx_build
    garbage = tmp_path / "garbage.engine"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    real = out / "text_1" / "text_1.rtx.engine"
    heads = engine_headers([real, garbage])
    assert heads[0].file_problems == []
    assert heads[1].file_problems == ["MALFORMED_ENGINE"]


def _plugin_node(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == M3_MOE_PLUGIN.name)


def _copy_graph(out: Path, name: str, dst: Path) -> Path:
    """The TensorRT-flavoured graph of `name` with its external data, in `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in (out / name).glob(f"{name}.trt.onnx*"):
        (dst / f.name).write_bytes(f.read_bytes())
    return dst / f"{name}.trt.onnx"


@needs_rtx
def test_a_plugin_attribute_of_the_wrong_type_fails_the_engine_build_naming_the_subgraph(
    rtx_build: Any, tmp_path: Path
) -> None:
    out, _, _ = rtx_build
    manifest = json.loads((out / "manifest.json").read_text())
    path = _copy_graph(out, "text_1", tmp_path)
    model = onnx.load(path, load_external_data=False)
    node = _plugin_node(model)
    top_k = next(a for a in node.attribute if a.name == "top_k")
    node.attribute.remove(top_k)
    node.attribute.append(onnx.helper.make_attribute("top_k", float(top_k.i)))  # FLOAT, not INT
    onnx.save(model, path)
    shapes = manifest["subgraphs"]["text_1"]["trt"]["profile"]
    engine = tmp_path / "text_1.rtx.engine"
    with pytest.raises(RtxBuildError) as err:
        build_rtx_engine(path, engine, shapes, subgraph="text_1", precision="fp32")
    msg = str(err.value)
    assert "text_1" in msg and "\n" not in msg
    assert not engine.exists() and not list(tmp_path.glob(".*partial"))


def test_check_fields_refuses_missing_and_mistyped_attributes() -> None:
    good = {a.name: ("INT32" if a.kind == "int" else "FLOAT32", np.ones(1)) for a in M3_MOE_PLUGIN.attributes}
    check_fields(good)
    with pytest.raises(ValueError, match=r"top_k.*FLOAT32.*int"):
        check_fields({**good, "top_k": ("FLOAT32", np.ones(1))})
    with pytest.raises(ValueError, match=r"swiglu_limit.*missing"):
        check_fields({k: v for k, v in good.items() if k != "swiglu_limit"})
    with pytest.raises(ValueError, match="one value"):
        check_fields({**good, "swiglu_alpha": ("FLOAT32", np.ones(3))})


@needs_rtx
def test_a_child_that_dies_is_one_line_naming_the_subgraph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library can abort the process: the parent reports the signal, keeps no partial engine."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'terminate called without an active exception' >&2\nkill -ABRT $$\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(rtx.sys, "executable", str(fake))
    engine = tmp_path / "x.engine"
    with pytest.raises(RtxBuildError) as err:
        build_rtx_engine(tmp_path / "mtp.trt.onnx", engine, {}, subgraph="mtp", precision="fp32")
    msg = str(err.value)
    assert msg.startswith("TensorRT-RTX engine of mtp: the TensorRT-RTX child process died (signal 6)")
    assert "terminate called" in msg and "\n" not in msg
    assert not engine.exists()


@needs_rtx
def test_the_loader_link_is_private_and_points_at_the_wheel() -> None:
    d = rtx.loader_dir()
    link = d / "libtensorrt_rtx.so"
    assert link.is_symlink() and Path(os.readlink(link)).name == "libtensorrt_rtx.so.1"
    assert not str(d).startswith(("/usr", "/lib", "/etc"))


@needs_rtx
def test_the_creator_registers_from_the_manifest_record_and_refuses_another_digest() -> None:
    import tensorrt_rtx_bindings as trt

    from m3export.errors import ArtifactError
    from m3export.ops.trt_rtx_plugin import register_rtx_from_manifest, rtx_plugin_record

    record = rtx_plugin_record()
    (creator,) = register_rtx_from_manifest(trt, [record])
    sig = M3_MOE_PLUGIN
    found = trt.get_plugin_registry().get_creator(sig.name, sig.version, sig.namespace)
    assert found is not None and creator.name == sig.name
    assert [f.name for f in creator.field_names] == list(sig.attribute_names)
    with pytest.raises(ArtifactError, match="rebuild the engines"):
        register_rtx_from_manifest(trt, [{**record, "digest": "0" * 64}])


def _fp16_spec(spec: M3Spec) -> M3Spec:
    data = spec.model_dump(mode="json")
    data["export"]["precision"]["dtype"] = "float16"
    data.pop("tolerances")
    return M3Spec.model_validate(data)


def _fp16_trt_graph(spec: M3Spec, name: str, model: Any, dst: Path) -> Path:
    """Subgraph `name`'s TensorRT-flavoured graph as a float16 build makes it (the fp16 model, the
    router and correction bias in fp32; the build's `trt` export and rewrites)."""
    from m3export.build.trt_step import _export_trt_onnx
    from m3export.export.trt.rewrites import apply_trt_rewrites
    from m3export.split.inputs import trace_inputs
    from m3export.split.plan import plan_subgraphs
    from m3export.split.subgraphs import build_stage

    plan = next(p for p in plan_subgraphs(spec) if p.name == name)
    path = dst / name / f"{name}.trt.onnx"
    stage = build_stage(model, plan)
    _export_trt_onnx(stage, plan, spec, trace_inputs(spec, plan), plan.dynamic_axes, path)
    graph = onnx.load(path, load_external_data=False)
    apply_trt_rewrites(graph)
    onnx.save(graph, path)
    return path


# text_1 holds both things fp16 changes for TensorRT-RTX: fp16 Attention (its dedicated kernel, no
# decomposition needed) and the plugin's fp16 format combinations with an fp32 router. The fp16
# engines of vision, text_0 and mtp built by hand the same way (5.4 s / 6.9 s / 6.3 s); they are
# left out here for CI time (~25 s each: an export and a build).
FP16_SUBGRAPHS = ("text_1",)


@needs_rtx
def test_fp16_graphs_parse_and_build(tiny_spec: M3Spec, tmp_path: Path) -> None:
    """fp16 engines: fp16 Attention builds with its dedicated kernel, the plugin's format
    combinations accept fp16 hidden / expert tensors with an fp32 router. Independent of the shared
    build, so another worker can run it meanwhile."""
    from m3export.export.trt.engine import profile_shapes
    from m3export.model.factory import load_model
    from m3export.spec.export import TrtSpec
    from m3export.split.plan import plan_subgraphs

    spec = _fp16_spec(tiny_spec)
    model = load_model(spec)
    plans = {p.name: p for p in plan_subgraphs(spec)}
    for name in FP16_SUBGRAPHS:
        path = _fp16_trt_graph(spec, name, model, tmp_path)
        inputs = {
            i.name: i.type.tensor_type.elem_type
            for i in onnx.load(path, load_external_data=False).graph.input
        }
        assert onnx.TensorProto.FLOAT16 in inputs.values() and onnx.TensorProto.FLOAT not in inputs.values()
        shapes = profile_shapes(plans[name], TrtSpec(), spec)
        eng = build_rtx_engine(
            path, path.with_name(f"{name}.rtx.engine"), shapes, subgraph=name, precision="fp16"
        )
        assert eng.path.stat().st_size > 50_000
        assert engine_headers([eng.path])[0].file_problems == []


@needs_rtx
def test_check_fails_integrity_on_an_engine_tensorrt_rtx_reads_as_malformed(
    rtx_build: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Garbage in place of an engine, with a consistent (re-hashed, re-sealed) manifest: only the
    header check can see it; exit 3 before any parity runs."""
    from checkhelp import copy_artifacts, rewrite_manifest

    out, _, _ = rtx_build
    copy = copy_artifacts(out, tmp_path / "a")
    (copy / "text_0" / "text_0.rtx.engine").write_bytes(np.random.default_rng(1).bytes(20_000))
    rewrite_manifest(copy)
    code, stdout, stderr = run_cli(["check", str(copy)], capsys)
    assert code == 3, stdout + stderr
    assert "text_0/text_0.rtx.engine" in stderr and "MALFORMED_ENGINE" in stderr
    assert stderr.count("\n") == 1 and "[onnx]" not in stdout


def test_without_tensorrt_the_datacenter_engine_is_skip_and_the_build_passes(rtx_build: Any) -> None:
    """TRT-flavoured ONNX + CPU checks (ORT twin parity) pass, the `trt` engine is SKIP (not pass) in
    the table and the manifest, with the reason, and the build exits 0 (the fixture asserts it)."""
    from m3export.export.trt.engine import tensorrt_unavailable

    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT and a GPU are present: the engine is built (see tests/test_trt_gpu.py)")
    out, stdout, _ = rtx_build
    assert "trt_engine" in stdout and "SKIP (no engine: tensorrt is not installed" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["trt"]["status"] == "skipped"
    for name in SUBGRAPHS:
        sub = manifest["subgraphs"][name]
        assert sub["trt"]["status"] == "skipped" and sub["trt"]["engine"]["status"] == "skipped"
        assert f"{name}/{name}.trt.onnx" in sub["files"]
        steps = {(r["step"], r["status"]) for r in sub["parity"]}
        assert ("trt_twin", "pass") in steps and ("trt_engine", "skip") in steps
    assert [p for p in out.glob("*/*.engine") if not p.name.endswith(".rtx.engine")] == []


def test_without_the_wheels_the_rtx_engine_is_skip_with_an_install_hint(
    tiny_spec: M3Spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine step of a subgraph whose CPU checks passed, as if the wheels were absent: SKIP with
    the pinned install command, status `skipped` (not pass, not fail), no engine file."""
    from m3export.build.trt_result import TrtResult
    from m3export.build.trt_step import _rtx_engine_step
    from m3export.spec.export import TrtSpec
    from m3export.split.plan import plan_subgraphs

    monkeypatch.setattr(rtx, "RTX_MODULE", "tensorrt_rtx_bindings_not_installed")
    plan = next(p for p in plan_subgraphs(tiny_spec) if p.name == "text_1")
    res = TrtResult("text_1", "fp32", {}, onnx_path=tmp_path / "text_1.trt.onnx")
    said: list[str] = []
    _rtx_engine_step(res, plan, TrtSpec(), {}, said.append)
    assert res.rtx_status == "skipped" and res.rtx_engine is None and res.status == "skipped"
    (rep,) = res.skips
    assert rep.status == "skip" and rep.step == "trt_rtx_engine"
    assert f"pip install 'tensorrt-rtx-cu13-libs=={rtx.RTX_VERSION}'" in str(rep.skipped)
    assert said == [f"[trt_rtx engine] text_1: SKIPPED ({res.rtx_reason})"]
    assert not list(tmp_path.iterdir())
