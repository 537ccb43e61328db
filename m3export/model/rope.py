"""Text RoPE: partial NeoX ("rotate-half") on the first `rotary_dim` channels (m3-architecture.md §2.3.3).

cos/sin are computed from `position_ids` in fp32 on every call (no cached table, no buffer), so the
same code serves prefill, decode and export with dynamic positions, and a bf16 cast of the model
cannot degrade them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_inv_freq(rotary_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """inv_freq_i = θ^(−2i/rotary_dim), i < rotary_dim/2, fp32 (§2.3.3)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    return 1.0 / (theta**exponent)


def rope_cos_sin(position_ids: Tensor, rotary_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of the angles p · inv_freq for position_ids [B, S]; each [B, S, rotary_dim/2], fp32."""
    inv_freq = rope_inv_freq(rotary_dim, theta, position_ids.device)
    angles = position_ids[..., None].float() * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2·cos.shape[-1] channels of x [B, S, N, D] (NeoX halves); the rest pass through.

    cos/sin are [B, S, R/2] and broadcast over the head axis. Computed in fp32, returned in x's dtype.
    """
    half = cos.shape[-1]
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    # §2.3.3: y_j = x_j cos a_j − x_{j+R/2} sin a_j ; y_{j+R/2} = x_{j+R/2} cos a_j + x_j sin a_j
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1)
    return rotated.to(x.dtype)
