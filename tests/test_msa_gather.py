"""MSA as gathered block attention (issue #15): attention reads only the selected blocks, slot by slot
with a log-sum-exp merge (m3export/model/attention.py `gathered_block_attention`), and equals the
dense formulation (boolean keep mask over every key, then SDPA: §2.4 steps 9-10) wherever MSA drops
blocks, through a KV cache too, and in float16."""

from __future__ import annotations

import pytest
import torch
from parityhelp import dropped_pairs

from m3export.model.attention import (
    M3Attention,
    gathered_block_attention,
    masked_msa_attention,
    num_key_blocks,
)
from m3export.model.text import M3ForCausalLM
from m3export.spec import M3Spec, SparseAttentionSpec


def _float64_reference(q, k, v, ids, valid, pos, block):  # type: ignore[no-untyped-def]
    """Softmax attention over the union of each (group, query)'s valid selected blocks, causal, float64,
    one query at a time."""
    b, h, s, d = q.shape
    g = k.shape[1]
    out = torch.zeros(b, h, s, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for si in range(s):
                keys = sorted(
                    {
                        int(blk) * block + t
                        for blk, ok in zip(ids[bi, gi, si].tolist(), valid[bi, gi, si].tolist(), strict=True)
                        if ok
                        for t in range(block)
                        if int(blk) * block + t <= int(pos[bi, si])
                    }
                )
                kk, vv = k[bi, gi, keys].double(), v[bi, gi, keys].double()
                w = torch.softmax(kk @ q[bi, hi, si].double() / d**0.5, dim=0)
                out[bi, hi, si] = w @ vv
    return out


@pytest.mark.parametrize(("past", "seq"), [(0, 40), (37, 5), (90, 1)])
def test_gathered_attention_equals_float64_over_the_selected_blocks(past: int, seq: int) -> None:
    """Random selections (duplicates never, invalid slots and a partial last block included)."""
    g = torch.Generator().manual_seed(past + seq)
    b, h, grp, d, block, k = 2, 4, 2, 16, 8, 3
    key_len = past + seq
    nb = num_key_blocks(key_len, block)
    pos = torch.arange(past, key_len)[None].expand(b, seq)
    q = torch.randn(b, h, seq, d, generator=g)
    kk, vv = torch.randn(b, grp, key_len, d, generator=g), torch.randn(b, grp, key_len, d, generator=g)
    own = (pos // block)[:, None, :].expand(b, grp, seq)
    scores = torch.rand(b, grp, seq, nb + k, generator=g)
    scores.scatter_(-1, own[..., None], 2.0)  # every query's own block first, as the forced local block
    ids = scores.argsort(-1, descending=True)[..., :k]  # distinct, some >= nb (padding ids)
    valid = (ids <= own[..., None]) & (ids < nb)
    got = gathered_block_attention(q, kk, vv, ids, valid, pos, block)
    want = _float64_reference(q, kk, vv, ids, valid, pos, block)
    assert (got.double() - want).abs().max() < 1e-5


@pytest.fixture(scope="module")
def model(tiny_text_spec: M3Spec) -> M3ForCausalLM:
    return M3ForCausalLM.from_config(tiny_text_spec).eval()


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 1024, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seq", [12, 64, 200])
def test_model_with_gathered_msa_equals_the_dense_masked_formulation(
    model: M3ForCausalLM, seq: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole model (3 MSA layers + the MTP block): gathered vs dense keep mask + SDPA, at lengths
    where MSA keeps every block (12) and where it drops most of them (64, 200: blocks of 8, top-2)."""
    ids = _ids(2, seq, seed=seq)
    dropped = dropped_pairs(model, ids)
    assert all(d == 0 for d in dropped) if seq <= 16 else all(d > 0 for d in dropped), dropped
    with torch.no_grad():
        got = model(ids)
        monkeypatch.setattr(M3Attention, "msa_attention", masked_msa_attention)
        want = model(ids)
    scale = want.logits.abs().max()
    assert (got.logits - want.logits).abs().max() <= 1e-5 * scale
    assert (got.mtp_per_depth_logits[0] - want.mtp_per_depth_logits[0]).abs().max() <= 1e-5 * scale


def test_decode_through_the_cache_at_a_long_position_matches_full_recompute(model: M3ForCausalLM) -> None:
    """Chunked prefill then one-token steps at positions past 1000: the gathered path reads the
    selected blocks of the cached history exactly as a full recompute does."""
    ids = _ids(1, 1030, seed=5)
    with torch.no_grad():
        full = model(ids).logits
        pos = torch.arange(1030)[None]
        first = model.model(ids[:, :1000], position_ids=pos[:, :1000])
        cache, outs = first.past_key_values, []
        for t in range(1000, 1030):
            step = model(ids[:, t : t + 1], position_ids=pos[:, t : t + 1], past_key_values=cache)
            cache = step.past_key_values
            outs.append(step.logits)
    got = torch.cat(outs, dim=1)
    assert (got - full[:, 1000:]).abs().max() <= 1e-5 * full.abs().max()


def test_gathered_msa_in_float16_matches_the_dense_formulation(
    tiny_text_spec: M3Spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tiny_text_spec.model_dump(mode="json")
    data["export"]["precision"]["dtype"] = "float16"
    data.pop("tolerances")
    model = M3ForCausalLM.from_config(M3Spec.model_validate(data)).eval()
    ids = _ids(2, 64, seed=1)
    with torch.no_grad():
        got = model(ids).logits.float()
        monkeypatch.setattr(M3Attention, "msa_attention", masked_msa_attention)
        want = model(ids).logits.float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.9999


@pytest.mark.parametrize("local", [0, 1, 2])
@pytest.mark.parametrize(("past", "seq"), [(0, 45), (29, 3)])
def test_indexer_without_key_masks_selects_what_the_masked_scores_select(
    local: int, past: int, seq: int
) -> None:
    """§2.4 steps 5-6 written out (key-level causal −inf, −inf padding, max-pool) select the same
    blocks as `index_block_scores`, which leaves the masks out when the own block is forced."""
    import torch.nn.functional as F

    from m3export.model.attention import causal_keep, index_block_scores, select_block_ids

    sa = SparseAttentionSpec(
        use_sparse_attention=True,
        sparse_block_size=8,
        sparse_topk_blocks=2,
        sparse_num_index_heads=2,
        sparse_index_dim=16,
        sparse_score_type="max",
        sparse_init_block=0,
        sparse_local_block=local,
        sparse_attention_freq=[1],
        sparse_disable_index_value=[1],
    )
    g = torch.Generator().manual_seed(local * 100 + seq)
    key_len = past + seq
    idx_q, idx_k = torch.randn(2, seq, 2, 16, generator=g), torch.randn(2, key_len, 16, generator=g)
    pos = torch.arange(past, key_len)[None].expand(2, seq)
    full = torch.einsum("bsgd,bkd->bgsk", idx_q.double(), idx_k.double())
    full = full.masked_fill(~causal_keep(pos, key_len), float("-inf"))
    nb = num_key_blocks(key_len, 8)
    want = F.pad(full, (0, nb * 8 - key_len), value=float("-inf")).unflatten(-1, (nb, 8)).amax(-1)
    got = index_block_scores(idx_q, idx_k, 8, pos if local == 0 else None)
    ids_w, ok_w = select_block_ids(want.float(), pos, sa)
    ids_g, ok_g = select_block_ids(got, pos, sa)
    assert torch.equal(
        (ids_w * ok_w - (~ok_w).long()).sort(-1).values, (ids_g * ok_g - (~ok_g).long()).sort(-1).values
    )
