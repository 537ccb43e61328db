"""GQA attention with per-head QK norm and partial RoPE, plus MSA block-sparse selection.

Maths: m3-architecture.md §2.3 (full attention) and §2.4 (MSA), with the per-KV-group, budget-
inclusive selection of §10.3 and the HF local-block semantics of §10.5.

Export notes: no data-dependent Python control flow and no host syncs. The MSA top-k uses a
static k (= sparse_topk_blocks) on block scores right-padded with k columns of −inf, so the graph
does not depend on how many blocks the sequence has. Block positions come from `position_ids`
(the query's absolute position) and key positions are key slots, so a KV cache holding the whole
history gives the same selection as a full recompute.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3export.model.norm import GemmaRMSNorm
from m3export.model.rope import apply_rope
from m3export.spec.models import SparseAttentionSpec, TextSpec


class KVCache(NamedTuple):
    """One layer's cache (§2.3): post-norm, post-RoPE keys and raw values [B, KVH, P, D]; a sparse layer
    also caches the post-norm, post-RoPE index key [B, P, Dx] of the whole history (§2.4)."""

    key: Tensor
    value: Tensor
    index_key: Tensor | None = None


def causal_keep(position_ids: Tensor, key_len: int) -> Tensor:
    """Boolean keep mask [B, 1, S, K]: key slot j is visible to query i iff j <= position_ids[b, i]."""
    key_pos = torch.arange(key_len, device=position_ids.device)
    return key_pos[None, None, None, :] <= position_ids[:, None, :, None]


def num_key_blocks(key_len: int, block: int) -> int:
    """⌈key_len / block⌉ (works on symbolic sizes)."""
    return (key_len + block - 1) // block


def index_block_scores(idx_q: Tensor, idx_k: Tensor, position_ids: Tensor, block: int) -> Tensor:
    """Block scores [B, G, S, NB] (§2.4 steps 5-6): fp32 dot products, key-level causal −inf, max-pool.

    idx_q [B, S, G, D] and idx_k [B, K, D] are normed and rotated. The 1/sqrt(D) scale of §2.4.5 is
    omitted: it does not change the ranking (§10.16), and the HF oracle and the MSA kernel omit it.
    The key axis is padded with −inf to a block multiple, then max-pooled per block (Pad, Reshape,
    ReduceMax: plain ops for every export target).
    """
    key_len = idx_k.shape[1]
    scores = torch.einsum("bsgd,bkd->bgsk", idx_q.float(), idx_k.float())
    scores = scores.masked_fill(~causal_keep(position_ids, key_len), float("-inf"))
    num_blocks = num_key_blocks(key_len, block)
    scores = F.pad(scores, (0, num_blocks * block - key_len), value=float("-inf"))
    return scores.unflatten(-1, (num_blocks, block)).amax(dim=-1)


def select_blocks(block_scores: Tensor, position_ids: Tensor, sa: SparseAttentionSpec) -> Tensor:
    """Selected blocks [B, G, S, NB] (bool) per index head = per KV group (§2.4 steps 7-8, §10.3).

    Candidates are blocks b <= q_block = pos // block. Forced candidates (the `sparse_local_block`
    blocks ending at q_block, §10.5, and b < sparse_init_block) score +inf so they always win a slot
    inside the top-k budget. Top-k has a static k: k columns of −inf are appended, and any chosen
    slot whose score is −inf (a non-candidate or a padding column) is discarded.
    """
    num_blocks = block_scores.shape[-1]
    k = sa.sparse_topk_blocks
    blk = torch.arange(num_blocks, device=block_scores.device)
    q_block = (position_ids // sa.sparse_block_size)[:, None, :, None]  # [B, 1, S, 1]
    candidate = blk <= q_block
    forced = candidate & ((blk > q_block - sa.sparse_local_block) | (blk < sa.sparse_init_block))
    inf = torch.full((), float("inf"), device=block_scores.device)
    scores = torch.where(forced, inf, torch.where(candidate, block_scores, -inf))
    scores = F.pad(scores, (0, k), value=float("-inf"))
    top_vals, top_idx = torch.topk(scores, k, dim=-1)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top_idx, top_vals > float("-inf"))
    return chosen[..., :num_blocks] & candidate


def sparse_keep(selected: Tensor, position_ids: Tensor, key_len: int, block: int, num_heads: int) -> Tensor:
    """Token keep mask [B, num_heads, S, K] (§2.4 step 9): selected block AND causal, per query head."""
    key_block = torch.arange(key_len, device=selected.device) // block
    keep = selected.index_select(-1, key_block) & causal_keep(position_ids, key_len)
    return keep.repeat_interleave(num_heads // selected.shape[1], dim=1)


class M3Attention(nn.Module):
    """Self-attention of one decoder layer: full GQA, or MSA when `sparse` (selection-only indexer)."""

    def __init__(self, text: TextSpec, sparse: bool) -> None:
        super().__init__()
        h, d = text.hidden_size, text.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            text.num_attention_heads,
            text.num_key_value_heads,
            d,
        )
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.q_norm = GemmaRMSNorm(d, text.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(d, text.rms_norm_eps)
        self.sparse = sparse
        if sparse:
            sa = text.sparse_attention_config
            assert sa is not None, "a sparse layer needs sparse_attention_config"
            self.sa = sa
            self.index_q_proj = nn.Linear(h, sa.sparse_num_index_heads * sa.sparse_index_dim, bias=False)
            self.index_k_proj = nn.Linear(h, sa.sparse_index_dim, bias=False)
            self.index_q_norm = GemmaRMSNorm(sa.sparse_index_dim, text.rms_norm_eps)
            self.index_k_norm = GemmaRMSNorm(sa.sparse_index_dim, text.rms_norm_eps)

    def msa_keep(
        self, x: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor, past: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """MSA keep mask [B, num_heads, S, P+S] for normed input x [B, S, H] and the index keys of the
        whole history [B, P+S, Dx] (`past` holds the first P, §2.4 "decode and chunked prefill")."""
        b, s, _ = x.shape
        dim = self.sa.sparse_index_dim
        idx_q = apply_rope(self.index_q_norm(self.index_q_proj(x).view(b, s, -1, dim)), cos, sin)
        idx_k = apply_rope(self.index_k_norm(self.index_k_proj(x).view(b, s, 1, dim)), cos, sin)[:, :, 0]
        if past is not None:
            idx_k = torch.cat((past, idx_k), dim=1)
        key_len = idx_k.shape[1]
        scores = index_block_scores(idx_q, idx_k, position_ids, self.sa.sparse_block_size)
        selected = select_blocks(scores, position_ids, self.sa)
        keep = sparse_keep(selected, position_ids, key_len, self.sa.sparse_block_size, self.num_heads)
        return keep, idx_k

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        position_ids: Tensor,
        causal: Tensor,
        past: KVCache | None = None,
    ) -> tuple[Tensor, KVCache]:
        """x [B, S, H] (normed); cos/sin [B, S, R/2] fp32; causal [B, 1, S, P+S] bool; `past` holds P
        cached positions (key slot j is position j). Returns [B, S, H] and the cache of all P+S."""
        b, s, _ = x.shape
        d = self.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).view(b, s, self.num_heads, d)), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(x).view(b, s, self.num_kv_heads, d)), cos, sin)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, d)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past is not None:
            k, v = torch.cat((past.key, k), dim=2), torch.cat((past.value, v), dim=2)
        index_key = None
        if self.sparse:
            # A boolean mask, never an additive one: −inf biases leak in bf16 (§2.4.10).
            mask, index_key = self.msa_keep(
                x, cos, sin, position_ids, None if past is None else past.index_key
            )
        else:
            mask = causal
        rep = self.num_heads // self.num_kv_heads
        # GQA: query head h reads KV head h // rep (repeat-interleave, §2.3.4).
        out = F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), attn_mask=mask
        )
        out = self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * d))
        return out, KVCache(k, v, index_key)
