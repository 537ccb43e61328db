"""`m3export run`: a prompt through the chained subgraphs of a tiny build, ORT vs torch (CPU, ~60 s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clihelp import run_cli
from PIL import Image

from m3export.artifacts.seal import seal_manifest
from m3export.parity import compare_outputs
from m3export.runtime.forward import forward_prompt
from m3export.runtime.prompt import parse_token_ids
from m3export.spec import M3Spec


def _run_backends(
    root: Path, ids: str, extra: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> dict[str, np.ndarray]:
    """`m3export run` with --backend ort and torch on one prompt: the saved logits per backend."""
    logits = {}
    for backend in ("ort", "torch"):
        out = tmp_path / f"{backend}.npy"
        args = ["run", str(root), "--backend", backend, "--input-ids", ids, "--logits-out", str(out)]
        code, stdout, stderr = run_cli(args + extra, capsys)
        assert code == 0, stdout + stderr
        assert f"backend {backend}" in stdout and "top-1 token at the last position" in stdout
        logits[backend] = np.load(out)
    return logits


def _image(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((60, 90, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_run_ort_and_torch_agree(
    tiny_build: Path, tiny_spec: M3Spec, tmp_path: Path, capsys: pytest.CaptureFixture[str], with_image: bool
) -> None:
    assert tiny_spec.multimodal is not None
    ids = f"5,6,{tiny_spec.multimodal.image_token_index},7,8" if with_image else "5,6,7,8,9,10,11"
    extra = ["--image", str(_image(tmp_path / "img.png"))] if with_image else []
    logits = _run_backends(tiny_build, ids, extra, tmp_path, capsys)
    if with_image:  # 60x90 -> smart_resize 56x84 -> grid [1, 4, 6] -> 6 image tokens
        assert logits["ort"].shape == (1, 4 + 6, tiny_spec.text.vocab_size)
    else:
        assert logits["ort"].shape == (1, 7, tiny_spec.text.vocab_size)
    tol = tiny_spec.tolerances.end_to_end
    assert tol is not None
    rep = compare_outputs(
        "end_to_end",
        "run",
        "cli",
        {"logits": logits["ort"]},
        {"logits": logits["torch"]},
        tol,
        {"logits": "logits"},
    )
    assert rep.passed, rep.failures()
    # The torch chain is the `model forward` model cut into stages: bit-identical to it.
    images = [tmp_path / "img.png"] if with_image else []
    ref = forward_prompt(tiny_spec, parse_token_ids(ids), images).logits.numpy()
    np.testing.assert_array_equal(logits["torch"], ref)


def test_run_missing_artifacts_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_cli(["run", str(tmp_path / "nope"), "--input-ids", "1,2"], capsys)
    assert code == 3
    assert stderr.startswith("error: ") and "no such artifact directory" in stderr and stderr.count("\n") == 1


def test_run_unreadable_manifest_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    seal_manifest(tmp_path)  # sealed, so the manifest itself is what is refused
    code, _, stderr = run_cli(["run", str(tmp_path), "--input-ids", "1,2"], capsys)
    assert code == 3 and "not valid JSON" in stderr


def test_run_image_token_without_image_is_an_input_error(
    tiny_build: Path, tiny_spec: M3Spec, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tiny_spec.multimodal is not None
    ids = f"5,{tiny_spec.multimodal.image_token_index},6"
    code, _, stderr = run_cli(["run", str(tiny_build), "--input-ids", ids], capsys)
    assert code == 2 and "no --image" in stderr


def test_run_image_and_video_ort_and_torch_agree(
    tiny_build: Path, tiny_spec: M3Spec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A video (a directory of 5 frames -> 3 temporal patches) goes through the vision subgraph and is
    spliced at its placeholders; ORT and the eager stages agree, and the eager full model too."""
    assert tiny_spec.multimodal is not None
    mm = tiny_spec.multimodal
    frames = tmp_path / "clip"
    frames.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray((rng.random((56, 84, 3)) * 255).astype(np.uint8)).save(frames / f"{i:03d}.png")
    ids = f"5,{mm.image_token_index},6,{mm.video_token_index},7,8"
    extra = ["--image", str(_image(tmp_path / "img.png")), "--video", str(frames)]
    logits = _run_backends(tiny_build, ids, extra, tmp_path, capsys)
    # 4 text + 6 image tokens (60x90 -> [1, 4, 6]) + 18 video tokens (5 frames -> [3, 4, 6] / 4)
    assert logits["ort"].shape == (1, 4 + 6 + 18, tiny_spec.text.vocab_size)
    eager = forward_prompt(
        tiny_spec, parse_token_ids(ids), [tmp_path / "img.png"], videos=[frames]
    ).logits.numpy()
    tol = tiny_spec.tolerances.end_to_end
    assert tol is not None
    rep = compare_outputs(
        "end_to_end",
        "run",
        "video",
        {"logits": logits["ort"]},
        {"logits": logits["torch"]},
        tol,
        {"logits": "logits"},
    )
    assert rep.passed, rep.failures()
    np.testing.assert_array_equal(logits["torch"], eager)  # the eager stages are the full model, cut


def test_run_video_token_without_video_is_an_input_error(
    tiny_build: Path, tiny_spec: M3Spec, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tiny_spec.multimodal is not None
    ids = f"5,{tiny_spec.multimodal.video_token_index},6"
    code, _, stderr = run_cli(["run", str(tiny_build), "--input-ids", ids], capsys)
    assert code == 2 and "no --video" in stderr
