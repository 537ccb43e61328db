"""One eager forward of a prompt (`m3export model forward`): token ids + image files -> logits.

The user writes the image placeholder id (`multimodal.image_token_index`) once per image; each is
expanded here to the image's t·h·w/merge² feature tokens (`preprocess.expand_image_placeholders`).
Start/end-of-image tokens are tokenizer ids this package does not know; put them in the ids if wanted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from m3export.errors import InputError
from m3export.preprocess import PixelInputs
from m3export.spec import M3Spec


@dataclass(frozen=True)
class ForwardResult:
    """logits [1, S, V] float32, S counting every expanded image token; the number of images."""

    logits: Tensor
    num_images: int
    logits_path: Path | None = None

    @property
    def top1_last(self) -> int:
        """Arg-max token at the last position."""
        return int(self.logits[0, -1].argmax())


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


def load_model(spec: M3Spec) -> nn.Module:
    """The eager model the spec describes: VL or text-only, random weights or its checkpoint."""
    from m3export.model.text import M3ForCausalLM
    from m3export.model.vl import M3ForConditionalGeneration

    cls = M3ForConditionalGeneration if spec.is_vl else M3ForCausalLM
    if spec.weights.checkpoint is not None:
        return cls.from_pretrained(spec)
    return cls.from_config(spec)


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
    from m3export.preprocess import (
        expand_image_placeholders,
        expand_video_placeholders,
        preprocess_images,
        preprocess_video,
    )

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
    from m3export.preprocess import media_tokens

    # Before decoding anything: the expanded length from the files' headers (2,000 large frames must
    # be refused here, not decoded at full size first).
    frames = [video_frames(v) for v in videos]
    expected = len(ids) - len(images) - len(videos) + media_tokens(images, frames, spec.vision)
    check_prompt_length(spec, expected)
    merge, mm = spec.vision.spatial_merge_size, spec.multimodal
    px = preprocess_images(images, spec.vision) if images else None
    if px is not None:
        ids = expand_image_placeholders(ids, mm.image_token_index, px.grid_thw, merge_size=merge)
    pv = None
    if videos:
        each = [preprocess_video(f, spec.vision) for f in frames]
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


def forward_prompt(
    spec: M3Spec,
    token_ids: Sequence[int],
    images: Sequence[str | os.PathLike],
    model: nn.Module | None = None,
    videos: Sequence[str | os.PathLike] = (),
) -> ForwardResult:
    """Expand one placeholder per image / video, preprocess them (§4.6-4.7) and run the eager model."""
    prompt = prepare_prompt(spec, token_ids, images, videos)
    if model is None:
        from m3export.memory import forward_memory_bytes, require_memory

        require_memory(
            forward_memory_bytes(spec, len(prompt.ids)), f"model forward of {len(prompt.ids)} tokens"
        )
        model = load_model(spec)
    kwargs: dict[str, Tensor] = {}
    if prompt.images is not None:
        kwargs |= {"pixel_values": prompt.images.pixel_values, "image_grid_thw": prompt.images.grid_thw}
    if prompt.videos is not None:
        kwargs |= {
            "pixel_values_videos": prompt.videos.pixel_values,
            "video_grid_thw": prompt.videos.grid_thw,
        }
    with torch.no_grad():
        out = model(torch.tensor([prompt.ids]), **kwargs)
    return ForwardResult(out.logits.float(), len(images))


def run_forward(
    spec: M3Spec,
    input_ids: str,
    images: Sequence[str | os.PathLike] = (),
    logits_out: str | os.PathLike | None = None,
    videos: Sequence[str | os.PathLike] = (),
) -> ForwardResult:
    """The `model forward` command: parse '1,2,3' ids, run `forward_prompt`, optionally save the logits."""
    ids = parse_token_ids(input_ids)
    out = _check_logits_path(Path(logits_out)) if logits_out is not None else None  # fail before the forward
    result = forward_prompt(spec, ids, images, videos=videos)
    if out is None:
        return result
    return replace(result, logits_path=save_logits(result.logits, out))


def _check_logits_path(out: Path) -> Path:
    if out.suffix != ".npy":
        raise InputError(f"--logits-out {out}: the file name must end in .npy")
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise InputError(f"--logits-out {out}: exists and is not a regular file")
    if not out.parent.is_dir():
        raise InputError(f"--logits-out {out}: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise InputError(f"--logits-out {out}: directory {out.parent} is not writable")
    return out


def save_logits(logits: Tensor, path: str | os.PathLike) -> Path:
    """Write logits as a float32 .npy file (atomically: a temp file, then rename; no temp file is
    left behind when the write fails)."""
    import tempfile

    out = _check_logits_path(Path(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as err:
        raise InputError(f"--logits-out {out}: cannot write there ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, logits.detach().cpu().numpy().astype(np.float32))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"--logits-out {out}: cannot write it ({err.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
