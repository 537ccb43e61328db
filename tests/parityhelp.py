"""Logit comparison helpers for the oracle parity tests (float64 metrics, spec tolerances)."""

from __future__ import annotations

import torch

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
