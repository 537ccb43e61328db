"""Dense SwiGLU-OAI MLP, shared expert and the routed MoE block (m3-architecture.md §2.5-2.6).

Routed experts run through the `m3::moe` custom op (m3export/ops/moe.py) on flattened tokens, so
export sees one node per MoE layer; the router weight, correction bias and stacked expert weights
are passed to it as they are stored here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import m3export.ops.moe  # noqa: F401  (registers torch.ops.m3.moe)
from m3export.ops.moe import swiglu_oai
from m3export.spec.export import PrecisionSpec
from m3export.spec.models import TextSpec


@dataclass(frozen=True)
class MoEConfig:
    """The `m3::moe` op's routing and activation constants (§2.5-2.6)."""

    top_k: int
    routed_scaling_factor: float
    swiglu_alpha: float
    swiglu_beta: float
    swiglu_limit: float


def build_moe_config(text: TextSpec) -> MoEConfig:
    """Routing/activation constants of the text spec, in the op's argument order."""
    return MoEConfig(
        top_k=text.num_experts_per_tok,
        routed_scaling_factor=text.routed_scaling_factor,
        swiglu_alpha=text.swiglu_alpha,
        swiglu_beta=text.swiglu_beta,
        swiglu_limit=text.swiglu_limit,
    )


class SwiGLUMLP(nn.Module):
    """y = down(SwiGLU-OAI(gate(x), up(x))), no biases: the dense MLP and the shared expert (§2.5)."""

    def __init__(self, hidden: int, inter: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.cfg = cfg

    def forward(self, x: Tensor) -> Tensor:
        c = self.cfg
        act = swiglu_oai(self.gate_proj(x), self.up_proj(x), c.swiglu_alpha, c.swiglu_beta, c.swiglu_limit)
        return self.down_proj(act)


class Router(nn.Module):
    """Holds the router weight [E, H] (`gate.weight`); the routing maths lives in the op (§2.6)."""

    def __init__(self, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))


class StackedExperts(nn.Module):
    """Routed expert weights, output-major: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, hidden: int, inter: int, num_experts: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))


class SparseMoeBlock(nn.Module):
    """Sigmoid+bias top-k routed experts plus one shared expert (§2.6). Module name: `block_sparse_moe`."""

    e_score_correction_bias: Tensor

    def __init__(self, text: TextSpec) -> None:
        super().__init__()
        h, e = text.hidden_size, text.num_local_experts
        self.hidden_size = h
        self.cfg = build_moe_config(text)
        self.gate = Router(h, e)
        # Selection-only bias, kept in fp32 whatever the model dtype (§2.7, §7).
        self.register_buffer("e_score_correction_bias", torch.zeros(e, dtype=torch.float32), persistent=True)
        self.experts = StackedExperts(h, text.intermediate_size, e)
        self.shared_experts = SwiGLUMLP(h, text.shared_intermediate_size * text.n_shared_experts, self.cfg)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Keep the selection-sensitive router weight and correction bias in fp32 through any
        # `.to(dtype)` / `.bfloat16()` of the model (§2.6-2.7: routing runs in fp32; Megatron and
        # the BF16 release keep the router in fp32).
        # A dtype cast leaves them untouched (their fp32 values exact, not rounded through the new dtype);
        # device moves (meta, to_empty) apply as usual.
        before_all = [self.gate.weight.data, self.e_score_correction_bias.data]
        super()._apply(fn, recurse)
        for before, t in zip(before_all, (self.gate.weight, self.e_score_correction_bias), strict=True):
            if t.is_floating_point() and t.dtype != torch.float32:
                same_place = before.dtype == torch.float32 and before.device == t.device
                t.data = before if same_place and not before.is_meta else t.data.float()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """x [B, S, H] (post-attention-normed) -> [B, S, H]."""
        flat = x.reshape(-1, x.shape[-1])
        c = self.cfg
        routed = torch.ops.m3.moe(
            flat,
            self.gate.weight,
            self.e_score_correction_bias,
            self.experts.gate_up_proj,
            self.experts.down_proj,
            c.top_k,
            c.routed_scaling_factor,
            c.swiglu_alpha,
            c.swiglu_beta,
            c.swiglu_limit,
        )
        return (routed + self.shared_experts(flat)).view_as(x)


@torch.no_grad()
def quantise_experts(module: nn.Module, precision: PrecisionSpec) -> None:
    """Replace every routed expert weight under `module` by its int8 / int4 block-quantised and
    dequantised value (m3export/ops/quant.py): the eager reference of the `QMoE` graphs, so parity
    separates the quantisation (step `precision`, against the fp32 model) from the lowering (every
    other step). The shared expert, dense MLPs, attention and router are not quantised."""
    if precision.experts == "same":
        return
    from m3export.ops.quant import BITS, fake_quantize

    bits, block = BITS[precision.experts], precision.block_size
    for sub in module.modules():
        if isinstance(sub, StackedExperts):
            for p in (sub.gate_up_proj, sub.down_proj):
                if p.is_meta:  # not materialised: quantised when it is (model/factory.py Weights)
                    continue
                native = p.dtype in (torch.float32, torch.float16)
                w = p.detach().cpu() if native else p.detach().float().cpu()
                p.copy_(torch.from_numpy(fake_quantize(w.numpy(), bits, block)).to(p.dtype))
