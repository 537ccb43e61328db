"""GQA attention with per-head QK norm and partial RoPE, plus MSA block-sparse selection.

Maths: m3-architecture.md §2.3 (full attention) and §2.4 (MSA), with the per-KV-group, budget-
inclusive selection of §10.3 and the HF local-block semantics of §10.5.

Export notes: no data-dependent Python control flow and no host syncs. The MSA top-k uses a
static k (= sparse_topk_blocks) on block scores right-padded with k columns of −inf, so the graph
does not depend on how many blocks the sequence has. Block positions come from `position_ids`
(the query's absolute position) and key positions are key slots, so a KV cache holding the whole
history gives the same selection as a full recompute.

MSA attention reads only the selected blocks (`gathered_block_attention`, issue #15): the keys and
values of each (KV group, query)'s k blocks are gathered slot by slot and merged with a running
softmax, so no [S, P+S] mask or score tensor per attention head exists (the indexer's fp32 token
scores are still [B, G, S, P+S], G index heads). It is exact for every length: for S <= k·block,
where MSA is dense causal attention (§2.4 "Consequences"), it reads every causal block, so no
separate dense path is needed. `masked_msa_attention` is the dense formulation it replaced, kept as
the reference tests and bench/msa_bench.py compare against.
"""

from __future__ import annotations

import math
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


def index_block_scores(
    idx_q: Tensor, idx_k: Tensor, block: int, position_ids: Tensor | None = None
) -> Tensor:
    """Block scores [B, G, S, NB] (§2.4 steps 5-6): fp32 dot products, max-pooled per block of keys.

    idx_q [B, S, G, D] and idx_k [B, K, D] are normed and rotated. The 1/sqrt(D) scale of §2.4.5 is
    omitted: it does not change the ranking (§10.16), and the HF oracle and the MSA kernel omit it.

    §2.4 step 5's key-level causal −inf and step 6's −inf padding are not applied, because they
    cannot change the selection while the query's own block is forced (sparse_local_block >= 1, as
    in M3; with 0, pass `position_ids` and the key-level mask is applied). Keys past a query's
    position lie in its own block, which is forced (+inf, step 7), or in later blocks, which are not
    candidates (−inf, step 7). Every earlier block
    is wholly visible. The zero-padded keys of a partial last block sit in the last query's own block.
    So `select_block_ids` gives the same blocks as with the masks; transformers' implementation, which
    applies them, checks this in every build and in tests/test_parity_transformers.py. Leaving them out
    keeps a single [B, G, S, NB·block] fp32 tensor, instead of four (the mask, the padding and a
    transpose each copied it: 2 GiB per layer for a 1024-token chunk over 64k keys).
    """
    num_blocks = num_key_blocks(idx_k.shape[1], block)
    keys = F.pad(idx_k.float(), (0, 0, 0, num_blocks * block - idx_k.shape[1]))  # [B, NB·block, D]
    # [B, G, S, D] @ [B, 1, D, NB·block]: a MatMul (ONNX Runtime's Einsum for "bsgd,bkd->bgsk" took
    # 4 ms per layer at 64k keys in decode).
    scores = idx_q.float().transpose(1, 2) @ keys.transpose(1, 2)[:, None]
    if position_ids is not None:
        scores = scores.masked_fill(~causal_keep(position_ids, num_blocks * block), float("-inf"))
    return scores.unflatten(-1, (num_blocks, block)).amax(dim=-1)


def select_block_ids(
    block_scores: Tensor, position_ids: Tensor, sa: SparseAttentionSpec
) -> tuple[Tensor, Tensor]:
    """The kernel format of §2.4 step 8: block ids [B, G, S, k] (int64) per index head = per KV group,
    and whether each slot holds a selected block (bool; §10.3 budget-inclusive selection).

    Candidates are blocks b <= q_block = pos // block. Forced candidates (the `sparse_local_block`
    blocks ending at q_block, §10.5, and b < sparse_init_block) score +inf so they always win a slot
    inside the top-k budget. Top-k has a static k: k columns of −inf are appended, and any chosen
    slot whose score is −inf (a non-candidate or a padding column) is not valid.
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
    return top_idx, top_vals > float("-inf")


def select_blocks(block_scores: Tensor, position_ids: Tensor, sa: SparseAttentionSpec) -> Tensor:
    """Selected blocks [B, G, S, NB] (bool): `select_block_ids` as a mask over every block."""
    ids, valid = select_block_ids(block_scores, position_ids, sa)
    return blocks_mask(ids, valid, block_scores.shape[-1])


def blocks_mask(ids: Tensor, valid: Tensor, num_blocks: int) -> Tensor:
    """Block ids and validity [B, G, S, k] as a mask [B, G, S, num_blocks] (padding ids dropped)."""
    padded = ids.new_zeros((*ids.shape[:-1], num_blocks + ids.shape[-1]), dtype=torch.bool)
    return padded.scatter(-1, ids, valid)[..., :num_blocks]


def masked_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    """Dense GQA attention (§2.3) under a boolean keep mask [B, 1 or H, S, K]: query head h reads KV
    head h // (H / G) (repeat-interleave, §2.3.4). A boolean mask, never an additive one: −inf biases
    leak in bf16 (§2.4.10)."""
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), attn_mask=keep
    )


def gathered_block_attention(
    q: Tensor, k: Tensor, v: Tensor, ids: Tensor, valid: Tensor, position_ids: Tensor, block: int
) -> Tensor:
    """MSA attention reading only the selected blocks (§2.4 steps 9-10 without the [S, P+S] mask).

    q [B, H, S, D]; k, v [B, G, K, D] (K = P+S key slots, key slot j is position j); ids / valid
    [B, G, S, k] from `select_block_ids`. Slot by slot over the k selected blocks, each query's block
    of keys is gathered ([B, G, S, block, D]), scored, masked (a valid slot, key j <= the query's
    position) and merged into a running softmax (max, sum, weighted values: the log-sum-exp merge),
    in fp32 as the dense path's softmax is (§2.7). Memory is O(S · block · D) per slot whatever K is,
    and the result equals softmax attention over the union of the selected blocks (every query's own
    block is forced, so no row is empty). Query head h reads KV group h // (H / G) (§2.3.4).
    """
    b, h, s, d = q.shape
    g, key_len = k.shape[1], k.shape[2]
    # Rows of the flattened cache, gathered directly (no padded copy of the history per call): key
    # slot j of group (b, g) is row (b·G + g)·K + j; slots past the end read key 0, masked.
    k_rows, v_rows = k.reshape(b * g * key_len, d), v.reshape(b * g * key_len, d)
    base = (torch.arange(b * g, device=q.device) * key_len).view(b, g, 1, 1)
    qg = q.float().reshape(b, g, h // g, s, d) * (1.0 / math.sqrt(d))
    offsets = torch.arange(block, device=q.device)
    pos = position_ids[:, None, :, None]  # [B, 1, S, 1]
    m = torch.full((b, g, h // g, s, 1), -1e30, device=q.device)
    total = torch.zeros((b, g, h // g, s, 1), device=q.device)
    acc = torch.zeros((b, g, h // g, s, d), device=q.device)
    for slot in range(ids.shape[-1]):  # static k: unrolled in the graph
        # An invalid slot (a padding id, possibly >= NB) reads block 0, masked; a slot past the last
        # key reads key 0, masked. Mul / Where, not Clip: TensorRT's Clip takes no INT64.
        blk = ids[..., slot] * valid[..., slot].long()
        key_pos = blk[..., None] * block + offsets  # [B, G, S, block]
        rows = base + torch.where(key_pos < key_len, key_pos, 0)
        kb, vb = k_rows[rows].float(), v_rows[rows].float()  # [B, G, S, block, D]
        scores = torch.einsum("bgrsd,bgstd->bgrst", qg, kb)
        ok = valid[..., slot, None] & (key_pos <= pos)  # a clamped slot is past every position: masked
        scores = scores.masked_fill(~ok[:, :, None], float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        weights = torch.exp(scores - m_new)
        keep = torch.exp(m - m_new)
        total = total * keep + weights.sum(dim=-1, keepdim=True)
        acc = acc * keep + torch.einsum("bgrst,bgstd->bgrsd", weights, vb)
        m = m_new
    return (acc / total).reshape(b, h, s, d).to(q.dtype)


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

    def msa_select(
        self, x: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor, past: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The indexer (§2.4 steps 1-8) for normed input x [B, S, H] and the index keys of the whole
        history (`past` holds the first P, §2.4 "decode and chunked prefill"): block ids and validity
        [B, G, S, k] (`select_block_ids`) and the index keys [B, P+S, Dx]."""
        b, s, _ = x.shape
        dim = self.sa.sparse_index_dim
        idx_q = apply_rope(self.index_q_norm(self.index_q_proj(x).view(b, s, -1, dim)), cos, sin)
        idx_k = apply_rope(self.index_k_norm(self.index_k_proj(x).view(b, s, 1, dim)), cos, sin)[:, :, 0]
        if past is not None:
            idx_k = torch.cat((past, idx_k), dim=1)
        unforced = self.sa.sparse_local_block == 0  # the own block is scored: mask its future keys
        scores = index_block_scores(
            idx_q, idx_k, self.sa.sparse_block_size, position_ids if unforced else None
        )
        ids, valid = select_block_ids(scores, position_ids, self.sa)
        return ids, valid, idx_k

    def msa_keep(
        self, x: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor, past: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The dense form of the selection: keep mask [B, num_heads, S, P+S] (§2.4 step 9) and the index
        keys. The reference the gathered attention is tested against; the forward never builds it."""
        ids, valid, idx_k = self.msa_select(x, cos, sin, position_ids, past)
        block, key_len = self.sa.sparse_block_size, idx_k.shape[1]
        selected = blocks_mask(ids, valid, num_key_blocks(key_len, block))
        return sparse_keep(selected, position_ids, key_len, block, self.num_heads), idx_k

    def msa_attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        position_ids: Tensor,
        past: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """MSA: the indexer's selection, then attention over the selected blocks only
        (`gathered_block_attention`); returns [B, H, S, D] and the index keys of the whole history."""
        ids, valid, idx_k = self.msa_select(x, cos, sin, position_ids, past)
        return gathered_block_attention(q, k, v, ids, valid, position_ids, self.sa.sparse_block_size), idx_k

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
            out, index_key = self.msa_attention(
                q, k, v, x, cos, sin, position_ids, None if past is None else past.index_key
            )
        else:
            out = masked_attention(q, k, v, causal)
        out = self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * d))
        return out, KVCache(k, v, index_key)


def masked_msa_attention(
    self: M3Attention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor,
    past: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """MSA in its dense formulation (§2.4 steps 9-10 as written): the keep mask over every key
    [B, H, S, P+S], then masked SDPA. What the graphs computed before issue #15; kept as the reference
    `M3Attention.msa_attention` is tested and benchmarked against (same signature)."""
    keep, idx_k = self.msa_keep(x, cos, sin, position_ids, past)
    return masked_attention(q, k, v, keep), idx_k
