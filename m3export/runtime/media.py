"""Host-side media preprocessing: images / video frames -> `pixel_values` + `grid_thw`, and prompt expansion.

Matches transformers' `MiniMaxM3VLImageProcessor` / `MiniMaxM3VLVideoProcessor` (5.24, torchvision
backend, default arguments) bit for bit (m3-architecture.md §4.1, §4.6, §4.7):

- convert to RGB (transparency composited onto white), keep uint8;
- resize with HF's Qwen2-VL `smart_resize` rule (see `smart_resize`), bicubic with antialiasing,
  computed by torch's native uint8 kernel exactly as torchvision does it on CPU;
- rescale 1/255 and CLIP-normalise, fused as (x − 255·mean) / (255·std) in fp32 as HF does;
- an image is one frame repeated `temporal_patch_size` times (grid_t = 1); video frames are grouped
  by `temporal_patch_size`, an incomplete last group is padded by repeating the last frame;
- patches flattened in (c, t, y, x) order, rows in merge-window order (t, h/m, w/m, m, m) (§4.1).

Decoding: files are read with Pillow (as transformers' `load_image`, EXIF orientation applied).
Video frames must already be decoded and sampled (no fps sampling here); a long video is one
`grid_thw` row here and is cut into attention segments by `model.vision_inputs` (§4.6, §10.9).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from m3export.errors import InputError
from m3export.model.vision_inputs import GridLike, validate_grid_thw
from m3export.spec.models import VisionSpec

ImageLike = str | os.PathLike | Image.Image | np.ndarray

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
# transformers' defaults (the checkpoint's `size: [672, 672]` is overridden there, §4.7, §10.10).
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 672 * 672
VIDEO_MIN_PIXELS = 56 * 56
VIDEO_MAX_PIXELS = 768 * 28 * 28
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class PixelInputs:
    """Tower input for a batch of images or one video: pixel_values [N, 3·T·P·P] fp32, grid_thw [M, 3] int64."""

    pixel_values: Tensor
    grid_thw: Tensor


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width), multiples of `factor`, area in [min_pixels, max_pixels] (Qwen2-VL, as HF).

    Chosen over sglang's box rule (round up to 28, fit in a 672×672 box) because transformers is
    the oracle we test against; the two disagree on token counts for non-square images (§4.7,
    §10.10). Each side is rounded to the nearest multiple (Python `round`, half to even); if the
    area is above max, both sides shrink by sqrt(area/max) and floor; below min, grow and ceil.
    """
    if min(height, width) <= 0:
        raise InputError(f"image size {width}x{height} must be positive")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(
            f"image {width}x{height}: aspect ratio must be <= {MAX_ASPECT_RATIO}; crop or pad the image"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    # As transformers' convert_to_rgb: transparency is composited onto white, then RGB.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.array(image.convert("RGB"))


def load_image(source: ImageLike) -> np.ndarray:
    """A path (PNG, JPEG, anything Pillow reads), PIL image or HxWx3 uint8 array -> HxWx3 uint8 RGB array."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise InputError(
                f"image array must be HxWx3 uint8 (RGB), got shape {source.shape} dtype {source.dtype}"
            )
        return source
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"image file {path} does not exist")
        try:
            with Image.open(path) as im:
                im.load()  # decode now, so a truncated or corrupt file fails here
                return _pil_to_rgb(ImageOps.exif_transpose(im))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise InputError(f"cannot read image {path}: {reason}") from None
    raise InputError(
        f"unsupported image type {type(source).__name__}: give a path, PIL image or HxWx3 uint8 array"
    )


def image_size(source: ImageLike) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the file's header without decoding it."""
    if isinstance(source, np.ndarray):
        return int(source.shape[0]), int(source.shape[1])
    if isinstance(source, Image.Image):
        return source.height, source.width
    path = Path(source)
    if not path.is_file():
        raise InputError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            w, h = im.size
            transposed = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that rotate by 90°
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"cannot read image {path}: {reason}") from None
    return (w, h) if transposed else (h, w)


def media_tokens(
    images: Sequence[ImageLike], videos: Sequence[Sequence[ImageLike]], vision: VisionSpec
) -> int:
    """Feature tokens the images and videos will expand to, from their headers only (nothing decoded):
    what a prompt's length is checked against before any pixel is loaded."""
    factor = vision.patch_size * vision.spatial_merge_size
    per_patch = vision.spatial_merge_size**2 * vision.patch_size**2
    total = 0
    for image in images:
        h, w = smart_resize(*image_size(image), factor, IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS)
        total += h * w // per_patch
    for frames in videos:
        if not frames:
            continue
        h, w = smart_resize(*image_size(frames[0]), factor, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
        total += -(-len(frames) // vision.temporal_patch_size) * (h * w // per_patch)
    return total


def _resize(frames: Tensor, height: int, width: int) -> Tensor:
    """Bicubic antialiased resize of uint8 [F, 3, H, W], bit-identical to torchvision's CPU path."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames  # torchvision returns the input unchanged
    # torchvision calls torch's native uint8 kernel for bicubic on CPU (no float round trip).
    return F.interpolate(frames, size=[height, width], mode="bicubic", align_corners=False, antialias=True)


def _normalize(frames: Tensor) -> Tensor:
    # Fused rescale + normalise exactly as transformers' torchvision backend: mean and std scaled
    # by 1/rescale_factor in fp32, then (x − mean) / std in fp32.
    mean = torch.tensor(CLIP_MEAN) * (1.0 / RESCALE_FACTOR)
    std = torch.tensor(CLIP_STD) * (1.0 / RESCALE_FACTOR)
    return (frames.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


def _patchify(frames: Tensor, vision: VisionSpec) -> tuple[Tensor, tuple[int, int, int]]:
    """fp32 [F, C, H, W] with F a multiple of T -> rows [t·h·w, C·T·P·P] in the order of §4.1."""
    p, m, tp = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    f, c, height, width = frames.shape
    gt, gh, gw = f // tp, height // p, width // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # -> (t, h/m, w/m, m_y, m_x, c, tp, p_y, p_x)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def _to_tensor(frames: Sequence[np.ndarray]) -> Tensor:
    # HxWx3 -> contiguous [F, 3, H, W] uint8, the layout torchvision resizes.
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def preprocess_images(
    images: Sequence[ImageLike],
    vision: VisionSpec,
    *,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> PixelInputs:
    """Images -> pixel_values [Σ h·w, 3·T·P·P] and grid_thw [[1, h, w], ...] (§4.1, §4.7)."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    if not images:
        raise InputError("no images given")
    factor = vision.patch_size * vision.spatial_merge_size
    rows, grids = [], []
    for image in images:
        array = load_image(image)
        h, w = smart_resize(array.shape[0], array.shape[1], factor, min_pixels, max_pixels)
        frames = _normalize(_resize(_to_tensor([array]), h, w))
        # An image is one frame repeated over the temporal patch (§4.7).
        frames = frames.expand(vision.temporal_patch_size, -1, -1, -1)
        patches, grid = _patchify(frames, vision)
        rows.append(patches)
        grids.append(grid)
    return PixelInputs(torch.cat(rows), torch.tensor(grids, dtype=torch.int64))


def preprocess_video(
    frames: Sequence[ImageLike] | np.ndarray,
    vision: VisionSpec,
    *,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
) -> PixelInputs:
    """Decoded, already-sampled frames (list, or [F, H, W, 3] uint8) -> pixel_values and one grid row (§4.6).

    grid_t = ⌈F / T⌉; the last frame is repeated to fill the last temporal patch.
    """
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        frames = list(frames)
    if len(frames) == 0:
        raise InputError("video has no frames")
    # One frame decoded at a time and resized at once (the resize is per frame, so this equals
    # resizing the stacked video): memory holds one full-size frame, not the whole video.
    first = load_image(frames[0])
    factor = vision.patch_size * vision.spatial_merge_size
    h, w = smart_resize(first.shape[0], first.shape[1], factor, min_pixels, max_pixels)
    resized = []
    for i, frame in enumerate(frames):
        array = first if i == 0 else load_image(frame)
        if array.shape != first.shape:
            raise InputError(f"all video frames must have one size, got {first.shape} and {array.shape}")
        resized.append(_resize(_to_tensor([array]), h, w))
    video = _normalize(torch.cat(resized))
    if pad := -video.shape[0] % vision.temporal_patch_size:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    patches, grid = _patchify(video, vision)
    return PixelInputs(patches, torch.tensor([grid], dtype=torch.int64))


def expand_image_placeholders(
    token_ids: Sequence[int],
    image_token_id: int,
    grid_thw: GridLike,
    *,
    merge_size: int,
    start_id: int | None = None,
    end_id: int | None = None,
) -> list[int]:
    """Replace the i-th `image_token_id` with t·h·w/merge² copies of it for grid_thw[i] (§4.5, §4.7).

    `token_ids` must hold one placeholder per image (not yet expanded). The start/end-of-image
    tokens (`]<]start of image[>[`, `]<]end of image[>[`) are tokenizer ids this package does not
    know; pass them as `start_id` / `end_id` to wrap every image as HF's processor does, or put
    them in the prompt yourself.
    """
    grids = validate_grid_thw(grid_thw, merge_size)
    blocks = [[image_token_id] * (t * h * w // merge_size**2) for t, h, w in grids]
    return _expand(token_ids, image_token_id, blocks, start_id, end_id, "image")


def expand_video_placeholders(
    token_ids: Sequence[int],
    video_token_id: int,
    grid_thw: GridLike,
    *,
    merge_size: int,
    start_id: int | None = None,
    end_id: int | None = None,
) -> list[int]:
    """Replace the i-th `video_token_id` by, per temporal patch, [start] + h·w/merge² × video_token_id + [end] (§4.6).

    One grid row per video (unsegmented, as `preprocess_video` returns). Timestamp markers
    (`]<]{s:.1f} seconds[>[`) are not emitted: they need the sampling metadata and the tokenizer.
    """
    grids = validate_grid_thw(grid_thw, merge_size)
    blocks = []
    for t, h, w in grids:
        frame = [video_token_id] * (h * w // merge_size**2)
        frame = (
            ([start_id] if start_id is not None else []) + frame + ([end_id] if end_id is not None else [])
        )
        blocks.append(frame * t)
    return _expand(token_ids, video_token_id, blocks, None, None, "video")


def _expand(
    token_ids: Sequence[int],
    token_id: int,
    blocks: list[list[int]],
    start_id: int | None,
    end_id: int | None,
    what: str,
) -> list[int]:
    found = sum(1 for tok in token_ids if tok == token_id)
    if found != len(blocks):
        raise InputError(
            f"prompt has {found} {what} placeholder(s) (id {token_id}) but grid_thw has {len(blocks)} row(s); "
            f"give one placeholder per {what}, unexpanded"
        )
    out: list[int] = []
    items = iter(blocks)
    for tok in token_ids:
        if tok != token_id:
            out.append(tok)
            continue
        if start_id is not None:
            out.append(start_id)
        out.extend(next(items))
        if end_id is not None:
            out.append(end_id)
    return out
