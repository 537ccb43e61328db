"""`m3export model forward` end to end on the tiny spec: success paths and one-line user errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from clihelp import run_cli
from conftest import SPECS, spec_variant
from PIL import Image

import m3export.runtime.media
from m3export.model.checkpoint import save_checkpoint
from m3export.model.vl import M3ForConditionalGeneration
from m3export.runtime.media import PixelInputs, preprocess_images
from m3export.spec import M3Spec, dump_spec

TINY = str(SPECS / "m3-tiny.yaml")
IMAGE_ID = 1021  # multimodal.image_token_index of m3-tiny


@pytest.fixture(scope="module")
def model(tiny_spec: M3Spec) -> M3ForConditionalGeneration:
    return M3ForConditionalGeneration.from_config(tiny_spec)


@pytest.fixture
def png(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:90, 0:130]
    pixels = np.stack([x * 2, y * 2, x + y], axis=-1) + rng.normal(0, 20, (90, 130, 3))
    path = tmp_path / "image.png"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def _write_spec(spec: M3Spec, path: Path, **weights: object) -> Path:
    data = dump_spec(spec)
    if weights:
        data["weights"] = weights
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _assert_one_line_error(code: int, out: str, err: str, match: str) -> None:
    assert code != 0 and out == "", (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and match in err, err


def _logits(model: M3ForConditionalGeneration, ids: list[int], images: list[Path] = ()) -> torch.Tensor:
    kwargs = {}
    if images:
        px = preprocess_images(images, model.vision)
        kwargs = {"pixel_values": px.pixel_values, "image_grid_thw": px.grid_thw}
    with torch.no_grad():
        return model(torch.tensor([ids]), **kwargs).logits


def test_text_only_prompt(model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "logits.npy"
    code, out, err = run_cli(
        ["model", "forward", TINY, "--input-ids", "1, 5,9,300", "--logits-out", str(out_file)], capsys
    )
    assert code == 0, err
    want = _logits(model, [1, 5, 9, 300])
    assert (
        f"logits [1, 4, 1024] (0 image(s)); top-1 token at the last position: {int(want[0, -1].argmax())}"
        in out
    )
    assert f"wrote {out_file}" in out
    assert torch.equal(torch.from_numpy(np.load(out_file)), want)


def test_prompt_with_an_image(model, png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "logits.npy"
    args = ["model", "forward", TINY, "--input-ids", f"1,{IMAGE_ID},7,8", "--image", str(png)]
    code, out, err = run_cli([*args, "--logits-out", str(out_file)], capsys)
    assert code == 0, err
    # 90x130 -> smart_resize 84x140 -> grid 6x10 patches -> 15 merged image tokens.
    ids = [1, *[IMAGE_ID] * 15, 7, 8]
    want = _logits(model, ids, [png])
    assert (
        f"logits [1, 18, 1024] (1 image(s)); top-1 token at the last position: {int(want[0, -1].argmax())}"
        in out
    )
    got = torch.from_numpy(np.load(out_file))
    assert torch.equal(got, want)
    # The image matters: the same prompt with another image gives other logits.
    other = tmp_path / "other.png"
    Image.fromarray(np.full((90, 130, 3), 200, np.uint8)).save(other)
    assert (got - _logits(model, ids, [other])).abs().max() > 1e-2


def test_checkpoint_spec(
    model, tiny_spec: M3Spec, png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """weights: {checkpoint: DIR} runs the checkpoint's weights, not a random init."""
    ckpt = save_checkpoint(
        M3ForConditionalGeneration.from_config(tiny_spec, seed=5), tiny_spec, tmp_path / "ckpt"
    )
    spec_file = _write_spec(tiny_spec, tmp_path / "spec.yaml", checkpoint=str(ckpt))
    out_file = tmp_path / "logits.npy"
    args = ["model", "forward", str(spec_file), "--input-ids", f"{IMAGE_ID},4", "--image", str(png)]
    code, _, err = run_cli([*args, "--logits-out", str(out_file)], capsys)
    assert code == 0, err
    want = _logits(M3ForConditionalGeneration.from_pretrained(ckpt), [*[IMAGE_ID] * 15, 4], [png])
    got = torch.from_numpy(np.load(out_file))
    assert torch.equal(got, want)
    assert (got - _logits(model, [*[IMAGE_ID] * 15, 4], [png])).abs().max() > 1e-2


def test_malformed_image_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code, out, err = run_cli(
        ["model", "forward", TINY, "--input-ids", f"1,{IMAGE_ID}", "--image", str(bad)], capsys
    )
    _assert_one_line_error(code, out, err, f"cannot read image {bad}")


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (
            f"1,{IMAGE_ID},{IMAGE_ID},3",
            "prompt has 2 image placeholder(s) (id 1021) but grid_thw has 1 row(s)",
        ),
        ("1,2,3", "prompt has 0 image placeholder(s)"),
    ],
)
def test_placeholder_count_mismatch(
    ids: str, match: str, png: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["model", "forward", TINY, "--input-ids", ids, "--image", str(png)], capsys)
    _assert_one_line_error(code, out, err, match)


def test_placeholder_without_image(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["model", "forward", TINY, "--input-ids", f"1,{IMAGE_ID},3"], capsys)
    _assert_one_line_error(code, out, err, "hold 1 image placeholder(s) (id 1021) but no image was given")


def test_odd_grid(png: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Real images always give even grids (smart_resize rounds to patch·merge); a preprocessor that
    returned an odd one must still end in a one-line error, not a reshape failure in the merger."""
    odd = PixelInputs(torch.zeros(12, 1176), torch.tensor([[1, 3, 4]]))
    monkeypatch.setattr(m3export.runtime.media, "preprocess_images", lambda images, vision: odd)
    code, out, err = run_cli(
        ["model", "forward", TINY, "--input-ids", f"1,{IMAGE_ID}", "--image", str(png)], capsys
    )
    _assert_one_line_error(code, out, err, "must be divisible by the spatial merge size 2")


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ("1,x,3", "--input-ids must be comma-separated integers like '1,2,3', got entry 'x'"),
        ("1,,3", "got entry ''"),
        ("1,5000", "token id 5000 is outside the vocabulary [0, 1024)"),
        ("1,1022", "hold 1 video placeholder(s) (id 1022) but no video was given"),
    ],
)
def test_bad_input_ids(ids: str, match: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["model", "forward", TINY, "--input-ids", ids], capsys)
    _assert_one_line_error(code, out, err, match)


def test_bad_logits_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["model", "forward", TINY, "--input-ids", "1,2", "--logits-out", str(tmp_path / "logits.txt")]
    _assert_one_line_error(*run_cli(args, capsys), "must end in .npy")


def test_image_with_text_only_spec(
    tiny_spec: M3Spec, png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_file = _write_spec(spec_variant(tiny_spec, text_only=True), tmp_path / "text.yaml")
    code, out, err = run_cli(["model", "forward", str(spec_file), "--input-ids", "1,2"], capsys)
    assert code == 0 and "logits [1, 2, 1024]" in out, err
    args = ["model", "forward", str(spec_file), "--input-ids", f"1,{IMAGE_ID}", "--image", str(png)]
    _assert_one_line_error(*run_cli(args, capsys), "is text-only (no vision section): it takes no images")
