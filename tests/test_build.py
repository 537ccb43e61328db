"""`m3export build`: split + ONNX export + parity gate, end to end on m3-tiny (CPU, ~75 s)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from clihelp import run_cli

import m3export.ops.lowering as lowering_registry
from m3export.artifacts.io import sha256_file
from m3export.artifacts.manifest import SCHEMA_VERSION
from m3export.build.driver import build
from m3export.ops.lowering_ort import make_ort_lowering
from m3export.spec import M3Spec

SPEC = Path(__file__).resolve().parents[1] / "specs" / "m3-tiny.yaml"


def _moe_layers(spec: M3Spec, layers: list[int]) -> int:
    return sum(spec.text.is_moe_layer(i) for i in layers)


def test_build_ort_passes_and_writes_a_manifest(
    tmp_path: Path, tiny_spec: M3Spec, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m3-tiny"
    code, stdout, stderr = run_cli(["build", str(SPEC), "--out", str(out)], capsys)
    assert code == 0, stdout + stderr
    for label in ("[a split]", "[b onnx]", "[c end_to_end]", "[d decode]"):
        assert label in stdout
    assert "FAIL" not in stdout and "build m3-tiny: pass" in stdout
    assert stderr == ""  # no library warnings on a successful build (issue #11 item 15)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["status"] == "pass"
    assert manifest["moe_lowering"] == "ort" and len(manifest["spec_hash"]) == 64
    subs = manifest["subgraphs"]
    assert set(subs) == {"vision", "text_0", "text_1", "mtp"}  # manifest keys are sorted
    for name, sub in subs.items():
        for rel, digest in sub["files"].items():
            assert sha256_file(out / rel) == digest, rel
        assert f"onnx/{name}.onnx" in sub["files"] and f"{name}/golden_inputs.npz" in sub["files"]
        assert sub["parity"] and all(r["passed"] for r in sub["parity"])
        cases = {r["case"] for r in sub["parity"]}
        assert {"b2_s40_img2", "b2_s12_img1"} <= cases  # seq 40 drops MSA blocks; batch 2; images
        if sub["kind"] != "vision":  # one-token decode steps after 39 cached positions
            assert {"b2_s40_img2.decode", "b1_s40_img1.decode"} <= cases
        else:  # the vision subgraph also runs on a video (5 temporal patches: 2 attention segments)
            assert "b2_s40_img1_vid1.video" in cases
        moe = sub["node_counts"].get("com.microsoft::MoE", 0)
        if sub["kind"] == "text":
            assert moe == _moe_layers(tiny_spec, sub["layers"]) > 0, name
        elif sub["kind"] == "mtp":
            assert moe == tiny_spec.text.num_mtp_modules
        else:
            assert moe == 0
    steps = {r["step"] for r in manifest["parity"]}
    assert steps == {"split", "end_to_end", "decode", "generate"}
    e2e = {r["case"] for r in manifest["parity"] if r["step"] == "end_to_end"}
    assert "b2_s40_img1_vid1" in e2e  # image + video spliced into stage 0, chained through ORT
    decode = {r["case"] for r in manifest["parity"] if r["step"] == "decode"}
    assert {"b2_s40_img2:ort", "b2_s40_img2:torch"} <= decode
    split = [o for r in manifest["parity"] if r["step"] == "split" for o in r["outputs"]]
    assert split and all(o["max_abs"] == 0.0 for o in split)
    assert not (tmp_path / "m3-tiny.failed").exists()


def test_build_portable_passes(tmp_path: Path, tiny_spec: M3Spec) -> None:
    data = tiny_spec.model_dump(mode="json")
    data["export"]["moe"] = "portable"
    result = build(M3Spec.model_validate(data), tmp_path / "portable")
    assert result.passed, result.failed_subjects()
    assert {r.step for r in result.reports} == {
        "onnx",
        "routing",
        "split",
        "end_to_end",
        "decode",
        "generate",
    }
    for name, sub in result.manifest["subgraphs"].items():
        assert not [k for k in sub["node_counts"] if "::" in k], name  # default ONNX domain only


def test_planted_moe_layout_bug_fails_the_build_and_keeps_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The planted bug: the `ort` lowering feeds gate/up concatenated where the op needs them interleaved.
    buggy = dataclasses.replace(make_ort_lowering(interleave_gate_up=False), name="ort")
    monkeypatch.setitem(lowering_registry._REGISTERED, "ort", buggy)
    out = tmp_path / "m3-tiny"
    out.mkdir()  # empty: --out may only replace an empty directory or an m3export build (issue #11)
    code, stdout, stderr = run_cli(["build", str(SPEC), "--out", str(out), "--only", "text_1"], capsys)
    assert code == 1, stdout + stderr
    assert "parity FAILED in text_1" in stderr
    # Localised: text_1 owns layers 2-3; both are MoE, so layer 2 is the first to diverge.
    assert "text_1 b2_s40_img2: first divergent layer layers.2" in stderr
    assert "FAIL" in stdout
    assert out.is_dir() and not list(out.iterdir())  # the failed build was not published at OUT
    failed = json.loads((tmp_path / "m3-tiny.failed" / "manifest.json").read_text())
    assert failed["status"] == "fail"
    assert not all(r["passed"] for r in failed["subgraphs"]["text_1"]["parity"])


def test_unknown_subgraph_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_cli(["build", str(SPEC), "--out", str(tmp_path / "x"), "--only", "text_9"], capsys)
    assert code == 2
    assert "text_9" in stderr and "text_0" in stderr


@pytest.mark.parametrize(
    ("precision", "export", "starts"),
    [
        ({"dtype": "bfloat16"}, {}, "error: export.precision.dtype 'bfloat16': ONNX Runtime's CPU provider"),
        (
            {"experts": "int4"},
            {"moe": "portable"},
            "error: export.precision.experts 'int4': the 'portable' MoE lowering has no quantised form",
        ),
        (
            {"experts": "int8"},
            {"targets": ["onnx", "trt_rtx"]},
            "error: export.precision.experts 'int8': the TensorRT MoE plugin takes unquantised",
        ),
    ],
)
def test_a_precision_the_build_cannot_make_is_refused_in_one_line(
    tmp_path: Path,
    tiny_spec: M3Spec,
    capsys: pytest.CaptureFixture[str],
    precision: dict[str, str],
    export: dict[str, object],
    starts: str,
) -> None:
    """bf16 graphs used to crash with a traceback in the eager reference (issue #14); ONNX Runtime's CPU
    provider has no bf16 kernels, so the build refuses them before any work, naming the field; so are
    quantised experts with a lowering or target that has no quantised form."""
    data = tiny_spec.model_dump(mode="json")
    data["export"]["precision"].update(precision)
    data["export"].update(export)
    data.pop("tolerances")
    spec_file = tmp_path / "reduced.yaml"
    spec_file.write_text(json.dumps(data))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    code, stdout, stderr = run_cli(["build", str(spec_file), "--out", str(out)], capsys)
    assert code == 2, stdout + stderr
    assert stderr.startswith(starts) and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stdout + stderr
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
