"""MXFP8 weights (m3-architecture.md §6.2): e4m3 values with one e8m0 exponent per (row, 32 columns).

w = fp8(w) · 2^(s − 127), the scale repeated ×32 along the input dim and trimmed. The product is
computed in fp32, where it is exact for every e4m3 value and s ≤ 247 (a power-of-two scaling of a
3-bit mantissa neither rounds nor, down to 2^-136, underflows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MXFP8_BLOCK = 32
E4M3_MAX = 448.0


def _blocks(w: Tensor) -> tuple[Tensor, int]:
    """w [out, in] as fp32 [out, ⌈in/32⌉, 32], zero-padded at the end of each row; returns (blocks, in)."""
    n = w.shape[-1]
    nb = -(-n // MXFP8_BLOCK)
    wf = F.pad(w.float(), (0, nb * MXFP8_BLOCK - n))
    return wf.view(w.shape[0], nb, MXFP8_BLOCK), n


def dequantize_mxfp8(w: Tensor, scale_inv: Tensor) -> Tensor:
    """fp8 e4m3 w [out, in] and uint8 e8m0 scale_inv [out, ⌈in/32⌉] -> fp32 [out, in]."""
    if scale_inv.dtype != torch.uint8:  # float8_e8m0fnu holds the same bits
        scale_inv = scale_inv.view(torch.uint8)
    blocks, n = _blocks(w)
    factor = torch.exp2(scale_inv.float() - 127.0)
    return (blocks * factor[..., None]).flatten(1)[:, :n]


def quantize_mxfp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [out, in] -> (e4m3 [out, in], uint8 e8m0 [out, ⌈in/32⌉]).

    Each block gets the smallest power of two 2^k with amax / 2^k <= 448, so nothing saturates and
    the error is e4m3 rounding alone: |w − w'| <= max(2^-4·|w|, 2^-10·2^k) (3 mantissa bits; 2^-9 is
    the smallest e4m3 subnormal).
    """
    blocks, n = _blocks(w)
    amax = blocks.abs().amax(-1)
    mant, exp = torch.frexp(amax / E4M3_MAX)  # amax/448 = mant · 2^exp, mant in [0.5, 1)
    k = torch.where(mant == 0.5, exp - 1, exp)  # ceil(log2(amax/448)), exact
    k = torch.where(amax > 0, k, torch.zeros_like(k)).clamp(-127, 127)
    q = (blocks / torch.exp2(k.float())[..., None]).flatten(1)[:, :n]
    return q.to(torch.float8_e4m3fn).contiguous(), (k + 127).to(torch.uint8)


def mxfp8_error_bound(w: Tensor, scale_inv: Tensor) -> Tensor:
    """Elementwise bound on |w − dequantize(quantize(w))| for scales from `quantize_mxfp8`."""
    step = torch.exp2(scale_inv.float() - 127.0).repeat_interleave(MXFP8_BLOCK, dim=-1)[:, : w.shape[-1]]
    return torch.maximum(w.float().abs() * 2.0**-4, step * 2.0**-10)
