"""Writing vision features into text embeddings at placeholder positions (m3-architecture.md §4.5)."""

from __future__ import annotations

import torch
from torch import Tensor


def splice_features(embeds: Tensor, input_ids: Tensor, features: Tensor, token_id: int) -> Tensor:
    """embeds [B, S, H] with the k-th placeholder (input_ids == token_id, flattened batch-major order)
    replaced by features[k] for k < N = len(features); placeholders beyond N keep their embedding.

    With N equal to the placeholder count (a prompt; callers check it, `check_placeholder_count`) every
    placeholder takes its feature. With N = 0 (a decode step, or a generated token that happens to be the
    placeholder id) the token is embedded like any other, as transformers does when no pixels are given.
    Static-shape ops only (CumSum, Gather, Where): no NonZero / ScatterND, which TensorRT's parser
    imports only through a plugin the pip wheels lack (export-notes §1). The running count is summed in
    fp32 (TensorRT's CumSum takes floating inputs only): exact while a call holds fewer than 2**24
    positions (`MAX_SPLICE_POSITIONS`), which the spec's context bound and batch-1 prompts guarantee.
    """
    b, s, h = embeds.shape
    flat = embeds.reshape(-1, h)
    mask = (input_ids == token_id).reshape(-1)
    index = torch.cumsum(mask.to(torch.float32), 0).to(torch.int64) - 1  # the feature each placeholder takes
    n = features.shape[0]
    take = mask & (index < n)
    padded = torch.cat((features.to(embeds.dtype), flat.new_zeros(1, h)))  # row n: never taken
    gathered = padded.index_select(0, torch.where(take, index, torch.full_like(index, n)))
    return torch.where(take[:, None], gathered, flat).reshape(b, s, h)


MAX_SPLICE_POSITIONS = 1 << 24  # fp32 holds every integer count below this exactly


def count_placeholders(input_ids: Tensor, token_id: int) -> int:
    return int((input_ids == token_id).sum())
