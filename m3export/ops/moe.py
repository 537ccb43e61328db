"""`m3::moe`: M3's routed-expert computation as one torch.library custom op.

One op, several lowerings (ONNX Runtime contrib MoE, portable ONNX, TensorRT plugin): the eager
implementation here is the definition every lowering is checked against.

Maths (m3-architecture.md §2.5-2.6):
  r = x · W_gᵀ (fp32); s = sigmoid(r)
  I = top-k of (s + b)                      -- the correction bias affects selection only
  w_e = s_e / Σ_{e'∈I} s_{e'} · routed_scaling_factor
  y = Σ_{e∈I} w_e · W2_e · SwiGLU-OAI(W1_e x, W3_e x)
  SwiGLU-OAI(g, u) = min(g, L) · sigmoid(α · min(g, L)) · (clamp(u, -L, L) + β)

Weight layout (output-major, like nn.Linear.weight and ORT's MoE):
  gate_up_proj [E, 2I, H]: rows 0..I-1 are the gate (w1), rows I..2I-1 are up (w3) — concatenated,
  not interleaved (§2.5). down_proj [E, H, I] (w2).
The shared expert is not part of this op; it is a plain dense MLP.
"""

from __future__ import annotations

import torch
from torch import Tensor


def route(
    hidden: Tensor, router_weight: Tensor, correction_bias: Tensor, top_k: int, routed_scaling_factor: float
) -> tuple[Tensor, Tensor]:
    """Routing of §2.6 in fp32: returns (weights [T, k] fp32, expert indices [T, k] int64)."""
    logits = hidden.float() @ router_weight.float().t()
    scores = torch.sigmoid(logits)
    _, idx = torch.topk(scores + correction_bias.float(), top_k, dim=-1)
    chosen = scores.gather(-1, idx)
    weights = chosen / chosen.sum(dim=-1, keepdim=True) * routed_scaling_factor
    return weights, idx


def swiglu_oai(gate: Tensor, up: Tensor, alpha: float, beta: float, limit: float) -> Tensor:
    """SwiGLU-OAI (§2.5), computed in fp32 and cast back to the input dtype."""
    g = gate.float().clamp(max=limit)
    u = up.float().clamp(min=-limit, max=limit)
    return (g * torch.sigmoid(alpha * g) * (u + beta)).to(gate.dtype)


@torch.library.custom_op("m3::moe", mutates_args=())
def moe(
    hidden: Tensor,
    router_weight: Tensor,
    correction_bias: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    top_k: int,
    routed_scaling_factor: float,
    swiglu_alpha: float,
    swiglu_beta: float,
    swiglu_limit: float,
) -> Tensor:
    """Routed experts for hidden [T, H]; returns [T, H] in hidden's dtype."""
    weights, idx = route(hidden, router_weight, correction_bias, top_k, routed_scaling_factor)
    inter = down_proj.shape[-1]
    # Eager only: sort the (token, slot) pairs by expert once and run both expert GEMMs as grouped
    # GEMMs over the sorted rows. Export never traces this body; it sees one `m3::moe` node (the
    # fake below) that each lowering replaces.
    order = torch.argsort(idx.reshape(-1), stable=True)
    counts = torch.bincount(idx.reshape(-1), minlength=gate_up_proj.shape[0])
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tok = order // top_k
    gu = torch._grouped_mm(hidden[tok], gate_up_proj.transpose(1, 2), offs=offs)
    act = swiglu_oai(gu[:, :inter], gu[:, inter:], swiglu_alpha, swiglu_beta, swiglu_limit)
    y = torch._grouped_mm(act, down_proj.transpose(1, 2), offs=offs)
    out = torch.zeros_like(hidden, dtype=torch.float32)
    out.index_add_(0, tok, y.float() * weights.reshape(-1)[order, None])
    return out.to(hidden.dtype)


@moe.register_fake
def _moe_fake(
    hidden: Tensor,
    router_weight: Tensor,
    correction_bias: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    top_k: int,
    routed_scaling_factor: float,
    swiglu_alpha: float,
    swiglu_beta: float,
    swiglu_limit: float,
) -> Tensor:
    torch._check(hidden.dim() == 2)
    torch._check(gate_up_proj.shape[1] == 2 * down_proj.shape[2])
    return hidden.new_empty(hidden.shape)
