"""Where a build may go (issue #11 items 3-6): nothing that is not a build is replaced, nothing inside a
build is written, concurrent builds are refused, an interrupted publish is recovered, and `--only`
never replaces a complete build by a partial one. Each refusal is one `error:` line, exit 2, and
leaves every file as it was."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from checkhelp import copy_artifacts
from clihelp import run_cli
from test_bad_inputs import _assert_one_line_error, _snapshot

from m3export.artifacts import outdir
from m3export.errors import OutputError
from m3export.spec import M3Spec, dump_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs" / "m3-tiny.yaml"


def _build(out: Path, capsys: pytest.CaptureFixture[str], spec: Path = TINY) -> tuple[int, str, str]:
    return run_cli(["build", str(spec), "--out", str(out)], capsys)


def test_non_build_directory_is_refused_and_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v = tmp_path / "v"
    (v / "sub").mkdir(parents=True)
    (v / "thesis.tex").write_text("x")
    before = _snapshot(tmp_path)
    code, _, err = _build(v, capsys)
    _assert_one_line_error(code, err, 2, "is not an m3export build", "thesis.tex")
    assert _snapshot(tmp_path) == before and (v / "sub").is_dir()


def test_current_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, _, err = _build(Path("."), capsys)
    finally:
        os.chdir(cwd)
    _assert_one_line_error(code, err, 2, "is not an m3export build")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("inside", ["text_1", "text_0/nested"])
def test_out_inside_another_build_is_refused(
    inside: str, tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = copy_artifacts(tiny_build, tmp_path / "other")
    before = _snapshot(other)
    code, _, err = _build(other / inside, capsys)
    _assert_one_line_error(code, err, 2, "lies inside the m3export build")
    assert _snapshot(other) == before


def test_file_symlink_and_file_parent_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("data")
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    for out, needle in (
        (f, "exists and is not a directory"),
        (link, "is a symbolic link"),
        (f / "x", "is not a directory"),
    ):
        code, _, err = _build(out, capsys)
        _assert_one_line_error(code, err, 2, needle)
    assert f.read_text() == "data" and link.is_symlink() and target.is_dir() and not list(target.iterdir())


def test_foreign_file_inside_a_build_is_refused(
    tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_artifacts(tiny_build, tmp_path / "m3-tiny")
    (out / "text_1" / "notes.md").write_text("mine")
    code, _, err = _build(out, capsys)
    _assert_one_line_error(code, err, 2, "holds files the build did not write", "text_1/notes.md")
    assert (out / "text_1" / "notes.md").read_text() == "mine"


def test_failed_destination_that_is_not_a_build_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m3-tiny.failed").mkdir()
    (tmp_path / "m3-tiny.failed" / "keep.txt").write_text("mine")
    code, _, err = _build(tmp_path / "m3-tiny", capsys)
    _assert_one_line_error(code, err, 2, "failed builds go to", "keep.txt")


def test_too_long_name_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _build(tmp_path / ("x" * 240), capsys)
    _assert_one_line_error(code, err, 2, "is too long")


def test_concurrent_build_is_refused(
    tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While one build holds OUT's lock, a second build of OUT is refused naming the holder, and the
    stale-staging sweep of the refused build never runs (it would delete the live staging dir)."""
    out = copy_artifacts(tiny_build, tmp_path / "m3-tiny")
    live_staging = outdir.new_staging_dir(out)  # what the running build writes into
    before = _snapshot(out)
    with outdir.build_lock(out):
        code, _, err = _build(out, capsys)
    _assert_one_line_error(code, err, 2, "another m3export build", f"pid {os.getpid()}")
    assert live_staging.is_dir() and _snapshot(out) == before
    assert not outdir.lock_path(out).exists()  # released and removed


def test_interrupted_publish_is_recovered(
    tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kill between the two renames of the fallback publish leaves OUT missing and the build at
    `.OUT.old`: check names it, and the next build restores it (then finds it up to date)."""
    out = tmp_path / "m3-tiny"
    shutil.copytree(tiny_build, outdir.backup_path(out), symlinks=True)
    before = _snapshot(outdir.backup_path(out))
    code, _, err = run_cli(["check", str(out)], capsys)
    _assert_one_line_error(code, err, 3, "interrupted publish", ".m3-tiny.old")
    code, stdout, err = _build(out, capsys)
    assert code == 0 and "up to date" in stdout, stdout + err
    assert _snapshot(out) == before and not outdir.backup_path(out).exists()


def test_fallback_publish_killed_between_renames_keeps_the_old_build(
    tiny_build: Path, tmp_path: Path
) -> None:
    out = copy_artifacts(tiny_build, tmp_path / "m3-tiny")
    before = _snapshot(out)
    staging = outdir.new_staging_dir(out)
    (staging / "manifest.json").write_text("{}")
    real = os.replace
    calls = []

    def dying_replace(a: object, b: object) -> None:
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies after moving OUT aside
        real(a, b)  # type: ignore[arg-type]

    os.replace = dying_replace  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            outdir.publish(staging, out, exchange=False)
    finally:
        os.replace = real
    assert not out.exists() and outdir.backup_path(out).is_dir()
    outdir.recover_publish(out)
    assert _snapshot(out) == before


def test_exchange_publish_never_leaves_out_missing(tmp_path: Path) -> None:
    """With renameat2(RENAME_EXCHANGE) the swap is one system call: OUT always names a full build."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("1")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "new").write_text("2")
    if not outdir._exchange(staging, out):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported on this file system")
    assert (out / "new").is_file() and (staging / "old").is_file()


def test_only_never_replaces_a_complete_build_by_a_partial_one(
    tiny_build: Path, tiny_spec: M3Spec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    out = copy_artifacts(tiny_build, tmp_path / "m3-tiny")
    before = _snapshot(out)
    data = dump_spec(tiny_spec)
    data["text"]["rope_theta"] = 5e6  # every text stage and MTP change
    spec_file = tmp_path / "changed.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["build", str(spec_file), "--out", str(out), "--only", "mtp"], capsys)
    _assert_one_line_error(code, err, 2, "--only mtp", "text_0", "would be dropped")
    assert _snapshot(out) == before


def test_check_out_errors_are_output_errors(tmp_path: Path) -> None:
    with pytest.raises(OutputError):
        outdir.check_out(Path("/"))
