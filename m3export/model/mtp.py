"""Multi-token prediction depths (m3-architecture.md §3.1-3.2, NeMo AutoModel semantics).

Per depth d: ids_d = ids shifted left by d+1 (cumulative, 0-filled); x = eh_proj([enorm(embed(ids_d));
hnorm(h_d)]); x = transformer_layer(x) (MoE + MSA, same positions and masks); h_{d+1} =
final_layernorm(x); logits_d = lm_head(h_{d+1}). h_0 is the main model's post-final-norm hidden.
The embedding and lm_head are the main model's (shared). This module does not import the decoder
layer: the caller builds it and passes it in, which keeps text.py -> mtp.py one-way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3export.model.norm import GemmaRMSNorm

LayerFn = Callable[[int, nn.Module, Tensor], Tensor]  # (depth, decoder layer, x) -> layer output


class MTPDepth(nn.Module):
    """One MTP depth: `enorm`, `hnorm`, `eh_proj` (2H -> H), `transformer_layer`, `final_layernorm` (§3.1)."""

    def __init__(self, hidden: int, eps: float, transformer_layer: nn.Module) -> None:
        super().__init__()
        self.enorm = GemmaRMSNorm(hidden, eps)
        self.hnorm = GemmaRMSNorm(hidden, eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.transformer_layer = transformer_layer
        self.final_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(
        self, emb: Tensor, hidden: Tensor, run_layer: Callable[[nn.Module, Tensor], Tensor]
    ) -> Tensor:
        """emb, hidden [B, S, H] -> h_{d+1} [B, S, H]; `run_layer(layer, x)` applies the decoder layer."""
        # Embedding first, then the hidden state (§3.1).
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(hidden)), dim=-1))
        return self.final_layernorm(run_layer(self.transformer_layer, x))


class MTP(nn.Module):
    """The stack of MTP depths; lives at `model.mtp` so depth d is `model.mtp.layers.{d}`."""

    def __init__(self, depths: list[MTPDepth]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(depths)


def shift_left(ids: Tensor) -> Tensor:
    """ids [B, S] shifted left by one, the vacated last slot filled with token 0 (§3.2)."""
    return F.pad(ids[:, 1:], (0, 1), value=0)


def mtp_forward(
    mtp: MTP,
    hidden: Tensor,
    ids: Tensor,
    embed: nn.Module,
    lm_head: nn.Module,
    run_layer: LayerFn,
) -> list[Tensor]:
    """Per-depth logits [B, S, V] (§3.2) from the main model's post-norm hidden [B, S, H].

    `ids` [B, S + D - 1] are input_ids shifted left by one, extended by the D - 1 tokens after the
    sequence (0 in training): depth d embeds ids[:, d : d + S], i.e. input_ids shifted by d + 1.
    """
    logits: list[Tensor] = []
    h, seq = hidden, hidden.shape[1]
    for d, depth in enumerate(mtp.layers):
        h = depth(embed(ids[:, d : d + seq]), h, lambda layer, x, d=d: run_layer(d, layer, x))
        logits.append(lm_head(h))
    return logits
