"""Image / video preprocessing against transformers' MiniMax M3 processors (m3-architecture.md §4.1, §4.6, §4.7).

The oracle needs torchvision, and PyPI has only its CUDA build, whose C++ ops cannot load against
our CPU torch: in the main environment a half-working torchvision breaks `import transformers`
for everyone. So it lives in its own folder (`.venv/torchvision-oracle`, or
$M3EXPORT_TORCHVISION_ORACLE) and the oracle runs in a subprocess with it on PYTHONPATH.

Comparison is exact (`np.array_equal` on the fp32 pixel values): both sides run the same torch
kernels (uint8 bicubic antialias resize, fp32 normalise) on the same decoded pixels, so any
difference at all is a bug. Committed goldens (hashes of HF's output for deterministic inputs)
repeat the check where the oracle is not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m3export.errors import InputError
from m3export.model.vision_inputs import build_vision_inputs, segment_grid_thw
from m3export.runtime.media import (
    expand_image_placeholders,
    expand_video_placeholders,
    load_image,
    preprocess_images,
    preprocess_video,
    smart_resize,
)
from m3export.spec import M3Spec

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = Path(__file__).parent / "goldens" / "preprocess_transformers.json"
ORACLE_DIR = Path(os.environ.get("M3EXPORT_TORCHVISION_ORACLE", ROOT / ".venv" / "torchvision-oracle"))
INSTALL_HINT = f"{sys.executable} -m pip install --no-deps --target {ORACLE_DIR} torchvision==0.28.0"


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """Gradients plus hash noise, in integer arithmetic only, so the pixels are the same on every machine."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    r = x * 255 // max(width - 1, 1)
    g = y * 255 // max(height - 1, 1)
    b = (x + 2 * y) * 255 // (width + 2 * height)
    noise = ((x * 73856093) ^ (y * 19349663) ^ (seed * 83492791)) % 61 - 30
    rgb = np.stack([r + noise, g - noise, b + noise // 2], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


# (height, width): landscape, full HD (shrunk to the 672² budget), odd sizes, tiny (grown to the
# minimum), portrait, square above the budget, extreme aspect ratio (178:1).
IMAGE_SIZES = [(480, 640), (1080, 1920), (333, 517), (50, 70), (900, 300), (1000, 1000), (28, 5000)]
# (frames, height, width): an odd count (padded), and 11 frames = 6 temporal patches > 4 per segment.
VIDEOS = [(5, 120, 90), (11, 64, 100)]


def _cases(root: Path) -> dict[str, tuple[str, str]]:
    """name -> (kind, file): PNG and JPEG of every size, RGBA and grayscale PNGs, raw arrays, videos."""
    cases = {}
    for i, (h, w) in enumerate(IMAGE_SIZES):
        img = Image.fromarray(synthetic_image(h, w, i))
        img.save(root / f"img{i}.png")
        img.save(root / f"img{i}.jpg", quality=90)
        for ext in ("png", "jpg"):
            cases[f"img{i}.{ext}"] = ("image_file", str(root / f"img{i}.{ext}"))
    rgba = synthetic_image(200, 300, 7)
    alpha = (np.arange(300)[None, :] * 255 // 299).repeat(200, 0).astype(np.uint8)
    Image.fromarray(np.dstack([rgba, alpha]), "RGBA").save(root / "rgba.png")
    Image.fromarray(synthetic_image(150, 260, 8)[..., 0], "L").save(root / "gray.png")
    cases["rgba.png"] = ("image_file", str(root / "rgba.png"))
    cases["gray.png"] = ("image_file", str(root / "gray.png"))
    for i, (h, w) in enumerate([(480, 640), (37, 1000)]):
        np.save(root / f"array{i}.npy", synthetic_image(h, w, 20 + i))
        cases[f"array{i}"] = ("image_array", str(root / f"array{i}.npy"))
    for i, (f, h, w) in enumerate(VIDEOS):
        np.save(root / f"video{i}.npy", np.stack([synthetic_image(h, w, 30 + k) for k in range(f)]))
        cases[f"video{i}"] = ("video", str(root / f"video{i}.npy"))
    return cases


ORACLE = r"""
import json, sys
import numpy as np
import torch
try:
    import torchvision  # noqa: F401
except RuntimeError:
    # PyPI's torchvision is a CUDA build: its C++ ops do not load against a CPU torch, and its fake-op
    # registration then fails. The transforms used here are pure torch; declare the two missing schemas.
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401
from PIL import Image
from transformers import MiniMaxM3VLImageProcessor, MiniMaxM3VLVideoProcessor

cases, out_path = json.loads(sys.argv[1]), sys.argv[2]
images, videos = MiniMaxM3VLImageProcessor(), MiniMaxM3VLVideoProcessor()
out, batch = {}, []
for name, (kind, path) in cases.items():
    if kind == "video":
        r = videos(videos=[np.load(path)], return_tensors="pt")
        out[name + "/pixel_values"] = r["pixel_values_videos"].numpy()
        out[name + "/grid_thw"] = r["video_grid_thw"].numpy()
        continue
    image = Image.open(path) if kind == "image_file" else np.load(path)
    batch.append(image)
    r = images(images=[image], return_tensors="pt")
    out[name + "/pixel_values"] = r["pixel_values"].numpy()
    out[name + "/grid_thw"] = r["image_grid_thw"].numpy()
r = images(images=batch, return_tensors="pt")
out["batch/pixel_values"] = r["pixel_values"].numpy()
out["batch/grid_thw"] = r["image_grid_thw"].numpy()
np.savez(out_path, **out)
"""


def _oracle_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None or (ORACLE_DIR / "torchvision").is_dir()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    return _cases(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module")
def oracle(
    media: dict[str, tuple[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, np.ndarray]:
    if not _oracle_available():
        pytest.skip(
            f"transformers' image processor needs torchvision; install the oracle copy: {INSTALL_HINT}"
        )
    out = tmp_path_factory.mktemp("oracle") / "hf.npz"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ORACLE_DIR), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", ORACLE, json.dumps(media), str(out)], env=env, check=True)
    return dict(np.load(out))


def _ours(kind: str, path: str, spec: M3Spec):  # type: ignore[no-untyped-def]
    assert spec.vision is not None
    if kind == "video":
        return preprocess_video(np.load(path), spec.vision)
    return preprocess_images([path if kind == "image_file" else np.load(path)], spec.vision)


def _digest(pixel_values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixel_values, dtype="<f4").tobytes()).hexdigest()


def test_identical_to_transformers(media, oracle, tiny_spec: M3Spec) -> None:
    for name, (kind, path) in media.items():
        ours = _ours(kind, path, tiny_spec)
        pv, grid = ours.pixel_values.numpy(), ours.grid_thw.numpy()
        want_pv, want_grid = oracle[f"{name}/pixel_values"], oracle[f"{name}/grid_thw"]
        if kind == "video":
            # HF's video processor emits one grid row per ≤4-patch attention segment; ours, one row
            # per video, segmented later by vision_inputs (§4.6).
            assert segment_grid_thw([tuple(grid[0])], 4) == tuple(map(tuple, want_grid.tolist())), name
        else:
            assert np.array_equal(grid, want_grid), (name, grid, want_grid)
        assert pv.dtype == want_pv.dtype == np.float32 and pv.shape == want_pv.shape, name
        assert np.array_equal(pv, want_pv), (name, float(np.abs(pv - want_pv).max()))


def test_batch_identical_to_transformers(media, oracle, tiny_spec: M3Spec) -> None:
    assert tiny_spec.vision is not None
    inputs = [
        path if kind == "image_file" else np.load(path) for kind, path in media.values() if kind != "video"
    ]
    ours = preprocess_images(inputs, tiny_spec.vision)
    assert np.array_equal(ours.grid_thw.numpy(), oracle["batch/grid_thw"])
    assert np.array_equal(ours.pixel_values.numpy(), oracle["batch/pixel_values"])


def test_goldens_are_transformers_output(media, oracle) -> None:
    """The committed hashes below are what transformers produces (checked whenever the oracle runs)."""
    goldens = json.loads(GOLDENS.read_text())
    for name, entry in goldens.items():
        assert _digest(oracle[f"{name}/pixel_values"]) == entry["sha256"], name
        assert oracle[f"{name}/grid_thw"].tolist() == entry["hf_grid_thw"], name


def test_matches_goldens(media, tiny_spec: M3Spec) -> None:
    """Runs without the oracle: lossless inputs only (PNG, arrays, videos), whose pixels are machine-independent."""
    goldens = json.loads(GOLDENS.read_text())
    assert len(goldens) >= 10
    for name, entry in goldens.items():
        kind, path = media[name]
        ours = _ours(kind, path, tiny_spec)
        assert ours.grid_thw.tolist() == entry["grid_thw"], name
        assert _digest(ours.pixel_values.numpy()) == entry["sha256"], name


def test_resize_rule_is_hf_smart_resize() -> None:
    """HF's Qwen2-VL rule, not sglang's box rule (§4.7, §10.10).

    E.g. 300×1000 (h×w) stays 308×1008 here (22×72 patches, 396 tokens); the box rule as §4.7
    describes it would fit 1008 into 672 and give 224×672 (16×48 patches, 192 tokens).
    """
    assert smart_resize(672, 672, 28, 3136, 451584) == (672, 672)
    assert smart_resize(1000, 1000, 28, 3136, 451584) == (672, 672)  # square cap: 576 tokens
    assert smart_resize(300, 1000, 28, 3136, 451584) == (308, 1008)  # nearest multiple, no cap hit
    assert smart_resize(20, 30, 28, 3136, 451584) == (56, 84)  # grown to the minimum area, ceil
    assert smart_resize(42, 98, 28, 3136, 451584) == (56, 112)  # Python round: 1.5 -> 2, 3.5 -> 4
    assert smart_resize(50, 70, 28, 3136, 451584) == (56, 56)  # ... and 2.5 -> 2 (half to even)
    assert smart_resize(1080, 1920, 28, 3136, 451584) == (504, 896)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not an image at all", "cannot identify image file"),
        (b"", "cannot identify image file"),
        ("truncated_png", "truncated"),
        ("truncated_jpg", "truncated"),
    ],
)
def test_malformed_image_file_raises_input_error(content, match: str, tmp_path: Path) -> None:
    if isinstance(content, str):
        ext = content.split("_")[1]
        Image.fromarray(synthetic_image(64, 80, 0)).save(tmp_path / f"ok.{ext}")
        data = (tmp_path / f"ok.{ext}").read_bytes()
        content = data[: len(data) // 2]
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(InputError, match=match) as err:
        load_image(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        ("/nonexistent/image.png", "does not exist"),
        (np.zeros((8, 8, 3), dtype=np.float32), "uint8"),
        (np.zeros((8, 8), dtype=np.uint8), "HxWx3"),
        (np.zeros((8, 8, 4), dtype=np.uint8), "HxWx3"),
        (12, "unsupported image type"),
        (np.zeros((28, 28 * 201, 3), dtype=np.uint8), "aspect ratio"),
    ],
)
def test_bad_image_inputs_raise_input_error(image, match: str, tiny_spec: M3Spec) -> None:
    assert tiny_spec.vision is not None
    with pytest.raises(InputError, match=match):
        preprocess_images([image], tiny_spec.vision)


def test_video_frames_of_different_sizes_raise_input_error(tiny_spec: M3Spec) -> None:
    assert tiny_spec.vision is not None
    with pytest.raises(InputError, match="one size"):
        preprocess_video([synthetic_image(56, 56, 0), synthetic_image(56, 84, 0)], tiny_spec.vision)


def test_odd_grid_raises_input_error(tiny_spec: M3Spec) -> None:
    assert tiny_spec.vision is not None
    with pytest.raises(InputError, match="divisible by the spatial merge size"):
        expand_image_placeholders([5, 9, 6], 9, [[1, 3, 4]], merge_size=2)
    with pytest.raises(InputError, match="divisible by the spatial merge size"):
        build_vision_inputs([[1, 4, 7]], tiny_spec.vision)


def test_image_placeholder_expansion(tiny_spec: M3Spec) -> None:
    img = 1021
    ids = expand_image_placeholders([1, img, 7, img, 2], img, [[1, 2, 4], [1, 4, 4]], merge_size=2)
    assert ids == [1, img, img, 7, img, img, img, img, 2]
    wrapped = expand_image_placeholders([img], img, [[1, 2, 2]], merge_size=2, start_id=50, end_id=51)
    assert wrapped == [50, img, 51]
    # One text token per merged feature row: what the tower produces for the same grid.
    assert tiny_spec.vision is not None
    assert build_vision_inputs([[1, 2, 4], [1, 4, 4]], tiny_spec.vision).num_tokens == (2, 4)
    with pytest.raises(InputError, match="1 image placeholder"):
        expand_image_placeholders([img], img, [[1, 2, 2], [1, 2, 2]], merge_size=2)


def test_video_placeholder_expansion() -> None:
    vid = 1022
    ids = expand_video_placeholders([3, vid, 4], vid, [[2, 2, 4]], merge_size=2, start_id=50, end_id=51)
    assert ids == [3, 50, vid, vid, 51, 50, vid, vid, 51, 4]
