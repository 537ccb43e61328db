"""Host-side inputs of the vision tower, computed from `grid_thw` (m3-architecture.md §4.1, §4.3, §4.6).

The merge-window patch order, the per-segment temporal restart and the segment boundaries are
data-dependent (they follow the grid of every image / video), so they are computed here, outside the
model, and fed to `M3VisionTower.forward` as plain tensors: 3-D RoPE cos/sin and per-patch segment
ids. This keeps the tower's graph free of loops over items (Appendix A, "RoPE" and "Vision").

Video segmentation follows sglang (§4.6, §10.9): a video of t temporal patches is cut into segments
of at most `vision_segment_max_frames` temporal patches; each segment attends only to itself and its
temporal RoPE position restarts at 0. Every image is one segment (§4.2.5, §10.7). transformers reaches
the same result by letting its video processor emit one `grid_thw` row per segment.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from m3export.errors import InputError
from m3export.spec.models import VisionSpec

Grid = tuple[int, int, int]
GridLike = Tensor | Sequence[Sequence[int]]


@dataclass(frozen=True)
class VisionInputs:
    """Everything the tower needs besides `pixel_values`, for N patches in the order of §4.1."""

    grid_thw: tuple[Grid, ...]  # one row per image / video, as given (unsegmented)
    segment_grid_thw: tuple[Grid, ...]  # one row per attention segment
    position_ids: Tensor  # [N, 3] int64: (t within segment, patch row, patch column)
    rope_cos: Tensor  # [N, 3·axis_dim] fp32
    rope_sin: Tensor  # [N, 3·axis_dim] fp32
    segment_ids: Tensor  # [N] int64: patches with equal ids attend to each other
    num_tokens: tuple[int, ...]  # merged text tokens per grid row: t·h·w / merge²

    @property
    def num_patches(self) -> int:
        return int(self.segment_ids.shape[0])


def validate_grid_thw(
    grid_thw: GridLike, merge_size: int, num_patches: int | None = None
) -> tuple[Grid, ...]:
    """Check `grid_thw` ([M, 3] positive ints, h and w divisible by `merge_size`); return it as int triples.

    With `num_patches` (the row count of `pixel_values`), also check that Σ t·h·w matches it.
    """
    try:
        rows = grid_thw.tolist() if isinstance(grid_thw, Tensor) else [list(r) for r in grid_thw]
    except TypeError:
        raise InputError(
            f"grid_thw must be [M, 3] integers (one [t, h, w] row per item), got {grid_thw!r}"
        ) from None
    if not rows:
        raise InputError("grid_thw is empty: give one [t, h, w] row per image or video")
    grids: list[Grid] = []
    for i, row in enumerate(rows):
        try:
            if len(row) != 3 or any(isinstance(v, bool) for v in row):
                raise TypeError
            t, h, w = (operator.index(v) for v in row)
        except TypeError:
            raise InputError(f"grid_thw[{i}] = {row!r} must be three integers [t, h, w]") from None
        if min(t, h, w) <= 0:
            raise InputError(f"grid_thw[{i}] = {row!r} must have positive entries")
        if h % merge_size or w % merge_size:
            raise InputError(
                f"grid_thw[{i}] = {row!r}: h and w (patch rows / columns) must be divisible by the "
                f"spatial merge size {merge_size}; resize the image to a multiple of {merge_size} patches"
            )
        grids.append((t, h, w))
    total = sum(t * h * w for t, h, w in grids)
    if num_patches is not None and num_patches != total:
        raise InputError(
            f"pixel_values has {num_patches} patch rows but grid_thw describes Σ t·h·w = {total} patches"
        )
    return tuple(grids)


def segment_grid_thw(grids: Sequence[Grid], max_frames: int) -> tuple[Grid, ...]:
    """Cut every row into segments of at most `max_frames` temporal patches (§4.6, sglang)."""
    return tuple((min(max_frames, t - start), h, w) for t, h, w in grids for start in range(0, t, max_frames))


def vision_position_ids(segments: Sequence[Grid], merge_size: int) -> Tensor:
    """(t, y, x) per patch [N, 3] int64, in merge-window order (§4.1), t restarting in every segment."""
    out = []
    for t, h, w in segments:
        # Patch order inside one segment: (t, h/m, w/m, m, m), §4.1.
        tt, hb, wb, hi, wi = torch.meshgrid(
            torch.arange(t),
            torch.arange(h // merge_size),
            torch.arange(w // merge_size),
            torch.arange(merge_size),
            torch.arange(merge_size),
            indexing="ij",
        )
        y = hb * merge_size + hi
        x = wb * merge_size + wi
        out.append(torch.stack([tt.flatten(), y.flatten(), x.flatten()], dim=-1))
    return torch.cat(out, dim=0)


def vision_rope_axis_dim(head_dim: int) -> int:
    """Channels per axis: 2·⌊⌊head_dim/3⌋/2⌋ (26 for head_dim 80, §4.3); 3·axis_dim are rotated."""
    return 2 * ((head_dim // 3) // 2)


def vision_rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [N, 3·axis_dim] fp32 of angles [t·f, y·f, x·f] duplicated NeoX-style (§4.3)."""
    axis_dim = vision_rope_axis_dim(head_dim)
    # inv_freq_i = θ^(−2i/axis_dim), i < axis_dim/2; one table shared by the t, y and x axes (§4.3).
    inv_freq = 1.0 / (theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim))
    angles = (position_ids[..., None].float() * inv_freq).flatten(1)  # [N, 3·axis_dim/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def vision_segment_ids(segments: Sequence[Grid]) -> Tensor:
    """Segment index per patch [N] int64 (one id per image or video segment, §4.2.5, §10.7)."""
    sizes = torch.tensor([t * h * w for t, h, w in segments])
    return torch.repeat_interleave(torch.arange(len(segments)), sizes)


def build_vision_inputs(
    grid_thw: GridLike, vision: VisionSpec, num_patches: int | None = None
) -> VisionInputs:
    """Validate `grid_thw` and compute RoPE cos/sin and segment ids for the tower (§4.3, §4.6)."""
    merge = vision.spatial_merge_size
    grids = validate_grid_thw(grid_thw, merge, num_patches)
    segments = segment_grid_thw(grids, vision.vision_segment_max_frames)
    position_ids = vision_position_ids(segments, merge)
    cos, sin = vision_rope_cos_sin(position_ids, vision.head_dim, vision.rope_theta)
    return VisionInputs(
        grid_thw=grids,
        segment_grid_thw=segments,
        position_ids=position_ids,
        rope_cos=cos,
        rope_sin=sin,
        segment_ids=vision_segment_ids(segments),
        num_tokens=tuple(t * h * w // merge**2 for t, h, w in grids),
    )
