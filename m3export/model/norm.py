"""Gemma RMSNorm (m3-architecture.md §2.2): y = x · rsqrt(mean(x²) + eps) · (1 + w), in fp32."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GemmaRMSNorm(nn.Module):
    """RMSNorm over the last dim with a zero-centred weight; computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        # Zero-centred: the effective scale is (1 + weight), so zeros mean identity scale (§7).
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
