"""Bad inputs through the CLI (issue #6 item 4): one `error:` line on stderr, no traceback, exit 2
(user error) or 3 (artifact / integrity error), and nothing previously built is lost.

Every `build` failure here runs with `--out` on a copy of the session's tiny build (`tiny_build`)
and asserts that the copy is byte-for-byte unchanged, with no `.failed`, `.old` or staging sibling.

| item                                              | test                                                      |
|---------------------------------------------------|-----------------------------------------------------------|
| malformed YAML (spec validate, build)             | test_bad_spec[malformed_yaml-validate|build]               |
|                                                   | (also test_spec.py::test_malformed_yaml, validate only)    |
| unknown keys (spec validate, build)               | test_bad_spec[unknown_text_key|unknown_top_key-*]          |
|                                                   | (also test_spec.py::test_malformed_spec_exits_2_naming_field) |
| out-of-range values (spec validate, build)        | test_bad_spec[experts_per_tok_too_big|negative_hidden-*]   |
| truncated safetensors (build)                     | test_build_refuses_bad_checkpoint[truncated]               |
| corrupted safetensors header (build)              | test_build_refuses_bad_checkpoint[corrupted_header]        |
| checkpoint shapes do not match the spec (build)   | test_build_refuses_bad_checkpoint[wrong_shapes]            |
| pickle checkpoint .bin / .pt (build)              | test_build_refuses_bad_checkpoint[pickle_bin / pickle_pt]  |
|   (the same four at the loader level)             | test_checkpoint.py::test_truncated_file, ::test_corrupted_header, |
|                                                   | ::test_mismatch_is_one_error_listing_each_kind, ::test_pickle_checkpoints_are_refused |
| missing image file (model forward, run, generate) | test_missing_image                                         |
| damaged artifacts: flipped byte, deleted file,    | test_damaged_artifacts_are_refused[*-check|run|generate]   |
| edited manifest, external data outside            | (run/generate on flipped .onnx.data byte, deleted golden,  |
|   (check / run / generate)                        | edited manifest: run/generate verify integrity as check);  |
|                                                   | more `check` cases in test_check_integrity.py              |
|                                                   | (::test_flipping_any_byte_of_any_file_is_exit_3,           |
|                                                   | ::test_edited_manifest_exits_3,                            |
|                                                   | ::test_external_data_outside_the_directory_exits_3, ...)   |
| build killed with SIGKILL, then rebuilt           | test_sigkilled_build_keeps_out_then_rebuild_cleans_up      |
|                                                   | test_up_to_date_build_removes_stale_staging                |

Issue #11 (red-team pass), by item:

| #  | finding                                                   | test                                                      |
|----|-----------------------------------------------------------|-----------------------------------------------------------|
| 0  | >2 text stages: renamed boundary output, chain forwarded  | test_stages.py::test_n_stage_build_matches_transformers[1/3/5], |
|    | the stage's input                                         | test_plan.py::test_middle_stages_have_distinct_boundary_names, |
|    |                                                           | test_red_team.py::test_chain_refuses_an_unplanned_or_missing_output |
| 1  | spec without tolerances: no parity step, "pass"           | test_red_team.py::test_spec_without_tolerances_gets_the_dtype_defaults, |
|    |                                                           | ::test_spec_from_hf_writes_the_default_tolerances, ::test_check_of_a_build_that_compared_nothing_fails |
| 2  | absolute tolerances do not carry across checkpoints       | test_stages.py (5 stages: default, scale-free tolerances on a wide, larger-weight checkpoint) |
| 3  | --out onto a non-build / inside a build / file / symlink  | test_outdir.py::test_non_build_directory_is_refused_and_untouched, ::test_current_directory_is_refused, |
|    |                                                           | ::test_out_inside_another_build_is_refused, ::test_file_symlink_and_file_parent_are_refused, |
|    |                                                           | ::test_foreign_file_inside_a_build_is_refused, ::test_failed_destination_that_is_not_a_build_is_refused |
| 4  | concurrent builds into one OUT                            | test_outdir.py::test_concurrent_build_is_refused          |
| 5  | kill between publish's renames                            | test_outdir.py::test_interrupted_publish_is_recovered, ::test_fallback_publish_killed_between_renames_keeps_the_old_build, |
|    |                                                           | ::test_exchange_publish_never_leaves_out_missing          |
| 6  | --only replaced a complete build by a partial one         | test_outdir.py::test_only_never_replaces_a_complete_build_by_a_partial_one |
| 7  | check ignored the build's verdict; reproducible steps     | test_red_team.py::test_check_fails_a_build_that_recorded_a_failure, ::test_check_reruns_routing_and_generation |
| 8  | check passed an incomplete build                          | test_red_team.py::test_check_refuses_an_incomplete_build  |
| 9  | onnxruntime versions with other MoE semantics             | test_red_team.py::test_out_of_range_onnxruntime_is_refused[check/run/generate], |
|    |                                                           | ::test_two_onnxruntime_distributions_are_refused, ::test_build_records_the_runtime_range_and_refuses_outside_it |
| 10 | MTP draft / generated token = a placeholder id            | test_generate.py::test_a_placeholder_id_as_a_decode_token_is_embedded_like_transformers, |
|    |                                                           | ::test_mtp_drafting_the_placeholder_id_matches_plain_greedy, ::test_red_team_prompt_generates_with_mtp |
| 11 | spec from-hf tracebacks on malformed config / index / -o  | test_red_team.py::test_spec_from_hf_malformed_config_is_one_line[*], ::test_spec_from_hf_deep_json_bad_index_and_bad_output |
| 12 | read-only FS, disk full, long name, --logits-out, stdout  | test_red_team.py::test_read_only_file_system_is_refused_before_any_work, ::test_too_little_disk_is_refused_before_any_work, |
|    | full, broken pipe, usage boxes                            | ::test_disk_full_mid_build_leaves_nothing_and_keeps_out, ::test_spec_name_too_long_is_refused, |
|    |                                                           | ::test_logits_out_onto_a_directory_is_refused, ::test_stdout_full_and_broken_pipe, ::test_usage_errors_are_one_line |
| 13 | unreadable files; NUL / long / deep / mis-typed manifests | test_red_team.py::test_unreadable_artifact_file_is_exit_3, ::test_hostile_resealed_manifest_is_exit_3[*], |
|    |                                                           | ::test_deeply_nested_manifest_is_exit_3                   |
| 14 | absurd sizes, memory, huge spec file, long prompt, video  | test_red_team.py::test_absurd_sizes_are_refused_by_validate[*], ::test_memory_estimate_refuses_before_allocating, |
|    |                                                           | ::test_huge_sparse_spec_file_is_refused_without_reading_it, ::test_prompt_longer_than_the_context_is_refused, |
|    |                                                           | ::test_video_of_many_large_frames_is_refused_before_decoding |
| 15 | unlisted files, TOCTOU swap, --report device, FIFO        | test_red_team.py::test_unlisted_files_rule, ::test_file_swapped_after_verification_is_not_what_runs, |
|    |                                                           | ::test_report_onto_a_device_is_refused, ::test_fifo_checkpoint_is_refused |
| 16 | the seal is a checksum: signing                           | test_red_team.py::test_signed_build_detects_tampering_that_the_seal_cannot |
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
import yaml
from checkhelp import copy_artifacts, flip_byte, rewrite_manifest
from clihelp import run_cli
from conftest import SPECS, spec_variant

from m3export.artifacts.io import sha256_file
from m3export.artifacts.manifest import MANIFEST
from m3export.artifacts.verify import verify_artifacts
from m3export.model.checkpoint import save_checkpoint
from m3export.model.text import M3ForCausalLM
from m3export.spec import M3Spec, dump_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = SPECS / "m3-tiny.yaml"
IMAGE_ID = 1021  # multimodal.image_token_index of m3-tiny


def _assert_one_line_error(code: int, err: str, want_code: int, *needles: str) -> str:
    assert code == want_code, (code, err)
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    line = err.rstrip("\n")
    assert line.startswith("error: ") and line.removeprefix("error: ").strip(), err
    for needle in needles:
        assert needle in line, line
    return line


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file (hidden ones included) under `root`, by relative path."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_intact(out: Path, before: dict[str, str]) -> None:
    """`out` holds exactly the files it held, and nothing was published or staged beside it."""
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


@pytest.fixture(scope="module")
def good_snapshot(tiny_build: Path) -> dict[str, str]:
    return _snapshot(tiny_build)


@pytest.fixture
def good_out(tiny_build: Path, tmp_path: Path) -> Path:
    """A copy of the passing tiny build, alone in its parent directory, for `build --out`."""
    return copy_artifacts(tiny_build, tmp_path / "artifacts" / tiny_build.name)


# ---------------------------------------------------------------------------------------- specs


def _tiny_yaml() -> dict[str, Any]:
    return yaml.safe_load(TINY.read_text())


def _with(path: str, value: Any) -> str:
    data = _tiny_yaml()
    *parents, leaf = path.split(".")
    cur = data
    for p in parents:
        cur = cur[p]
    cur[leaf] = value
    return yaml.safe_dump(data, sort_keys=False)


BAD_SPECS = {
    "malformed_yaml": ("name: m3-tiny\ntext: [unclosed\n", "malformed YAML"),
    "unknown_text_key": (_with("text.num_hidden_layerz", 4), "num_hidden_layerz"),
    "unknown_top_key": (_with("exporrt", {"moe": "ort"}), "exporrt"),
    "experts_per_tok_too_big": (_with("text.num_experts_per_tok", 9), "num_experts_per_tok"),
    "negative_hidden": (_with("text.hidden_size", -1), "hidden_size"),
}


@pytest.mark.parametrize("command", ["validate", "build"])
@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec(
    case: str,
    command: str,
    good_out: Path,
    good_snapshot: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text, needle = BAD_SPECS[case]
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(text)
    if command == "validate":
        args = ["spec", "validate", str(spec_file)]
    else:
        args = ["build", str(spec_file), "--out", str(good_out)]
    code, out, err = run_cli(args, capsys)
    _assert_one_line_error(code, err, 2, str(spec_file), needle)
    assert out == ""
    _assert_intact(good_out, good_snapshot)


# ----------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def text_checkpoint(tiny_text_spec: M3Spec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good single-file checkpoint of the text-only tiny spec (each test damages its own copy)."""
    model = M3ForCausalLM.from_config(tiny_text_spec)
    return save_checkpoint(model, tiny_text_spec, tmp_path_factory.mktemp("ckpt") / "good")


def _truncate(ckpt: Path, _spec: M3Spec) -> Path:
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    return f


def _flip_header(ckpt: Path, _spec: M3Spec) -> Path:
    f = ckpt / "model.safetensors"
    for offset in range(8, 16):  # the JSON header starts right after its 8-byte length
        flip_byte(f, offset)
    return f


def _wrong_shapes(ckpt: Path, spec: M3Spec) -> Path:
    other = spec_variant(spec, text_only=True, intermediate_size=32)  # the MoE expert widths differ
    save_checkpoint(M3ForCausalLM.from_config(other), other, ckpt)
    return ckpt


def _pickle(name: str) -> Callable[[Path, M3Spec], Path]:
    def damage(ckpt: Path, _spec: M3Spec) -> Path:
        for f in ckpt.iterdir():
            f.unlink()
        f = ckpt / name
        f.write_bytes(b"\x80\x04 not for unpickling")
        return f

    return damage


BAD_CHECKPOINTS: dict[str, tuple[Callable[[Path, M3Spec], Path], tuple[str, ...]]] = {
    "truncated": (_truncate, ("not a valid safetensors file",)),
    "corrupted_header": (_flip_header, ("not a valid safetensors file",)),
    "wrong_shapes": (_wrong_shapes, ("wrong shape", "[32, 128] vs model [64, 128]")),
    "pickle_bin": (_pickle("pytorch_model.bin"), ("pickle", "convert it to safetensors")),
    "pickle_pt": (_pickle("model.pt"), ("pickle", "convert it to safetensors")),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_build_refuses_bad_checkpoint(
    case: str,
    text_checkpoint: Path,
    tiny_text_spec: M3Spec,
    good_out: Path,
    good_snapshot: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    damage, needles = BAD_CHECKPOINTS[case]
    ckpt = shutil.copytree(text_checkpoint, tmp_path / "ckpt")
    named = damage(ckpt, tiny_text_spec)
    data = dump_spec(tiny_text_spec)
    data["weights"] = {"checkpoint": str(ckpt)}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data, sort_keys=False))
    code, _, err = run_cli(["build", str(spec_file), "--out", str(good_out)], capsys)
    _assert_one_line_error(code, err, 2, str(named), *needles)
    _assert_intact(good_out, good_snapshot)


# ------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("command", ["model forward", "run", "generate"])
def test_missing_image(
    command: str, tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-image.png"
    prompt = ["--input-ids", f"5,{IMAGE_ID},6", "--image", str(missing)]
    args = {
        "model forward": ["model", "forward", str(TINY), *prompt],
        "run": ["run", str(tiny_build), *prompt],
        "generate": ["generate", str(tiny_build), *prompt, "--max-new-tokens", "1"],
    }[command]
    code, out, err = run_cli(args, capsys)
    _assert_one_line_error(code, err, 2, f"image file {missing} does not exist")
    assert out == ""


# --------------------------------------------------------------------------- damaged artifacts


def _flip_data(root: Path, _tmp: Path) -> None:
    data = root / "onnx" / "text_1.onnx.data"
    flip_byte(data, data.stat().st_size // 3)


def _delete(rel: str) -> Callable[[Path, Path], None]:
    def damage(root: Path, _tmp: Path) -> None:
        (root / rel).unlink()

    return damage


def _edit_manifest(root: Path, _tmp: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["spec"]["text"]["eos_token_id"] = 7

    rewrite_manifest(root, edit, reseal=False)  # valid JSON, but not the sealed manifest


def _external_outside(kind: str) -> Callable[[Path, Path], None]:
    def damage(root: Path, tmp: Path) -> None:
        model_path = root / "onnx" / "text_0.onnx"
        outside = tmp / "outside.bin"
        shutil.copy(root / "onnx" / "text_0.onnx.data", outside)
        if kind == "absolute":
            location = str(outside)
        elif kind == "dotdot":
            location = "../../outside.bin"
        else:  # a name inside the directory, resolving outside it
            (root / "text_0" / "weights.bin").symlink_to(outside)
            location = "weights.bin"
        model = onnx.load(str(model_path), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save(model, str(model_path))
        rewrite_manifest(root)  # the .onnx's new hash is listed and sealed: only the location is wrong

    return damage


DAMAGES: dict[str, Callable[[Path, Path], None]] = {
    "flipped_byte_onnx_data": _flip_data,
    "deleted_onnx_data": _delete("onnx/text_1.onnx.data"),
    "deleted_golden": _delete("mtp/golden_outputs.npz"),
    "edited_manifest": _edit_manifest,
    "external_data_absolute": _external_outside("absolute"),
    "external_data_dotdot": _external_outside("dotdot"),
    "external_data_symlink": _external_outside("symlink"),
}


@pytest.mark.parametrize("command", ["check", "run", "generate"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_artifacts_are_refused(
    damage: str,
    command: str,
    tiny_build: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = copy_artifacts(tiny_build, tmp_path / "a" / "m3-tiny")
    DAMAGES[damage](root, tmp_path)
    args = [command, str(root)]
    if command != "check":
        args += ["--input-ids", "5,6,7"]
    if command == "generate":
        args += ["--max-new-tokens", "2"]
    code, out, err = run_cli(args, capsys)
    _assert_one_line_error(code, err, 3, str(root))
    assert "[onnx]" not in out and (command == "check" or out == "")  # nothing ran


# ---------------------------------------------------------------------------------- SIGKILL


def _staging(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.staging-*"))


def test_sigkilled_build_keeps_out_then_rebuild_cleans_up(
    tiny_build: Path,
    good_out: Path,
    good_snapshot: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A build over a good OUT killed while exporting leaves OUT as it was (a stale staging
    directory beside it at most); the next build removes the staging directory and publishes.

    An unchanged spec would be "up to date" (nothing to kill), so the killed build uses other
    weights (every subgraph re-exported). The rebuild changes only a tolerance's text: not up to
    date, but every subgraph key matches OUT, so it reuses OUT's ONNX files and reruns the gates.
    """
    reseeded = tmp_path / "seed1.yaml"
    reseeded.write_text(_with("weights", {"random": {"seed": 1}}))
    log = tmp_path / "build.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "m3export.cli", "build", str(reseeded), "--out", str(good_out)],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 180
        while "[b export] vision (" not in log.read_text():  # a real export has started
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(1.0)  # into the exporter
        assert proc.poll() is None, log.read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert _snapshot(good_out) == good_snapshot
    stale = _staging(good_out)
    assert len(stale) == 1 and (stale[0] / "vision").is_dir(), stale  # staged, never published
    # Left beside OUT: the staging directory and the killed build's (unlocked) lock file.
    left = sorted([good_out.name, stale[0].name, f".{good_out.name}.lock"])
    assert sorted(p.name for p in good_out.parent.iterdir()) == left
    code, out, err = run_cli(["check", str(good_out)], capsys)
    assert code == 0, out + err

    retuned = tmp_path / "retuned.yaml"
    retuned.write_text(_with("tolerances.split.reason", "the same bound, reworded"))
    code, out, err = run_cli(["build", str(retuned), "--out", str(good_out)], capsys)
    assert code == 0, out + err
    assert "up to date" not in out and ": pass (" in out
    assert sorted(p.name for p in good_out.parent.iterdir()) == [good_out.name]
    verify_artifacts(good_out)  # sealed, every listed file present with its hash
    manifest = json.loads((good_out / MANIFEST).read_text())
    assert manifest["status"] == "pass" and manifest["only"] is None
    assert manifest["subgraphs"].keys() == json.loads((tiny_build / MANIFEST).read_text())["subgraphs"].keys()
    assert all(sub["reused"] for sub in manifest["subgraphs"].values())  # from OUT, not the staging


def test_up_to_date_build_removes_stale_staging(
    good_out: Path, good_snapshot: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    stale = good_out.parent / f".{good_out.name}.staging-killed"
    (stale / "vision").mkdir(parents=True)  # what a build killed while exporting leaves
    code, out, err = run_cli(["build", str(TINY), "--out", str(good_out)], capsys)
    assert code == 0 and "up to date" in out, out + err
    assert _snapshot(good_out) == good_snapshot
    assert _staging(good_out) == []
