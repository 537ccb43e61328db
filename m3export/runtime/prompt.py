"""A prompt as every command takes it: token ids parsed and checked against the vocabulary and the
context, images and videos preprocessed (m3export/runtime/media.py) with one placeholder per item
expanded to its feature tokens, and the graph inputs of the result (ids, positions, vision inputs)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from m3export.errors import InputError
from m3export.model.vision_inputs import build_vision_inputs
from m3export.runtime import media
from m3export.runtime.media import PixelInputs, expand_image_placeholders, expand_video_placeholders
from m3export.spec import M3Spec


def parse_token_ids(text: str) -> list[int]:
    """'1, 2,3' -> [1, 2, 3]; anything else is an InputError naming the bad entry."""
    ids = []
    for part in text.split(","):
        try:
            ids.append(int(part.strip()))
        except ValueError:
            raise InputError(
                f"--input-ids must be comma-separated integers like '1,2,3', got entry {part.strip()!r}"
            ) from None
    return ids


@dataclass(frozen=True)
class Prompt:
    """Expanded token ids and the preprocessed images / videos (all videos in one PixelInputs)."""

    ids: list[int]
    images: PixelInputs | None = None
    videos: PixelInputs | None = None


VIDEO_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def video_frames(path: str | os.PathLike) -> list[Path]:
    """A video given as a directory of already-sampled frames, in file-name order."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"--video {root}: not a directory (give a directory of frame images)")
    frames = sorted(p for p in root.iterdir() if p.suffix.lower() in VIDEO_FRAME_SUFFIXES)
    if not frames:
        raise InputError(f"--video {root}: no frame images ({', '.join(VIDEO_FRAME_SUFFIXES)})")
    return frames


def prepare_prompt(
    spec: M3Spec,
    token_ids: Sequence[int],
    images: Sequence[str | os.PathLike],
    videos: Sequence[str | os.PathLike] = (),
) -> Prompt:
    """Validate ids against the vocabulary, preprocess the images (§4.7) and videos (§4.6) and expand
    one image / video placeholder per item into its feature tokens. Shared by `model forward`, `run`
    and `generate`."""

    vocab = spec.text.vocab_size
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    ids = list(token_ids)
    if not images and not videos:
        check_prompt_length(spec, len(ids))
        return Prompt(ids)
    if spec.vision is None or spec.multimodal is None:
        raise InputError(f"spec {spec.name!r} is text-only (no vision section): it takes no images or videos")

    # Before decoding anything: the expanded length from the files' headers (2,000 large frames must
    # be refused here, not decoded at full size first).
    frames = [video_frames(v) for v in videos]
    expected = len(ids) - len(images) - len(videos) + media.media_tokens(images, frames, spec.vision)
    check_prompt_length(spec, expected)
    merge, mm = spec.vision.spatial_merge_size, spec.multimodal
    px = media.preprocess_images(images, spec.vision) if images else None
    if px is not None:
        ids = expand_image_placeholders(ids, mm.image_token_index, px.grid_thw, merge_size=merge)
    pv = None
    if videos:
        each = [media.preprocess_video(f, spec.vision) for f in frames]
        pv = PixelInputs(torch.cat([v.pixel_values for v in each]), torch.cat([v.grid_thw for v in each]))
        ids = expand_video_placeholders(ids, mm.video_token_index, pv.grid_thw, merge_size=merge)
    check_prompt_length(spec, len(ids))
    return Prompt(ids, px, pv)


def check_prompt_length(spec: M3Spec, length: int) -> None:
    """InputError when a prompt (media expanded) is longer than the spec's context."""
    limit = spec.text.max_position_embeddings
    if length > limit:
        raise InputError(
            f"the prompt has {length} tokens (images and videos expanded); the spec's maximum length "
            f"(text.max_position_embeddings) is {limit}"
        )


def prepare_inputs(
    spec: M3Spec,
    input_ids: str,
    images: Sequence[str | os.PathLike] = (),
    videos: Sequence[str | os.PathLike] = (),
) -> tuple[dict[str, Tensor], int]:
    """Graph inputs of one prompt (batch 1): input_ids, position_ids and the vision inputs of its images
    (`pixel_values`, `vision_cos`, ...) and videos (`pixel_values_videos`, `video_cos`, ...).

    Ids, images and videos are handled as `m3export model forward` handles them (same parser,
    preprocessing and placeholder expansion).
    """

    prompt = prepare_prompt(spec, parse_token_ids(input_ids), images, videos)
    inp: dict[str, Tensor] = {}
    for px, prefix, names in (
        (prompt.images, "image", ("pixel_values", "vision_cos", "vision_sin", "vision_segment_ids")),
        (prompt.videos, "video", ("pixel_values_videos", "video_cos", "video_sin", "video_segment_ids")),
    ):
        token = getattr(spec.multimodal, f"{prefix}_token_index", None)
        if px is None:
            if token is not None and token in prompt.ids:
                raise InputError(
                    f"--input-ids hold the {prefix} token id {token} but no --{prefix} was given"
                )
            continue
        assert spec.vision is not None
        vi = build_vision_inputs(px.grid_thw, spec.vision, num_patches=px.pixel_values.shape[0])
        values = (
            px.pixel_values.to(getattr(torch, spec.graph_dtype)),
            vi.rope_cos,
            vi.rope_sin,
            vi.segment_ids,
        )
        inp.update(zip(names, values, strict=True))
    if not prompt.ids:
        raise InputError("--input-ids is empty")
    inp["input_ids"] = torch.tensor([prompt.ids], dtype=torch.int64)
    inp["position_ids"] = torch.arange(len(prompt.ids), dtype=torch.int64)[None, :]
    return inp, len(images)
