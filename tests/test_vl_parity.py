"""m3export VL model vs transformers' `MiniMaxM3SparseForConditionalGeneration`, fp32 CPU, eager attention.

Both directions go through HF-layout checkpoints on disk (m3-architecture.md §6.1): m3export saves a
random VL model and transformers loads it, and transformers (every parameter and persistent buffer
re-randomised) saves and m3export loads. Both models get the same pixel_values / grid_thw from our
preprocessing (transformers' image processor needs torchvision, which this venv cannot import).
Prompts are 64 tokens so that MSA (block 8, top-2) drops blocks on every sparse layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import spec_variant
from parityhelp import assert_within as _assert_within
from parityhelp import dropped_pairs
from parityhelp import stats as _stats

from m3export.errors import InputError
from m3export.model.checkpoint import save_checkpoint
from m3export.model.text import M3ForCausalLM
from m3export.model.vl import M3ForConditionalGeneration
from m3export.parity.hf_oracle import randomise_hf_weights
from m3export.runtime.media import (
    expand_image_placeholders,
    expand_video_placeholders,
    preprocess_images,
    preprocess_video,
)
from m3export.spec import M3Spec, Tolerance, to_hf_config

transformers = pytest.importorskip("transformers")
from transformers import MiniMaxM3SparseForConditionalGeneration  # noqa: E402

SEQ = 64
HF_VISION = ("model.vision_tower.", "model.multi_modal_projector.")


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """Colour gradients plus noise, HxWx3 uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = (
        np.stack([x / width, y / height, (x + y) / (height + width)], axis=-1) * 255 * rng.uniform(0.4, 1, 3)
    )
    return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Case:
    images: tuple[tuple[tuple[int, int], ...], ...]  # per batch row: (height, width) of its images
    video: tuple[int, int, int] | None = None  # (frames, height, width), in row 0 after its images


CASES = {
    "one_image": Case((((112, 112),),)),
    "two_images_of_different_sizes": Case((((60, 90), (130, 100)),)),
    "non_square_image": Case((((50, 200),),)),
    "batch_of_2_with_different_image_counts": Case((((84, 56), (112, 140)), ((100, 70),))),
    # Beyond the brief: a video of 5 temporal patches, cut into attention segments of <= 4 (§4.6).
    "image_and_long_video": Case((((70, 60),),), video=(10, 56, 84)),
}


@dataclass(frozen=True)
class Inputs:
    ours: dict[str, Any]
    hf: dict[str, Any]


def _inputs(case: Case, spec: M3Spec, seed: int) -> Inputs:
    """Row r: text, then per image [placeholder + 6 text], padded with text to SEQ tokens."""
    assert spec.vision is not None and spec.multimodal is not None
    mm, merge = spec.multimodal, spec.vision.spatial_merge_size
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 1000, (n,), generator=g).tolist()  # noqa: E731
    images = [
        _image(h, w, seed + 10 * r + i) for r, row in enumerate(case.images) for i, (h, w) in enumerate(row)
    ]
    px = preprocess_images(images, spec.vision)
    rows, first = [], 0
    for r, row in enumerate(case.images):
        ids = text(5)
        for _ in row:
            ids += [mm.image_token_index, *text(6)]
        ids = expand_image_placeholders(
            ids, mm.image_token_index, px.grid_thw[first : first + len(row)], merge_size=merge
        )
        first += len(row)
        if r == 0 and case.video is not None:
            ids += [mm.video_token_index, *text(3)]
        rows.append(ids)
    ours: dict[str, Any] = {"pixel_values": px.pixel_values, "image_grid_thw": px.grid_thw}
    hf: dict[str, Any] = {"pixel_values": px.pixel_values, "image_grid_thw": px.grid_thw}
    if case.video is not None:
        frames, h, w = case.video
        vid = preprocess_video([_image(h, w, 100 + f) for f in range(frames)], spec.vision)
        rows[0] = expand_video_placeholders(rows[0], mm.video_token_index, vid.grid_thw, merge_size=merge)
        t, gh, gw = vid.grid_thw[0].tolist()
        seg = spec.vision.vision_segment_max_frames
        assert t > seg  # the case must need segmenting
        # transformers' video processor emits one grid row per attention segment (§4.6, tests/test_vision.py).
        hf_grid = torch.tensor([[min(seg, t - s), gh, gw] for s in range(0, t, seg)])
        ours |= {"pixel_values_videos": vid.pixel_values, "video_grid_thw": vid.grid_thw}
        hf |= {"pixel_values_videos": vid.pixel_values, "video_grid_thw": hf_grid}
    assert all(len(r) <= SEQ - 3 for r in rows), [len(r) for r in rows]
    ids = torch.tensor([r + text(SEQ - len(r)) for r in rows])
    return Inputs({"input_ids": ids, **ours}, {"input_ids": ids, **hf})


def _tol(spec: M3Spec) -> Tolerance:
    assert spec.tolerances.reference is not None
    return spec.tolerances.reference


def _hf_load(path: Path) -> tuple[Any, dict[str, Any]]:
    model, info = MiniMaxM3SparseForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    assert model.model.vision_tower.config._attn_implementation == "eager"
    assert model.model.language_model.config._attn_implementation == "eager"
    return model.eval(), info


def _randomise_hf(model: Any, seed: int) -> None:
    """Every parameter and persistent buffer re-randomised (m3export.parity.hf_oracle.randomise_hf_weights)."""
    randomise_hf_weights(model, seed)


@pytest.fixture(scope="module")
def ours_to_hf(tiny_spec: M3Spec, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    ours = M3ForConditionalGeneration.from_config(tiny_spec)
    path = save_checkpoint(ours, tiny_spec, tmp_path_factory.mktemp("ours"))
    hf, info = _hf_load(path)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return ours, hf, path


@pytest.fixture(scope="module")
def hf_to_ours(tiny_spec: M3Spec, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    cfg = {k: v for k, v in to_hf_config(tiny_spec).items() if k != "architectures"}
    hf = MiniMaxM3SparseForConditionalGeneration(transformers.MiniMaxM3VLConfig(**cfg)).eval()
    _randomise_hf(hf, seed=11)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    hf, info = _hf_load(path)  # the oracle is what is on disk, eager attention
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # transformers writes no MTP tensors; config.json is transformers' own, the architecture is the spec's.
    ours = M3ForConditionalGeneration.from_pretrained(path, spec=spec_variant(tiny_spec, num_mtp_modules=0))
    return ours, hf


@pytest.mark.parametrize("direction", ["ours->hf", "hf->ours"])
@pytest.mark.parametrize("name", CASES)
def test_vl_logits_match_transformers(
    name: str, direction: str, ours_to_hf: tuple, hf_to_ours: tuple, tiny_spec: M3Spec
) -> None:
    ours, hf = (ours_to_hf[0], ours_to_hf[1]) if direction == "ours->hf" else hf_to_ours
    inputs = _inputs(CASES[name], tiny_spec, seed=len(name))
    ids = inputs.ours["input_ids"]
    placeholders = int((ids == tiny_spec.multimodal.image_token_index).sum())  # type: ignore[union-attr]
    assert placeholders == int(inputs.ours["image_grid_thw"].prod(-1).sum()) // 4 > 0
    dropped = dropped_pairs(ours, **inputs.ours)
    assert dropped and all(d > 0 for d in dropped), dropped  # MSA really drops blocks
    with torch.no_grad():
        got = ours(**inputs.ours)
        want = hf(**inputs.hf).logits
    s = _assert_within(got.logits, want, _tol(tiny_spec))
    print(f"{direction} {name} {list(ids.shape)} grids {inputs.ours['image_grid_thw'].tolist()}: {s}")
    assert (got.mtp_per_depth_logits is not None) == (direction == "ours->hf")


def test_feature_order_is_checked(
    ours_to_hf: tuple, tiny_spec: M3Spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation: images spliced in reverse order must fail the comparison."""
    ours, hf, _ = ours_to_hf
    inputs = _inputs(CASES["two_images_of_different_sizes"], tiny_spec, seed=1)
    real = M3ForConditionalGeneration.vision_features
    monkeypatch.setattr(
        M3ForConditionalGeneration, "vision_features", lambda self, *a: real(self, *a).flip(0)
    )
    with torch.no_grad():
        err = _stats(ours(**inputs.ours).logits, hf(**inputs.hf).logits)["max_abs"]
    print(f"reversed features: max abs {err:.3g}")
    assert err > 100 * _tol(tiny_spec).max_abs, err


def test_images_are_isolated_in_vision_attention(
    ours_to_hf: tuple, tiny_spec: M3Spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation: letting two images attend to each other (one segment) must fail the comparison."""
    import m3export.model.vl as vl

    ours, hf, _ = ours_to_hf
    inputs = _inputs(CASES["two_images_of_different_sizes"], tiny_spec, seed=2)
    real = vl.build_vision_inputs

    def one_segment(*args: Any, **kwargs: Any) -> Any:
        vi = real(*args, **kwargs)
        object.__setattr__(vi, "segment_ids", torch.zeros_like(vi.segment_ids))
        return vi

    monkeypatch.setattr(vl, "build_vision_inputs", one_segment)
    with torch.no_grad():
        err = _stats(ours(**inputs.ours).logits, hf(**inputs.hf).logits)["max_abs"]
    print(f"joint vision attention: max abs {err:.3g}")
    assert err > 100 * _tol(tiny_spec).max_abs, err


def test_checkpoint_round_trip(ours_to_hf: tuple, tiny_spec: M3Spec) -> None:
    ours, _, path = ours_to_hf
    back = M3ForConditionalGeneration.from_pretrained(path)  # architecture from our config.json
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_init(tiny_spec: M3Spec) -> None:
    """Deterministic from the seed; text weights equal the text model's; vision norms perturbed."""
    a = M3ForConditionalGeneration.from_config(tiny_spec).state_dict()
    b = M3ForConditionalGeneration.from_config(tiny_spec).state_dict()
    c = M3ForConditionalGeneration.from_config(tiny_spec, seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)
    text = M3ForCausalLM.from_config(tiny_spec).state_dict()
    assert all(torch.equal(t, a["language_model." + k]) for k, t in text.items())
    for k, t in a.items():
        assert t.float().std() > 0, k
        if k.endswith(("layrnorm.weight", "layer_norm1.weight", "layer_norm2.weight")):
            assert 0.02 < (t - 1).std() < 0.5, k


def test_text_only_prompt_matches_text_model(tiny_spec: M3Spec) -> None:
    vl = M3ForConditionalGeneration.from_config(tiny_spec)
    lm = M3ForCausalLM.from_config(tiny_spec)
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = vl(ids), lm(ids)
    assert torch.equal(a.logits, b.logits)
    assert a.mtp_per_depth_logits is not None and b.mtp_per_depth_logits is not None
    assert torch.equal(a.mtp_per_depth_logits[0], b.mtp_per_depth_logits[0])


BAD = {
    "more placeholders than features": (
        lambda ids, px: (ids.clone().fill_(1021), px, [[1, 4, 4]]),
        "placeholder",
    ),
    "placeholders without an image": (lambda ids, px: (ids, None, None), "no image was given"),
    "odd grid": (lambda ids, px: (ids, px[:12], [[1, 3, 4]]), "divisible by the spatial merge size"),
    "grid/pixel mismatch": (lambda ids, px: (ids, px[:12], [[1, 4, 4]]), "patch rows"),
    "wrong patch width": (lambda ids, px: (ids, px[:, :100], [[1, 4, 4]]), r"\[num_patches, 1176\]"),
    "id out of range": (lambda ids, px: (ids + 2000, px, [[1, 4, 4]]), "vocab_size"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_inputs_raise_input_error(name: str, tiny_spec: M3Spec) -> None:
    model = M3ForConditionalGeneration.from_config(tiny_spec)
    ids = torch.tensor([[5] * 10 + [1021] * 4 + [7] * 10])
    px = torch.randn(16, 1176)
    make, match = BAD[name]
    ids, px, grid = make(ids, px)
    with pytest.raises(InputError, match=match):
        model(ids, px, grid)
