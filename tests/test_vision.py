"""Vision tower, projector and merger against transformers' MiniMax M3 VL (m3-architecture.md §4.2-§4.6).

transformers (5.24) isolates every `grid_thw` row in attention and restarts its temporal RoPE; its
*video processor* cuts a long video into rows of at most `vision_segment_max_frames` temporal
patches. So the oracle for a long video is HF fed the segmented grid, while ours gets the one
unsegmented row and segments it itself (`vision_inputs`, §4.6, §10.9).
"""

from __future__ import annotations

import re

import pytest
import torch

from m3export.errors import InputError
from m3export.model.vision import M3VisionTower, apply_vision_rope
from m3export.model.vision_inputs import (
    build_vision_inputs,
    segment_grid_thw,
    validate_grid_thw,
    vision_position_ids,
    vision_rope_axis_dim,
    vision_rope_cos_sin,
)
from m3export.spec import M3Spec, to_hf_config

pytest.importorskip("transformers")
from transformers import MiniMaxM3VLConfig
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (
    MiniMaxM3VLMultiModalProjector,
    MiniMaxM3VLVisionModel,
)
from transformers.vision_utils import get_vision_position_ids

HFModels = tuple[MiniMaxM3VLVisionModel, MiniMaxM3VLMultiModalProjector]


def _randomise(modules: list[torch.nn.Module], seed: int) -> None:
    """Every parameter random and O(1)-preserving: LayerNorm weights 1 + N(0, 0.1), biases N(0, 0.1),
    weights N(0, 1/fan_in), so features stay O(1) and no tensor can hide behind a 0 or a 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1 + 0.1 * noise)
                elif name.endswith("bias"):
                    p.copy_(0.1 * noise)
                else:
                    p.copy_(noise * p[0].numel() ** -0.5)


def _hf_to_checkpoint_keys(vision: dict[str, torch.Tensor], projector: dict[str, torch.Tensor]) -> dict:
    """Undo transformers' renames (conversion_mapping "minimax_m3_vl") back to the §6.1 keys."""
    out = {}
    for k, v in vision.items():
        k = k.replace("embeddings.proj.", "embeddings.patch_embedding.").replace("layers.", "encoder.layers.")
        out[f"vision_tower.vision_model.{k}"] = v
    for k, v in projector.items():
        out[
            f"patch_merge_mlp.{k.removeprefix('merge_')}"
            if k.startswith("merge_")
            else f"multi_modal_projector.{k}"
        ] = v
    return out


@pytest.fixture(scope="module")
def models(tiny_spec: M3Spec) -> tuple[M3VisionTower, HFModels]:
    cfg = MiniMaxM3VLConfig(**to_hf_config(tiny_spec))
    hf_vision = MiniMaxM3VLVisionModel._from_config(
        cfg.vision_config, attn_implementation="eager", dtype=torch.float32
    )
    assert hf_vision.config._attn_implementation == "eager"
    hf_projector = MiniMaxM3VLMultiModalProjector(cfg)
    _randomise([hf_vision, hf_projector], seed=0)
    ours = M3VisionTower.from_spec(tiny_spec)
    ours.load_state_dict(
        _hf_to_checkpoint_keys(hf_vision.state_dict(), hf_projector.state_dict()), strict=True
    )
    return ours.eval(), (hf_vision.eval(), hf_projector.eval())


@torch.no_grad()
def _hf_features(hf: HFModels, pixel_values: torch.Tensor, grid: list[list[int]]) -> torch.Tensor:
    vision, projector = hf
    return projector(vision(pixel_values, grid_thw=torch.tensor(grid)).last_hidden_state.squeeze(0))


@torch.no_grad()
def _our_features(
    ours: M3VisionTower, spec: M3Spec, pixel_values: torch.Tensor, grid: list[list[int]]
) -> torch.Tensor:
    assert spec.vision is not None
    vi = build_vision_inputs(grid, spec.vision, num_patches=pixel_values.shape[0])
    return ours(pixel_values, vi.rope_cos, vi.rope_sin, vi.segment_ids)


def _pixels(grid: list[list[int]], seed: int) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, 1176, generator=torch.Generator().manual_seed(seed))


CASES = {
    # name: (our grid, the grid HF gets: segmented as its video processor emits it)
    "one_image": ([[1, 8, 12]], [[1, 8, 12]]),
    "two_images_of_different_sizes": ([[1, 6, 4], [1, 8, 8]], [[1, 6, 4], [1, 8, 8]]),
    "non_square_image": ([[1, 4, 16]], [[1, 4, 16]]),
    "video_within_one_segment": ([[3, 4, 4]], [[3, 4, 4]]),
    "video_longer_than_a_segment": ([[6, 4, 4]], [[4, 4, 4], [2, 4, 4]]),
    "image_and_long_video": ([[1, 4, 6], [9, 2, 4]], [[1, 4, 6], [4, 2, 4], [4, 2, 4], [1, 2, 4]]),
}


@pytest.mark.parametrize("name", CASES)
def test_merged_features_match_transformers(name: str, models, tiny_spec: M3Spec) -> None:
    ours, hf = models
    grid, hf_grid = CASES[name]
    assert tiny_spec.vision is not None and tiny_spec.tolerances.reference is not None
    assert [list(g) for g in segment_grid_thw(validate_grid_thw(grid, 2), 4)] == hf_grid
    pixels = _pixels(grid, seed=len(name))
    got, want = _our_features(ours, tiny_spec, pixels, grid), _hf_features(hf, pixels, hf_grid)
    assert got.shape == (sum(t * h * w for t, h, w in grid) // 4, tiny_spec.text.hidden_size)
    err = (got - want).abs().max().item()
    print(f"{name}: max abs {err:.2e} (|features| max {want.abs().max().item():.2f})")
    assert err <= tiny_spec.tolerances.reference.max_abs, err


def test_segmentation_is_what_makes_long_videos_match(models, tiny_spec: M3Spec) -> None:
    """Guards the video case above: one unsegmented 6-patch attention sequence is far off."""
    ours, hf = models
    grid = [[6, 4, 4]]
    pixels = _pixels(grid, seed=3)
    err = (_our_features(ours, tiny_spec, pixels, grid) - _hf_features(hf, pixels, grid)).abs().max().item()
    assert err > 1e-2, err


def test_items_do_not_attend_to_each_other(models, tiny_spec: M3Spec) -> None:
    ours, _ = models
    grid = [[1, 4, 6], [2, 6, 4]]
    pixels = _pixels(grid, seed=5)
    joint = _our_features(ours, tiny_spec, pixels, grid)
    first = _our_features(ours, tiny_spec, pixels[:24], grid[:1])
    second = _our_features(ours, tiny_spec, pixels[24:], grid[1:])
    # Masked keys still change the fp32 reduction order, so equality holds to rounding only.
    err = (joint - torch.cat([first, second])).abs().max().item()
    print(f"joint vs one item at a time: max abs {err:.2e}")
    assert tiny_spec.tolerances.reference is not None
    assert err <= tiny_spec.tolerances.reference.max_abs, err


def test_state_dict_keys_are_the_checkpoint_keys(tiny_spec: M3Spec) -> None:
    """§6.1 key set, relative to the VL root, and the checkpoint shapes."""
    v, mm, text = tiny_spec.vision, tiny_spec.multimodal, tiny_spec.text
    assert v is not None and mm is not None
    d, i, ph = v.hidden_size, v.intermediate_size, mm.projector_hidden_size
    want = {
        "vision_tower.vision_model.embeddings.patch_embedding.weight": (d, 3, 2, 14, 14),
        "vision_tower.vision_model.pre_layrnorm.weight": (d,),
        "vision_tower.vision_model.pre_layrnorm.bias": (d,),
        "multi_modal_projector.linear_1.weight": (ph, d),
        "multi_modal_projector.linear_1.bias": (ph,),
        "multi_modal_projector.linear_2.weight": (text.hidden_size, ph),
        "multi_modal_projector.linear_2.bias": (text.hidden_size,),
        "patch_merge_mlp.linear_1.weight": (ph, 4 * text.hidden_size),
        "patch_merge_mlp.linear_1.bias": (ph,),
        "patch_merge_mlp.linear_2.weight": (text.hidden_size, ph),
        "patch_merge_mlp.linear_2.bias": (text.hidden_size,),
    }
    for layer in range(v.num_hidden_layers):
        p = f"vision_tower.vision_model.encoder.layers.{layer}."
        for norm in ("layer_norm1", "layer_norm2"):
            want |= {f"{p}{norm}.weight": (d,), f"{p}{norm}.bias": (d,)}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            want |= {f"{p}self_attn.{proj}.weight": (d, d), f"{p}self_attn.{proj}.bias": (d,)}
        want |= {f"{p}mlp.fc1.weight": (i, d), f"{p}mlp.fc1.bias": (i,)}
        want |= {f"{p}mlp.fc2.weight": (d, i), f"{p}mlp.fc2.bias": (d,)}
    got = {k: tuple(t.shape) for k, t in M3VisionTower.from_spec(tiny_spec).state_dict().items()}
    assert got == want
    assert not any(re.search("post_layernorm", k) for k in got)  # §4.2.4


def test_positions_and_rope_match_transformers(models, tiny_spec: M3Spec) -> None:
    """Merge-window order and cos/sin bit-identical to HF for grids within one segment."""
    _, (hf_vision, _) = models
    grid = [[1, 4, 6], [3, 2, 8]]
    segments = segment_grid_thw(validate_grid_thw(grid, 2), 4)
    pos = vision_position_ids(segments, 2)
    assert torch.equal(pos, get_vision_position_ids(torch.tensor(grid), 2, include_temporal=True))
    assert tiny_spec.vision is not None
    cos, sin = vision_rope_cos_sin(pos, tiny_spec.vision.head_dim, tiny_spec.vision.rope_theta)
    hf_cos, hf_sin = hf_vision.rotary_emb(torch.zeros(1), pos)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


def test_merge_window_order() -> None:
    """§4.1: windows row-major, (0,0), (0,1), (1,0), (1,1) inside a window."""
    pos = vision_position_ids([(1, 2, 4)], 2)
    assert pos[:, 1:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]


def test_rope_layout_for_the_real_head_dim() -> None:
    """head_dim 80: 13 frequencies per axis, 78 rotated channels, NeoX halves, 2 pass through (§4.3)."""
    assert vision_rope_axis_dim(80) == 26
    cos, sin = vision_rope_cos_sin(torch.tensor([[1, 2, 3]]), head_dim=80, theta=10000.0)
    assert cos.shape == (1, 78)
    f = 10000.0 ** (-torch.arange(0, 26, 2, dtype=torch.float64) / 26)
    angles = torch.cat([1 * f, 2 * f, 3 * f])
    torch.testing.assert_close(cos[0].double(), torch.cat([angles, angles]).cos(), rtol=0, atol=1e-6)
    x = torch.randn(1, 1, 1, 80, generator=torch.Generator().manual_seed(0))
    y = apply_vision_rope(x, cos, sin)[0, 0, 0].double()
    xd, a = x[0, 0, 0].double(), angles
    torch.testing.assert_close(y[:39], xd[:39] * a.cos() - xd[39:78] * a.sin(), rtol=0, atol=1e-5)
    torch.testing.assert_close(y[39:78], xd[39:78] * a.cos() + xd[:39] * a.sin(), rtol=0, atol=1e-5)
    assert torch.equal(y[78:], xd[78:])


def test_long_video_segments_restart_time(tiny_spec: M3Spec) -> None:
    assert tiny_spec.vision is not None
    vi = build_vision_inputs([[6, 2, 2]], tiny_spec.vision, num_patches=24)
    assert vi.segment_grid_thw == ((4, 2, 2), (2, 2, 2))
    assert vi.segment_ids.tolist() == [0] * 16 + [1] * 8
    assert vi.position_ids[:, 0].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [0] * 4 + [1] * 4
    assert vi.num_tokens == (6,)


@pytest.mark.parametrize(
    ("grid", "num_patches", "match"),
    [
        ([[1, 3, 4]], None, "divisible by the spatial merge size"),
        ([[1, 4, 5]], None, "divisible by the spatial merge size"),
        ([[0, 4, 4]], None, "positive"),
        ([[1, -2, 4]], None, "positive"),
        ([[1, 4, 4]], 15, "16 patches"),
        ([[1, 4]], None, "three integers"),
        ([[1.0, 4, 4]], None, "three integers"),
        ([], None, "empty"),
        (torch.tensor([1, 4, 4]), None, "three integers"),
    ],
)
def test_bad_grids_raise_input_error(grid, num_patches: int | None, match: str, tiny_spec: M3Spec) -> None:
    assert tiny_spec.vision is not None
    with pytest.raises(InputError, match=match):
        build_vision_inputs(grid, tiny_spec.vision, num_patches=num_patches)


def test_exports_with_a_dynamic_patch_count(models, tiny_spec: M3Spec) -> None:
    """No data-dependent control flow: one export serves any grid with whole merge windows."""
    ours, _ = models
    vision = tiny_spec.vision
    assert vision is not None

    def inputs(grid: list[list[int]]) -> tuple[torch.Tensor, ...]:
        vi = build_vision_inputs(grid, vision)
        return (_pixels(grid, seed=7), vi.rope_cos, vi.rope_sin, vi.segment_ids)

    windows = torch.export.Dim("windows", min=1, max=1 << 20)
    dynamic = tuple({0: 4 * windows} for _ in range(4))
    program = torch.export.export(ours, inputs([[1, 4, 6], [2, 2, 2]]), dynamic_shapes=dynamic, strict=False)
    other = inputs([[5, 4, 2], [1, 2, 10]])
    with torch.no_grad():
        err = (program.module()(*other) - ours(*other)).abs().max().item()
    assert err <= 1e-6, err
