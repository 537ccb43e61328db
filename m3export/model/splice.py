"""Writing vision features into text embeddings at placeholder positions (m3-architecture.md §4.5)."""

from __future__ import annotations

import torch
from torch import Tensor


def splice_features(embeds: Tensor, input_ids: Tensor, features: Tensor, token_id: int) -> Tensor:
    """Replace the rows of embeds [B, S, H] where input_ids == token_id by features [N, H], in
    flattened (batch-major, then sequence) order. Graph-friendly: no host sync, no count check —
    callers validate the count first (`check_placeholder_count`)."""
    mask = (input_ids == token_id).reshape(-1)
    flat = embeds.reshape(-1, embeds.shape[-1])
    idx = torch.nonzero(mask).reshape(-1)
    out = flat.index_put((idx,), features.to(embeds.dtype))
    return out.reshape(embeds.shape)


def count_placeholders(input_ids: Tensor, token_id: int) -> int:
    return int((input_ids == token_id).sum())
