"""`m3export check`: a fresh tiny build passes (exit 0); a changed golden output is a parity failure
(exit 1); the chain feeds each subgraph what earlier ones produced; the report files.

One tiny build per test session (the `tiny_build` fixture); tests that change it work on a copy.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from checkhelp import copy_artifacts, rewrite_manifest
from clihelp import run_cli

from m3export.artifacts.layout import SEAL
from m3export.artifacts.seal import seal_line
from m3export.artifacts.verify import verify_artifacts
from m3export.parity.compare import ParityReport, compare_outputs
from m3export.parity.report import CheckEntry, LayerError, markdown
from m3export.runners.ort_runner import OrtRunner
from m3export.runtime.check import check_artifacts, run_parity, write_reports
from m3export.spec.base import Tolerance


@pytest.fixture(scope="module")
def tiny(tiny_build: Path) -> Path:
    """The session's tiny build (never modify it: copy it with `copy_artifacts`)."""
    return tiny_build


def _golden_cases(npz: Path) -> set[str]:
    with np.load(npz) as z:
        return {k.split("/")[0] for k in z.files}


def _failing(result: Any) -> set[tuple[str, str, str]]:
    return {(e.report.step, e.report.subject, e.report.case) for e in result.entries if not e.report.passed}


def test_fresh_build_passes(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = check_artifacts(tiny)
    assert result.passed and result.exit_code == 0 and result.status == "pass", result.failures()
    manifest = json.loads((tiny / "manifest.json").read_text())
    golden = {s: _golden_cases(tiny / s / "golden_inputs.npz") for s in manifest["subgraphs"]}
    assert not golden["vision"] & {"b1_s12_img0"}  # no image, no vision run
    assert [c for c in result.cases if "." not in c] == [c["name"] for c in manifest["golden_cases"]]
    for step in ("onnx", "end_to_end"):
        got = {(e.report.subject, e.report.case) for e in result.entries if e.report.step == step}
        assert got == {(s, c) for s, cases in golden.items() for c in cases}, step  # every stored case
    assert set(result.files) == {rel for s in manifest["subgraphs"].values() for rel in s["files"]}
    code, stdout, stderr = run_cli(["check", str(tiny)], capsys)
    assert code == 0, stdout + stderr
    assert "integrity: pass" in stdout and f"check {tiny}: pass" in stdout and "FAIL" not in stdout


def test_chain_reproduces_the_builds_end_to_end_numbers(tiny: Path) -> None:
    """The build compared chained ORT with the full eager model; the goldens are the eager chain
    (step a makes it bit-identical), so the chained check sees the same errors."""
    result = check_artifacts(tiny)
    manifest = json.loads((tiny / "manifest.json").read_text())
    built = {
        (r["case"], o["name"]): o["max_abs"]
        for r in manifest["parity"]
        if r["step"] == "end_to_end"
        for o in r["outputs"]
    }
    checked = {
        (e.report.case, o.name): o.max_abs
        for e in result.entries
        if e.report.step == "end_to_end"
        for o in e.report.outputs
    }
    assert built and set(built) <= set(checked)
    for key, max_abs in built.items():  # (a golden-fed chain would give the onnx step's smaller errors)
        assert checked[key] == pytest.approx(max_abs, rel=1e-3, abs=1e-9), key


def test_changed_golden_output_is_a_parity_failure(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = copy_artifacts(tiny, tmp_path / "a")
    path = copy / "text_1" / "golden_outputs.npz"
    with np.load(path) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["b2_s40_img2/logits"][1, 7, 3] += 0.5
    np.savez(path, **arrays)  # type: ignore[arg-type]
    rewrite_manifest(copy)  # consistent hashes and seal: integrity passes, parity must not
    result = check_artifacts(copy)
    assert result.status == "parity_failure" and result.exit_code == 1
    assert _failing(result) == {("onnx", "text_1", "b2_s40_img2"), ("end_to_end", "text_1", "b2_s40_img2")}
    assert "max abs" in result.failures()[0]
    report = tmp_path / "r" / "check.json"
    code, stdout, stderr = run_cli(["check", str(copy), "--report", str(report)], capsys)
    assert code == 1, stdout + stderr
    assert (
        stderr.startswith(f"check {copy}: parity FAILED: onnx text_1 b2_s40_img2") and stderr.count("\n") == 1
    )
    doc = json.loads(report.read_text())
    assert doc["status"] == "parity_failure" and doc["exit_code"] == 1
    suites = ET.parse(report.with_suffix(".xml")).getroot()
    failed = [tc for tc in suites.iter("testcase") if tc.find("failure") is not None]
    assert [(tc.get("classname"), tc.get("name")) for tc in failed] == [
        ("onnx.text_1", "b2_s40_img2"),
        ("end_to_end.text_1", "b2_s40_img2"),
    ]
    md = report.with_suffix(".md").read_text()
    assert "PARITY FAILURE" in md and "divergence starts at: step `onnx`, subgraph `text_1`" in md


def test_chain_feeds_earlier_outputs_downstream(tiny: Path) -> None:
    """A runner that perturbs text_0's hidden_states: alone, only text_0 fails; chained, every later
    text stage and MTP fail too (they got the perturbed value, not their stored golden input)."""

    class Perturbed(OrtRunner):
        def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = super().infer(feed)
            if "hidden_states.2" in out and "input_ids" in feed:  # text_0's boundary output
                out["hidden_states.2"] = out["hidden_states.2"] + 1e-2
            return out

    arts = verify_artifacts(tiny)
    entries, skipped = run_parity(arts, lambda sub: Perturbed(sub.onnx), lambda _m: None)
    assert [s.split(" ")[0] for s in skipped] == ["split"]  # needs the eager model: never counted
    failing = {(e.report.step, e.report.subject) for e in entries if not e.report.passed}
    assert failing == {
        ("onnx", "text_0"),
        ("end_to_end", "text_0"),
        ("end_to_end", "text_1"),
        ("end_to_end", "mtp"),
        ("generate", "pipeline"),  # greedy decoding through the perturbed text_0 emits other tokens
    }


def test_report_files(tiny: Path, tmp_path: Path) -> None:
    report = tmp_path / "check.json"
    result = check_artifacts(tiny, report=report)
    assert result.report_files == tuple(report.with_suffix(s) for s in (".json", ".xml", ".md", ".png"))
    doc = json.loads(report.read_text())
    assert (
        doc["status"] == "pass" and doc["integrity"]["passed"] and len(doc["results"]) == len(result.entries)
    )
    assert all(r["layers"] == [] for r in doc["results"])
    suites = ET.parse(report.with_suffix(".xml")).getroot()
    assert len(list(suites.iter("testcase"))) == 1 + len(result.entries)  # + integrity
    assert suites.get("failures") == "0"
    md = report.with_suffix(".md").read_text()
    assert "# m3export check: PASS" in md and "![" in md and "check.png" in md
    assert report.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_report_renders_layer_errors_and_odd_values(tmp_path: Path) -> None:
    """Per-layer errors (to be filled by divergence localisation), zero and missing outputs."""
    tol = Tolerance(max_abs=1e-5, reason="test")
    a = {"x": np.zeros(3, np.float32), "logits": np.ones((1, 2, 4), np.float32)}
    passing = compare_outputs("onnx", "text_0", "c1", a, a, tol)  # max_abs 0: drawn on the floor
    failing = compare_outputs("onnx", "text_1", "c1", {}, {"logits": a["logits"]}, tol)  # missing: inf
    crashed = ParityReport("end_to_end", "text_1", "c1", tol.model_dump(mode="json"), (), "ORT: boom")
    layers = (LayerError("layers.0", 1e-7), LayerError("layers.1", 3e-3))
    entries = [CheckEntry(passing, 0.1), CheckEntry(failing, 0.2, layers), CheckEntry(crashed)]
    doc = {
        "artifacts": "x",
        "backend": "ort",
        "status": "parity_failure",
        "exit_code": 1,
        "seconds": 1.0,
        "integrity": {"passed": True, "error": None, "files": {}},
        "cases": ["c1"],
        "results": [e.to_json() for e in entries],
    }
    paths = write_reports(doc, tmp_path / "r.json")
    saved = json.loads(paths[0].read_text())  # strict JSON: inf became a string
    assert saved["results"][1]["outputs"][0]["max_abs"] == "inf"
    assert saved["results"][1]["layers"] == [
        {"name": "layers.0", "max_abs": 1e-7},
        {"name": "layers.1", "max_abs": 3e-3},
    ]
    md = markdown(saved, "r.png")  # renders from the re-read JSON too
    assert "## Per-layer max abs error" in md and "| layers.1 | 0.003 |" in md
    assert "divergence starts at: step `onnx`, subgraph `text_1`" in md and "missing" in md
    assert paths[3].read_bytes().startswith(b"\x89PNG")
    assert math.isinf(float(saved["results"][1]["outputs"][0]["max_abs"]))


def test_build_seals_its_manifest(tiny: Path) -> None:
    seal = (tiny / SEAL).read_text()
    assert seal == seal_line((tiny / "manifest.json").read_bytes())


def test_check_localises_a_damaged_layer(tiny: Path, tmp_path: Path) -> None:
    """A weight of layer 3 scaled in text_1's ONNX (hashes and seal rewritten, so only parity can
    tell): check fails text_1 and names layers.3 as where the error first exceeds the tolerance."""
    import onnx
    from onnx import numpy_helper

    copy = copy_artifacts(tiny, tmp_path / "damaged")
    path = copy / "onnx" / "text_1.onnx"
    model = onnx.load(path)  # with its external data
    [init] = [
        i
        for i in model.graph.initializer
        if i.name == "layers.3.block_sparse_moe.shared_experts.down_proj.weight"
    ]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2.0, init.name))
    (copy / "onnx" / "text_1.onnx.data").unlink()
    onnx.save(model, path, save_as_external_data=True, location="text_1.onnx.data")
    rewrite_manifest(copy)
    result = check_artifacts(copy)
    assert result.exit_code == 1
    failed = [e for e in result.entries if e.report.step == "onnx" and e.report.failed]
    assert failed and {e.report.subject for e in failed} == {"text_1"}
    for e in failed:
        assert e.report.localisation is not None
        assert e.report.localisation["first_divergent_layer"] == "layers.3", e.report.localisation
        assert [lay.name for lay in e.layers] == ["layers.2", "layers.3"]
