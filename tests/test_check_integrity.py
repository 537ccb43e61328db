"""`m3export check` integrity: every damaged artifact directory is exit 3 before anything runs.

One tiny build per test session (the `tiny_build` fixture); each case damages its own copy.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path
from typing import Any

import onnx
import pytest
from checkhelp import copy_artifacts, flip_byte, rewrite_manifest
from clihelp import run_cli

from m3export.artifacts.layout import SEAL
from m3export.artifacts.manifest import MANIFEST
from m3export.errors import ArtifactError
from m3export.runners.ort_runner import OrtRunner
from m3export.runtime.check import check_artifacts


@pytest.fixture(scope="module")
def tiny(tiny_build: Path) -> Path:
    """The session's tiny build (never modify it: copy it with `copy_artifacts`)."""
    return tiny_build


@pytest.fixture
def no_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Integrity failures must stop before any runner is created."""

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a runner was created although integrity failed")

    monkeypatch.setattr(OrtRunner, "__init__", refuse)


def _integrity_error(root: Path) -> str:
    with pytest.raises(ArtifactError) as info:
        check_artifacts(root)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _offsets(path: Path, rng: random.Random) -> list[int]:
    size = path.stat().st_size
    extra = 24 if path.name in (MANIFEST, SEAL) else 2  # JSON / text: many kinds of bytes to hit
    return sorted({0, size // 2, size - 1, *(rng.randrange(size) for _ in range(extra))})


def test_flipping_any_byte_of_any_file_is_exit_3(tiny: Path, tmp_path: Path, no_inference: None) -> None:
    files = sorted(p.relative_to(tiny) for p in tiny.rglob("*") if p.is_file())
    assert {Path(MANIFEST), Path(SEAL)} <= set(files) and len(files) >= 10
    rng = random.Random(0)
    n = 0
    for rel in files:
        for offset in _offsets(tiny / rel, rng):
            for mask in (0xFF, 0x01):  # whole byte, and one bit (digits stay digits, JSON stays JSON)
                copy = copy_artifacts(tiny, tmp_path / f"c{n}")
                flip_byte(copy / rel, offset, mask)
                msg = _integrity_error(copy)
                assert str(rel) in msg or SEAL in msg or MANIFEST in msg, (rel, offset, msg)
                shutil.rmtree(copy)
                n += 1
    assert n > 100


@pytest.mark.parametrize("rel", ["onnx/text_1.onnx.data", MANIFEST])
def test_cli_flipped_byte_exits_3_with_one_line(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], rel: str
) -> None:
    copy = copy_artifacts(tiny, tmp_path / "a")
    flip_byte(copy / rel, (copy / rel).stat().st_size // 3, 0x01)
    code, stdout, stderr = run_cli(["check", str(copy)], capsys)
    assert code == 3, stdout + stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert "[onnx]" not in stdout  # nothing ran


def test_deleted_file_exits_3(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = copy_artifacts(tiny, tmp_path / "a")
    (copy / "mtp" / "golden_outputs.npz").unlink()
    code, _, stderr = run_cli(["check", str(copy)], capsys)
    assert code == 3 and "mtp/golden_outputs.npz is missing" in stderr


def test_missing_seal_exits_3(tiny: Path, tmp_path: Path, no_inference: None) -> None:
    copy = copy_artifacts(tiny, tmp_path / "a")
    (copy / SEAL).unlink()
    assert f"no {SEAL}" in _integrity_error(copy)


def test_edited_manifest_exits_3(tiny: Path, tmp_path: Path, no_inference: None) -> None:
    def loosen(m: dict[str, Any]) -> None:
        m["spec"]["tolerances"]["onnx"]["max_abs"] = 1.0

    copy = copy_artifacts(tiny, tmp_path / "a")
    rewrite_manifest(copy, loosen, reseal=False)  # valid JSON, but not the sealed manifest
    assert f"does not match {SEAL}" in _integrity_error(copy)
    rewrite_manifest(copy, loosen)  # re-sealed, but the spec no longer matches its spec_hash
    assert "spec_hash does not match" in _integrity_error(copy)


def test_manifest_with_an_invalid_spec_is_exit_3_not_2(
    tiny: Path, tmp_path: Path, no_inference: None
) -> None:
    def break_spec(m: dict[str, Any]) -> None:
        m["spec"]["text"]["hidden_size"] = -1

    copy = copy_artifacts(tiny, tmp_path / "a")
    rewrite_manifest(copy, break_spec)
    assert "hidden_size" in _integrity_error(copy)


def test_wrong_listed_hash_exits_3(tiny: Path, tmp_path: Path, no_inference: None) -> None:
    def wrong(m: dict[str, Any]) -> None:
        m["subgraphs"]["text_0"]["files"]["text_0/golden_inputs.npz"] = "0" * 64

    copy = copy_artifacts(tiny, tmp_path / "a")
    rewrite_manifest(copy, wrong, rehash=False)
    assert "text_0/golden_inputs.npz does not match its sha256" in _integrity_error(copy)


@pytest.mark.parametrize("rel", ["../outside.npz", "/etc/passwd", "text_0/../../x.npz"])
def test_listed_path_outside_the_directory_exits_3(
    tiny: Path, tmp_path: Path, no_inference: None, rel: str
) -> None:
    def add(m: dict[str, Any]) -> None:
        m["subgraphs"]["text_0"]["files"][rel] = "0" * 64

    copy = copy_artifacts(tiny, tmp_path / "a")
    rewrite_manifest(copy, add, rehash=False)
    assert "escapes the artifact directory" in _integrity_error(copy)


@pytest.mark.parametrize("extra", ["vision/extra.onnx", "stray.onnx.data", "text_1/old/weights.data"])
def test_unlisted_model_file_exits_3(tiny: Path, tmp_path: Path, no_inference: None, extra: str) -> None:
    copy = copy_artifacts(tiny, tmp_path / "a")
    (copy / extra).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(copy / "onnx" / "vision.onnx", copy / extra)
    assert f"{extra} is not listed in the manifest" in _integrity_error(copy)


def _set_location(onnx_path: Path, location: str) -> None:
    """Point every external initializer of `onnx_path` at `location` (the data file itself is kept)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    n = 0
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
                n += 1
    assert n > 0
    onnx.save(model, str(onnx_path))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "unlisted"])
def test_external_data_outside_the_directory_exits_3(
    tiny: Path, tmp_path: Path, no_inference: None, kind: str
) -> None:
    copy = copy_artifacts(tiny, tmp_path / "a")
    data = copy / "onnx" / "text_0.onnx.data"
    outside = tmp_path / "outside.bin"
    shutil.copy(data, outside)
    if kind == "absolute":
        location = str(outside)
    elif kind == "dotdot":
        location = "../../outside.bin"
    elif kind == "symlink":  # a name inside the directory, resolving outside it
        (copy / "text_0" / "weights.bin").symlink_to(outside)
        location = "weights.bin"
    else:  # inside, but not covered by the manifest's hashes
        shutil.copy(data, copy / "text_0" / "weights.bin")
        location = "weights.bin"
    _set_location(copy / "onnx" / "text_0.onnx", location)
    rewrite_manifest(copy)  # the .onnx's new hash is listed: only the location is wrong
    want = {
        "absolute": f"has external data {location!r} outside the directory",
        "dotdot": f"has external data {location!r} outside the directory",
        "symlink": "text_0/weights.bin is a symbolic link the manifest does not list",
        "unlisted": "has external data 'weights.bin' not listed in the manifest",
    }
    assert want[kind] in _integrity_error(copy)


def test_listed_symlink_to_outside_exits_3(tiny: Path, tmp_path: Path, no_inference: None) -> None:
    copy = copy_artifacts(tiny, tmp_path / "a")
    target = tmp_path / "golden_inputs.npz"
    shutil.move(copy / "mtp" / "golden_inputs.npz", target)
    (copy / "mtp" / "golden_inputs.npz").symlink_to(target)  # same bytes, same hash, outside
    assert "resolves outside the artifact directory" in _integrity_error(copy)


def test_missing_directory_and_file_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_cli(["check", str(tmp_path / "nope")], capsys)
    assert code == 3 and "no such artifact directory" in stderr and stderr.count("\n") == 1
    (tmp_path / "file").write_text("x")
    code, _, stderr = run_cli(["check", str(tmp_path / "file")], capsys)
    assert code == 3
    (tmp_path / "empty").mkdir()
    code, _, stderr = run_cli(["check", str(tmp_path / "empty")], capsys)
    assert code == 3 and "no manifest.json" in stderr


def test_usage_errors_exit_2(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_cli(["check", str(tiny), "--backend", "tensorflow"], capsys)
    assert code == 2 and "--backend must be one of ort, trt" in stderr
    code, _, stderr = run_cli(["check", str(tiny), "--report", str(tmp_path / "r.xml")], capsys)
    assert code == 2 and "--report" in stderr and stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_trt_backend_unavailable_exits_2(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = run_cli(["check", str(tiny), "--backend", "trt"], capsys)
    assert code == 2, stdout + stderr
    assert stderr.startswith("error: --backend trt: TensorRT is not available") and stderr.count("\n") == 1
    assert "integrity" not in stdout  # refused before any work


def test_integrity_failure_still_writes_the_report(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = copy_artifacts(tiny, tmp_path / "a")
    flip_byte(copy / "onnx" / "vision.onnx", 100)
    report = tmp_path / "out" / "check.json"
    code, _, _ = run_cli(["check", str(copy), "--report", str(report)], capsys)
    assert code == 3
    doc = json.loads(report.read_text())
    assert doc["status"] == "integrity_failure" and doc["exit_code"] == 3 and doc["results"] == []
    assert "onnx/vision.onnx" in doc["integrity"]["error"]
    xml = report.with_suffix(".xml").read_text()
    assert 'classname="integrity"' in xml and "<failure" in xml
    assert "INTEGRITY FAILURE" in report.with_suffix(".md").read_text()
    assert report.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
