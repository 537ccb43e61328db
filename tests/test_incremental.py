"""Incremental, content-addressed builds (m3export.build.cache) and deterministic ONNX files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from m3export.artifacts.io import sha256_file
from m3export.build.driver import build
from m3export.spec import M3Spec


def _files(root: Path) -> dict[str, str]:
    manifest = json.loads((root / "manifest.json").read_text())
    return {rel: digest for sub in manifest["subgraphs"].values() for rel, digest in sub["files"].items()}


def _onnx_files(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every ONNX / external-data file: a re-export changes the mtime."""
    return {
        str(p.relative_to(root)): (sha256_file(p), p.stat().st_mtime_ns)
        for p in sorted(root.glob("*/*.onnx*"))
    }


def test_unchanged_spec_is_up_to_date(tiny_build: Path, tiny_spec: M3Spec, tmp_path: Path) -> None:
    out = shutil.copytree(tiny_build, tmp_path / "m3-tiny")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = build(tiny_spec, out)
    assert result.passed and result.up_to_date and result.reports == []
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing rewritten


def test_changing_only_mtp_re_exports_only_mtp(tiny_build: Path, tiny_spec: M3Spec, tmp_path: Path) -> None:
    out = shutil.copytree(tiny_build, tmp_path / "m3-tiny")
    before = _onnx_files(out)
    data = tiny_spec.model_dump(mode="json")
    data["text"]["num_mtp_modules"] = 2  # the MTP section: a second depth
    result = build(M3Spec.model_validate(data), out)
    assert result.passed, result.failed_subjects()
    subs = result.manifest["subgraphs"]
    assert {n: s["reused"] for n, s in subs.items()} == {
        "vision": True,
        "text_0": True,
        "text_1": True,
        "mtp": False,
    }
    after = _onnx_files(out)
    rewritten = {rel for rel in after if before.get(rel) != after[rel]}
    assert rewritten == {"onnx/mtp.onnx", "onnx/mtp.onnx.data"}
    assert (
        subs["mtp"]["key"]
        != json.loads((tiny_build / "manifest.json").read_text())["subgraphs"]["mtp"]["key"]
    )


def test_same_spec_twice_gives_byte_identical_onnx(
    tiny_build: Path, tiny_spec: M3Spec, tmp_path: Path
) -> None:
    # A fresh export of text_1 (a new directory: nothing to reuse) against the session's build.
    result = build(tiny_spec, tmp_path / "again", only=["text_1"])
    assert result.passed and not result.manifest["subgraphs"]["text_1"]["reused"]
    fresh, first = _files(result.out_dir), _files(tiny_build)
    for rel in ("onnx/text_1.onnx", "onnx/text_1.onnx.data"):
        assert fresh[rel] == first[rel], rel
    # No checkout path or line number in the graph (the exporter's stack traces are dropped), so
    # another clone of the same sources gives the same bytes too.
    import onnx

    model = onnx.load(result.out_dir / "onnx" / "text_1.onnx", load_external_data=False)
    keys = {p.key for n in model.graph.node for p in n.metadata_props}
    assert "pkg.torch.onnx.stack_trace" not in keys and "pkg.torch.onnx.name_scopes" in keys
    assert str(Path(__file__).resolve().parents[1]) not in model.SerializeToString().decode("latin-1")


def test_damaged_previous_build_is_not_reused(tiny_build: Path, tiny_spec: M3Spec, tmp_path: Path) -> None:
    out = shutil.copytree(tiny_build, tmp_path / "m3-tiny")
    data = out / "onnx" / "text_1.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01  # one flipped bit in a weight: the file exists, its key in the manifest matches
    data.write_bytes(bytes(raw))
    result = build(tiny_spec, out, only=["text_1"])
    assert result.passed and not result.manifest["subgraphs"]["text_1"]["reused"]
    assert sha256_file(out / "onnx" / "text_1.onnx.data") == _files(tiny_build)["onnx/text_1.onnx.data"]


def test_only_carries_unchanged_subgraphs_over(tiny_build: Path, tiny_spec: M3Spec, tmp_path: Path) -> None:
    """`--only mtp` after an MTP-only change re-exports mtp and keeps the rest of the build."""
    out = shutil.copytree(tiny_build, tmp_path / "m3-tiny")
    assert build(tiny_spec, out, only=["text_1"]).up_to_date  # nothing changed: nothing to do
    data = tiny_spec.model_dump(mode="json")
    data["text"]["num_mtp_modules"] = 2
    result = build(M3Spec.model_validate(data), out, only=["mtp"])
    assert result.passed and set(result.manifest["subgraphs"]) == {"vision", "text_0", "text_1", "mtp"}
    assert {n for n, s in result.manifest["subgraphs"].items() if not s["reused"]} == {"mtp"}
