"""Regression tests for the red-team findings of issue #11 (items 1, 7-9, 11-16; items 0 and 2 are in
tests/test_stages.py, 3-6 in tests/test_outdir.py, 10 in tests/test_generate.py). Each failed on the
main branch before the fix. The coverage table in tests/test_bad_inputs.py maps every item to its test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from checkhelp import copy_artifacts, rewrite_manifest
from clihelp import run_cli
from PIL import Image
from test_bad_inputs import _assert_one_line_error, _snapshot

from m3export.artifacts.layout import SIGNATURE
from m3export.artifacts.seal import sign_manifest
from m3export.artifacts.verify import verify_artifacts
from m3export.model.checkpoint import save_checkpoint
from m3export.model.text import M3ForCausalLM
from m3export.runners import ort_runner
from m3export.runners.chain import ChainError, run_chain
from m3export.runtime.check import check_artifacts
from m3export.spec import M3Spec, dump_spec, parse_spec, spec_hash
from m3export.spec.defaults import default_tolerances
from m3export.split.plan import plan_subgraphs

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs" / "m3-tiny.yaml"


def _tiny_yaml() -> dict[str, Any]:
    return yaml.safe_load(TINY.read_text())


# ------------------------------------------------------------------- item 0: the chain is strict


def test_chain_refuses_an_unplanned_or_missing_output(tiny_text_spec: M3Spec) -> None:
    """The exporter's `hidden_states_1` rename: the chain must fail, never forward a stale value."""
    plans = plan_subgraphs(tiny_text_spec)

    def renaming(plan: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {n: np.zeros((1, 3, 1), np.float32) for n in plan.output_names}
        if plan.name == "text_0":
            out["hidden_states_1"] = out.pop(plan.output_names[0])
        return out

    ids = {"input_ids": np.ones((1, 3), np.int64), "position_ids": np.arange(3)[None]}
    with pytest.raises(
        ChainError,
        match=r"text_0: its graph produced .*missing \['hidden_states.2'\], unplanned \['hidden_states_1'\]",
    ):
        run_chain(plans, ids, renaming, hidden_size=128)


# ------------------------------------------------------------------- item 1: default tolerances


def test_spec_without_tolerances_gets_the_dtype_defaults() -> None:
    data = _tiny_yaml()
    del data["tolerances"]
    spec = parse_spec(data)
    defaults = default_tolerances("float32")
    for step, tol in defaults.items():
        got = getattr(spec.tolerances, step).model_dump(exclude_none=True)
        assert got == tol and got["reason"], step
    partial = _tiny_yaml()
    partial["tolerances"] = {"onnx": partial["tolerances"]["onnx"]}  # one step given, the rest default
    spec = parse_spec(partial)
    assert spec.tolerances.onnx.max_abs == 1e-5 and spec.tolerances.decode.max_abs_scaled == 1e-5


def test_spec_from_hf_writes_the_default_tolerances(
    tiny_text_spec: M3Spec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = save_checkpoint(M3ForCausalLM.from_config(tiny_text_spec), tiny_text_spec, tmp_path / "ckpt")
    code, _out, err = run_cli(["spec", "from-hf", str(ckpt), "-o", str(tmp_path / "s.yaml")], capsys)
    assert code == 0, err
    written = yaml.safe_load((tmp_path / "s.yaml").read_text())
    assert set(written["tolerances"]) == {"reference", "split", "onnx", "end_to_end", "decode", "generate"}
    assert all(t["reason"] for t in written["tolerances"].values())


def test_check_of_a_build_that_compared_nothing_fails(tiny_build: Path, tmp_path: Path) -> None:
    copy = copy_artifacts(tiny_build, tmp_path / "a")

    def no_cases(m: dict[str, Any]) -> None:
        m["golden_cases"] = []
        m["golden_tokens"] = {}

    for sub in ("vision", "text_0", "text_1", "mtp"):
        for kind in ("inputs", "outputs", "intermediates"):
            np.savez(copy / sub / f"golden_{kind}.npz")
    rewrite_manifest(copy, no_cases)
    result = check_artifacts(copy)
    assert result.exit_code == 1 and "nothing was compared" in result.failures()[0]


# --------------------------------------------------------- items 7-8: check passes only good builds


def test_check_fails_a_build_that_recorded_a_failure(
    tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = copy_artifacts(tiny_build, tmp_path / "a.failed")

    def failed(m: dict[str, Any]) -> None:
        m["status"] = "fail"
        m["parity"][0]["status"] = "fail"
        m["parity"][0]["passed"] = False

    rewrite_manifest(copy, failed)
    code, out, err = run_cli(["check", str(copy)], capsys)
    assert code == 1, out + err
    assert "build pipeline -: the build recorded status 'fail'" in err


def test_check_refuses_an_incomplete_build(
    tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = copy_artifacts(tiny_build, tmp_path / "a")
    shutil.rmtree(copy / "mtp")
    rewrite_manifest(copy, lambda m: m["subgraphs"].pop("mtp"))
    code, _, err = run_cli(["check", str(copy)], capsys)
    _assert_one_line_error(code, err, 3, "incomplete build", "mtp")


def test_check_reruns_routing_and_generation(tiny_build: Path, tmp_path: Path) -> None:
    """Routing agreement and greedy tokens are re-run from the goldens: a changed expert choice in
    golden_intermediates and a changed token in golden_tokens are both parity failures."""
    copy = copy_artifacts(tiny_build, tmp_path / "a")
    path = copy / "text_1" / "golden_intermediates.npz"
    with np.load(path) as z:
        arrays = {k: z[k].copy() for k in z.files}
    key = next(k for k in arrays if k.startswith("b2_s40_img2/") and k.endswith("layers.3.experts"))
    arrays[key][:, 0] = (arrays[key][:, 0] + 1) % 8
    np.savez(path, **arrays)  # type: ignore[arg-type]
    case = next(iter(json.loads((copy / "manifest.json").read_text())["golden_tokens"]))

    def token(m: dict[str, Any]) -> None:
        m["golden_tokens"][case]["plain"][3] += 1

    rewrite_manifest(copy, token)
    result = check_artifacts(copy)
    failing = {
        (e.report.step, e.report.subject, e.report.case) for e in result.entries if not e.report.passed
    }
    assert ("routing", "text_1", "b2_s40_img2") in failing
    assert ("generate", "pipeline", f"{case}:plain") in failing
    routing = [e for e in result.entries if e.report.step == "routing"]
    assert routing and all(e.report.outputs for e in routing)  # compared, not skipped


# ---------------------------------------------------------------- item 9: onnxruntime version range


@pytest.mark.parametrize("command", ["check", "run", "generate"])
def test_out_of_range_onnxruntime_is_refused(
    command: str, tiny_build: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ort_runner, "installed_onnxruntime", lambda: ("1.31.1", ["onnxruntime-gpu 1.31.1"]))
    args = [command, str(tiny_build)] + ([] if command == "check" else ["--input-ids", "5,6,7"])
    code, out, err = run_cli(args, capsys)
    _assert_one_line_error(
        code, err, 2, "onnxruntime 1.31.1", "'ort' MoE lowering", ">=1.32,<1.33", "export.moe: portable"
    )
    assert "[onnx]" not in out


def test_two_onnxruntime_distributions_are_refused(
    tiny_build: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        ort_runner,
        "installed_onnxruntime",
        lambda: ("1.32.0", ["onnxruntime 1.32.0", "onnxruntime-gpu 1.31.1"]),
    )
    code, _, err = run_cli(["check", str(tiny_build)], capsys)
    _assert_one_line_error(code, err, 2, "several ONNX Runtime distributions")


def test_build_records_the_runtime_range_and_refuses_outside_it(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    assert manifest["runtime"] == {"onnxruntime": ">=1.32,<1.33"}
    monkeypatch.setattr(ort_runner, "installed_onnxruntime", lambda: ("1.27.0", ["onnxruntime 1.27.0"]))
    code, _, err = run_cli(["build", str(TINY), "--out", str(tmp_path / "x")], capsys)
    _assert_one_line_error(code, err, 2, "onnxruntime 1.27.0")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ item 11: spec from-hf robustness


def _hf_dir(tmp_path: Path, tiny_text_spec: M3Spec) -> Path:
    return save_checkpoint(M3ForCausalLM.from_config(tiny_text_spec), tiny_text_spec, tmp_path / "ckpt")


MALFORMED_CONFIG = {
    "layers_1e30": lambda c: c.update(num_hidden_layers=1e30),
    "layers_huge_int": lambda c: c.update(num_hidden_layers=10**30),
    "eos_empty": lambda c: c.update(eos_token_id=[]),
    "mlp_types_int": lambda c: (c.pop("moe_layer_freq"), c.update(mlp_layer_types=5)),
    "rope_parameters_int": lambda c: (c.pop("rope_theta"), c.update(rope_parameters=5)),
    "rotary_factor_str": lambda c: (c.pop("rotary_dim"), c.update(partial_rotary_factor="x")),
    "head_dim_str": lambda c: (c.pop("rotary_dim"), c.update(head_dim="ab")),
}


@pytest.mark.parametrize("case", list(MALFORMED_CONFIG))
def test_spec_from_hf_malformed_config_is_one_line(
    case: str, tiny_text_spec: M3Spec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _hf_dir(tmp_path, tiny_text_spec)
    cfg = json.loads((ckpt / "config.json").read_text())
    MALFORMED_CONFIG[case](cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["spec", "from-hf", str(ckpt)], capsys)
    _assert_one_line_error(code, err, 2, "config.json")


def test_spec_from_hf_deep_json_bad_index_and_bad_output(
    tiny_text_spec: M3Spec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _hf_dir(tmp_path, tiny_text_spec)
    good = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli(["spec", "from-hf", str(ckpt)], capsys)
    _assert_one_line_error(code, err, 2, "nests too deeply")
    (ckpt / "config.json").write_text(good)
    for index in ("[1]", '{"weight_map": 5}'):
        (ckpt / "model.safetensors.index.json").write_text(index)
        code, _, err = run_cli(["spec", "from-hf", str(ckpt)], capsys)
        _assert_one_line_error(code, err, 2, "not a valid index")
    (ckpt / "model.safetensors.index.json").unlink()
    for out, needle in (
        (tmp_path / "missing" / "s.yaml", "does not exist"),
        (tmp_path, "not a regular file"),
    ):
        code, _, err = run_cli(["spec", "from-hf", str(ckpt), "-o", str(out)], capsys)
        _assert_one_line_error(code, err, 2, needle)


# ------------------------------------------------------------- item 12: environment errors


def test_read_only_file_system_is_refused_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    target = Path("/proc/m3export-out")  # procfs: no directory can be created there, even as root
    code, _, err = run_cli(["build", str(TINY), "--out", str(target)], capsys)
    _assert_one_line_error(code, err, 2, "--out")


def test_too_little_disk_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from m3export.artifacts import outdir

    monkeypatch.setattr(
        outdir.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    )
    code, _, err = run_cli(["build", str(TINY), "--out", str(tmp_path / "x")], capsys)
    _assert_one_line_error(code, err, 2, "GiB are free")
    assert not list(tmp_path.iterdir())


def test_disk_full_mid_build_leaves_nothing_and_keeps_out(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import m3export.artifacts.goldens as goldens

    out = copy_artifacts(tiny_build, tmp_path / "m3-tiny")
    before = _snapshot(out)

    def full(*_a: Any, **_k: Any) -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "x.npz"))

    monkeypatch.setattr(goldens.np, "savez", full)
    data = _tiny_yaml()
    data["weights"] = {"random": {"seed": 3}}  # not up to date: every subgraph is rebuilt
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["build", str(spec), "--out", str(out)], capsys)
    _assert_one_line_error(code, err, 2, "No space left on device", "nothing was published")
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m3-tiny", "s.yaml"]


def test_spec_name_too_long_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _tiny_yaml()
    data["name"] = "x" * 300
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["spec", "validate", str(tmp_path / "s.yaml")], capsys)
    _assert_one_line_error(code, err, 2, "name")


def test_logits_out_onto_a_directory_is_refused(
    tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "d.npy").mkdir()
    code, out, err = run_cli(
        ["run", str(tiny_build), "--input-ids", "5,6", "--logits-out", str(tmp_path / "d.npy")], capsys
    )
    _assert_one_line_error(code, err, 2, "not a regular file")
    assert out == ""


def test_stdout_full_and_broken_pipe(tiny_build: Path) -> None:
    cli = [sys.executable, "-m", "m3export.cli"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [*cli, "check", str(tiny_build)], stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
    assert (
        proc.returncode == 2
        and proc.stderr == "error: cannot write to standard output: No space left on device\n"
    )
    gen = subprocess.Popen(
        [*cli, "generate", str(tiny_build), "--input-ids", "5,6,7", "--max-new-tokens", "64"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert gen.stdout is not None and gen.stderr is not None
    gen.stdout.readline()
    gen.stdout.close()  # `| head -n1`
    rc = gen.wait(timeout=120)
    err = gen.stderr.read().decode()
    assert rc == 141 and "Traceback" not in err, err


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["build"], ["build", str(TINY), "--bogus"], ["check"]):
        code, _, err = run_cli(args, capsys)
        _assert_one_line_error(code, err, 2, "see `m3export")


# ---------------------------------------------------------------- item 13: unreadable / hostile files


def test_unreadable_artifact_file_is_exit_3(
    tiny_build: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`chmod 0` as another user (tests run as root, so the permission error is injected)."""
    from m3export.artifacts import io as artifacts

    real = artifacts.PinnedFile.__init__

    def denied(self: Any, path: Path) -> None:
        if path.name == "text_1.onnx.data":
            raise PermissionError(13, "Permission denied", str(path))
        real(self, path)

    monkeypatch.setattr(artifacts.PinnedFile, "__init__", denied)
    for command in ("check", "run", "generate"):
        args = [command, str(tiny_build)] + ([] if command == "check" else ["--input-ids", "5,6,7"])
        code, _, err = run_cli(args, capsys)
        _assert_one_line_error(code, err, 3, "onnx/text_1.onnx.data is unreadable")


HOSTILE = {
    "nul_in_path": lambda m: m["subgraphs"]["mtp"]["files"].update({"mtp/a\x00b": "0" * 64}),
    "long_component": lambda m: m["subgraphs"]["mtp"]["files"].update({"mtp/" + "a" * 300: "0" * 64}),
    "parity_not_a_list": lambda m: m["subgraphs"]["mtp"].update(parity=5),
    "parity_entry_not_a_dict": lambda m: m["subgraphs"]["mtp"].update(parity=[5]),
    "tokens_not_ints": lambda m: m.update(golden_tokens={"x": {"plain": ["a"]}}),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_resealed_manifest_is_exit_3(
    case: str, tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = copy_artifacts(tiny_build, tmp_path / "a")
    rewrite_manifest(copy, HOSTILE[case], rehash=case not in ("nul_in_path", "long_component"))
    code, _, err = run_cli(["check", str(copy)], capsys)
    _assert_one_line_error(code, err, 3)


def test_deeply_nested_manifest_is_exit_3(
    tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from m3export.artifacts.seal import seal_manifest

    copy = copy_artifacts(tiny_build, tmp_path / "a")
    (copy / "manifest.json").write_text(
        '{"schema_version": 2, "spec": ' + "[" * 200_000 + "]" * 200_000 + "}"
    )
    seal_manifest(copy)
    code, _, err = run_cli(["check", str(copy)], capsys)
    _assert_one_line_error(code, err, 3, "nests too deeply")


# ---------------------------------------------------------------------- item 14: resource guards


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("hidden_size", 1_000_000),
        ("vocab_size", 10**9),
        ("num_local_experts", 100_000),
        ("hidden_size", 10**4000),
    ],
)
def test_absurd_sizes_are_refused_by_validate(
    path: str, value: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _tiny_yaml()
    data["text"][path] = value
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["spec", "validate", str(tmp_path / "s.yaml")], capsys)
    _assert_one_line_error(code, err, 2, path)


def test_memory_estimate_refuses_before_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("M3EXPORT_MAX_MEMORY", "64MiB")
    code, _, err = run_cli(["build", str(TINY), "--out", str(tmp_path / "x")], capsys)
    _assert_one_line_error(code, err, 2, "GiB of memory", "available")
    code, _, err = run_cli(
        ["model", "forward", str(ROOT / "specs" / "m3-full.yaml"), "--input-ids", "1,2,3"], capsys
    )
    monkeypatch.delenv("M3EXPORT_MAX_MEMORY")
    _assert_one_line_error(code, err, 2, "GiB of memory")


def test_huge_sparse_spec_file_is_refused_without_reading_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(8 << 30)  # 8 GiB, sparse
    start = time.perf_counter()
    code, _, err = run_cli(["spec", "validate", str(big)], capsys)
    assert time.perf_counter() - start < 2
    _assert_one_line_error(code, err, 2, "larger than")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    code, _, err = run_cli(["spec", "validate", str(fifo)], capsys)
    _assert_one_line_error(code, err, 2, "not a regular file")


def test_prompt_longer_than_the_context_is_refused(
    tiny_build: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = ",".join(["5"] * 4097)  # m3-tiny: max_position_embeddings 4096
    for args in (["run", str(tiny_build)], ["model", "forward", str(TINY)]):
        code, _out, err = run_cli([*args, "--input-ids", ids], capsys)
        _assert_one_line_error(code, err, 2, "4097 tokens", "max_position_embeddings")


def test_video_of_many_large_frames_is_refused_before_decoding(
    tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = tmp_path / "frame.png"
    Image.new("RGB", (2000, 2000)).save(frame)
    video = tmp_path / "video"
    video.mkdir()
    for i in range(400):
        (video / f"{i:04d}.png").symlink_to(frame)
    start = time.perf_counter()
    code, _, err = run_cli(["run", str(tiny_build), "--input-ids", "5,1022,6", "--video", str(video)], capsys)
    assert time.perf_counter() - start < 10  # refused from the headers: nothing decoded at full size
    _assert_one_line_error(code, err, 2, "max_position_embeddings")


# ------------------------------------------------------------------------------- item 15: lesser


def test_unlisted_files_rule(tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = copy_artifacts(tiny_build, tmp_path / "a")
    (copy / "NOTES.txt").write_text("mine")
    code, out, err = run_cli(["check", str(copy)], capsys)
    assert code == 0 and "integrity: warning: NOTES.txt is not part of the build" in out, out + err
    (copy / "etc").symlink_to("/etc")
    code, _, err = run_cli(["check", str(copy)], capsys)
    _assert_one_line_error(code, err, 3, "etc is a symbolic link")


def test_file_swapped_after_verification_is_not_what_runs(tiny_build: Path, tmp_path: Path) -> None:
    """Time of check = time of use: swap text_1's weights (rename over) between verification and the
    runner: the runner reads the verified descriptor, so the outputs are still the goldens'."""
    copy = copy_artifacts(tiny_build, tmp_path / "a")
    arts = verify_artifacts(copy)
    data = copy / "onnx" / "text_1.onnx.data"
    evil = tmp_path / "evil.data"
    evil.write_bytes(bytes(len(data.read_bytes())))  # zeros
    os.replace(evil, data)
    sub = next(s for s in arts.subgraphs if s.name == "text_1")
    case = "b2_s40_img2"
    got = sub.ort_runner().infer(sub.golden_inputs[case])
    np.testing.assert_allclose(got["logits"], sub.golden_outputs[case]["logits"], atol=1e-4)


def test_report_onto_a_device_is_refused(tiny_build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["check", str(tiny_build), "--report", "/dev/null"], capsys)
    _assert_one_line_error(code, err, 2, "not a regular file")


def test_fifo_checkpoint_is_refused(
    tiny_text_spec: M3Spec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _hf_dir(tmp_path, tiny_text_spec)
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    data = dump_spec(tiny_text_spec)
    data["weights"] = {"checkpoint": str(ckpt)}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["build", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, 2, "not a regular file")


# --------------------------------------------------------------------- item 16: signed manifests


def test_signed_build_detects_tampering_that_the_seal_cannot(
    tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key.txt"
    key.write_text("0123456789abcdef0123456789abcdef")
    copy = copy_artifacts(tiny_build, tmp_path / "a")
    sign_manifest(copy, key.read_bytes().strip())
    code, out, err = run_cli(["check", str(copy), "--key", str(key)], capsys)
    assert code == 0, out + err

    def loosen(m: dict[str, Any]) -> None:  # what someone with write access could do
        m["spec"]["tolerances"]["onnx"].update(max_abs=1.0, min_cosine=None)
        m["spec_hash"] = spec_hash(m["spec"])

    rewrite_manifest(copy, loosen)
    code, out, err = run_cli(["check", str(copy)], capsys)
    assert code == 0  # the seal was rewritten consistently: a checksum cannot tell
    code, _, err = run_cli(["check", str(copy), "--key", str(key)], capsys)
    _assert_one_line_error(code, err, 3, "signature does not match")
    (copy / SIGNATURE).unlink()
    code, _, err = run_cli(["check", str(copy), "--key", str(key)], capsys)
    _assert_one_line_error(code, err, 3, "not signed")
    key.write_text("short")
    code, _, err = run_cli(["check", str(copy), "--key", str(key)], capsys)
    _assert_one_line_error(code, err, 2, "at least 16 bytes")
