"""One eager forward of a prompt (`m3export model forward`): token ids + image files -> logits.

The prompt is prepared as every command prepares it (m3export/runtime/prompt.py): one placeholder
per image / video expanded to its feature tokens. Start/end-of-image tokens are tokenizer ids this
package does not know; put them in the ids if wanted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from m3export.model.factory import load_model
from m3export.runtime.outputs import check_logits_path, save_logits
from m3export.runtime.prompt import parse_token_ids, prepare_prompt
from m3export.spec import M3Spec
from m3export.spec.memory import require_memory, resident_memory_bytes


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
        require_memory(
            resident_memory_bytes(spec, len(prompt.ids)), f"model forward of {len(prompt.ids)} tokens"
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
    out = check_logits_path(Path(logits_out)) if logits_out is not None else None  # fail before the forward
    result = forward_prompt(spec, ids, images, videos=videos)
    if out is None:
        return result
    return replace(result, logits_path=save_logits(result.logits, out))
