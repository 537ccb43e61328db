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
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from m3export.errors import InputError
from m3export.spec import M3Spec

if TYPE_CHECKING:
    from m3export.preprocess import PixelInputs


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


def prepare_prompt(
    spec: M3Spec, token_ids: Sequence[int], images: Sequence[str | os.PathLike]
) -> tuple[list[int], PixelInputs | None]:
    """Validate ids against the vocabulary, preprocess the images (§4.7) and expand one image
    placeholder per image into its feature tokens. Shared by `model forward` and `run`."""
    from m3export.preprocess import expand_image_placeholders, preprocess_images

    vocab = spec.text.vocab_size
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    ids = list(token_ids)
    if not images:
        return ids, None
    if spec.vision is None or spec.multimodal is None:
        raise InputError(f"spec {spec.name!r} is text-only (no vision section): it takes no images")
    px = preprocess_images(images, spec.vision)
    ids = expand_image_placeholders(
        ids, spec.multimodal.image_token_index, px.grid_thw, merge_size=spec.vision.spatial_merge_size
    )
    return ids, px


def forward_prompt(
    spec: M3Spec,
    token_ids: Sequence[int],
    images: Sequence[str | os.PathLike],
    model: nn.Module | None = None,
) -> ForwardResult:
    """Expand one image placeholder per image, preprocess the images (§4.7) and run the eager model."""
    model = model if model is not None else load_model(spec)
    ids, px = prepare_prompt(spec, token_ids, images)
    kwargs: dict[str, Tensor] = {}
    if px is not None:
        kwargs = {"pixel_values": px.pixel_values, "image_grid_thw": px.grid_thw}
    with torch.no_grad():
        out = model(torch.tensor([ids]), **kwargs)
    return ForwardResult(out.logits.float(), len(images))


def run_forward(
    spec: M3Spec,
    input_ids: str,
    images: Sequence[str | os.PathLike] = (),
    logits_out: str | os.PathLike | None = None,
) -> ForwardResult:
    """The `model forward` command: parse '1,2,3' ids, run `forward_prompt`, optionally save the logits."""
    ids = parse_token_ids(input_ids)
    out = _check_logits_path(Path(logits_out)) if logits_out is not None else None  # fail before the forward
    result = forward_prompt(spec, ids, images)
    if out is None:
        return result
    return replace(result, logits_path=save_logits(result.logits, out))


def _check_logits_path(out: Path) -> Path:
    if out.suffix != ".npy":
        raise InputError(f"--logits-out {out}: the file name must end in .npy")
    if not out.parent.is_dir():
        raise InputError(f"--logits-out {out}: directory {out.parent} does not exist")
    return out


def save_logits(logits: Tensor, path: str | os.PathLike) -> Path:
    """Write logits as a float32 .npy file (atomically: a temp file, then rename)."""
    out = _check_logits_path(Path(path))
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, logits.detach().cpu().numpy().astype(np.float32))
    tmp.replace(out)
    return out
