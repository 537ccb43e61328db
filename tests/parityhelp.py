"""Logit comparison helpers for the oracle parity tests (float64 metrics, spec tolerances)."""

from __future__ import annotations

from typing import Any

import torch

from m3export.model.attention import M3Attention
from m3export.spec import Tolerance


def stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """max abs error, minimum per-row cosine and top-1 agreement over the last axis."""
    a, b = a.double().flatten(0, -2), b.double().flatten(0, -2)
    return {
        "max_abs": (a - b).abs().max().item(),
        "cosine": torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item(),
        "top1": (a.argmax(-1) == b.argmax(-1)).double().mean().item(),
    }


def assert_within(a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> dict[str, float]:
    s = stats(a, b)
    assert s["max_abs"] <= tol.max_abs, s
    assert tol.min_cosine is None or s["cosine"] >= tol.min_cosine, s
    assert tol.min_top1_agreement is None or s["top1"] >= tol.min_top1_agreement, s
    return s


def dropped_pairs(model: torch.nn.Module, *args: Any, **kwargs: Any) -> list[int]:
    """Per sparse attention (MTP block included): causal (query, key, head) pairs that MSA selection
    removed during `model(*args, **kwargs)` — > 0 proves the comparison covers dropped blocks."""
    counts: list[int] = []

    def hook(mod: M3Attention, hook_args: tuple[torch.Tensor, ...]) -> None:
        x, cos, sin, pos, causal, past = hook_args
        keep, _ = mod.msa_keep(x, cos, sin, pos, None if past is None else past.index_key)
        counts.append(int((causal & ~keep).sum()))

    handles = [
        m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, M3Attention) and m.sparse
    ]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return counts


def dense_causal_msa(self: M3Attention, q, k, v, x, cos, sin, pos, past):  # type: ignore[no-untyped-def]
    """A mutation for `M3Attention.msa_attention`: plain causal attention on the MSA layers (no block
    selection), the index keys still cached."""
    from m3export.model.attention import causal_keep, masked_attention

    _, _, idx_k = self.msa_select(x, cos, sin, pos, past)
    return masked_attention(q, k, v, causal_keep(pos, k.shape[2])), idx_k
