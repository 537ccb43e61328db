"""KV cache of the eager model: chunked prefill + decode equals the full recompute (§2.3, §2.4, §3.4)."""

from __future__ import annotations

import pytest
import torch
from parityhelp import dropped_pairs

from m3export.model.mtp import shift_left
from m3export.model.text import M3ForCausalLM
from m3export.spec import M3Spec

PROMPT, DECODE = 40, 24  # block 8, top-2: MSA drops blocks from position 16 on


@pytest.fixture(scope="module")
def model(tiny_text_spec: M3Spec) -> M3ForCausalLM:
    return M3ForCausalLM.from_config(tiny_text_spec, seed=3)


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(3, 1000, (batch, seq), generator=torch.Generator().manual_seed(seq))


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_equals_full_recompute(model: M3ForCausalLM, batch: int) -> None:
    ids = _ids(batch, PROMPT + DECODE)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :PROMPT], position_ids=torch.arange(PROMPT).expand(batch, -1))
        got, past = [out.logits], out.past_key_values
        for t in range(PROMPT, PROMPT + DECODE):
            pos = torch.full((batch, 1), t)
            step = model(ids[:, t : t + 1], position_ids=pos, past_key_values=past)
            got.append(step.logits)
            past = step.past_key_values
    assert past is not None and past[1].index_key is not None
    assert past[1].key.shape[2] == PROMPT + DECODE and past[1].index_key.shape[1] == PROMPT + DECODE
    err = (torch.cat(got, dim=1) - full).abs().max().item()
    assert err <= 1e-5, err
    # The last decode step really drops blocks (it sees 64 keys in 8 blocks, keeps 2 per group).
    pos = torch.full((batch, 1), PROMPT + DECODE - 1)
    with torch.no_grad():
        short = model(ids[:, : PROMPT + DECODE - 1], position_ids=torch.arange(PROMPT + DECODE - 1)[None])
    cache = [type(c)(*(t[:1] if t is not None else None for t in c)) for c in short.past_key_values or []]
    assert sum(dropped_pairs(model, ids[:1, -1:], position_ids=pos[:1], past_key_values=cache)) > 0


def test_mtp_step_with_cache_equals_mtp_logits(model: M3ForCausalLM) -> None:
    ids = _ids(2, PROMPT)
    with torch.no_grad():
        out = model(ids)
        assert out.mtp_per_depth_logits is not None
        nxt = shift_left(ids)
        pos = torch.arange(PROMPT).expand(2, -1)
        cut = PROMPT - 5
        a, past = model.model.mtp_step(out.hidden_states[:, :cut], nxt[:, :cut], model.lm_head, pos[:, :cut])
        b, _ = model.model.mtp_step(
            out.hidden_states[:, cut:], nxt[:, cut:], model.lm_head, pos[:, cut:], past
        )
    err = (torch.cat([a[0], b[0]], dim=1) - out.mtp_per_depth_logits[0]).abs().max().item()
    assert err <= 1e-5, err


def test_cache_requires_positions(model: M3ForCausalLM) -> None:
    ids = _ids(1, 4)
    with torch.no_grad():
        past = model(ids).past_key_values
        with pytest.raises(ValueError, match="position_ids"):
            model(ids[:, :1], past_key_values=past)


def test_two_mtp_depths_chunked_with_lookahead_equal_mtp_logits(tiny_text_spec: M3Spec) -> None:
    """Depth 1 reads one token past a chunk: `lookahead_ids` supplies it, so chunks equal one pass."""
    from conftest import spec_variant

    model = M3ForCausalLM.from_config(spec_variant(tiny_text_spec, num_mtp_modules=2), seed=4)
    ids = _ids(2, PROMPT)
    with torch.no_grad():
        out = model(ids)
        assert out.mtp_per_depth_logits is not None and len(out.mtp_per_depth_logits) == 2
        nxt = shift_left(ids)
        pos = torch.arange(PROMPT).expand(2, -1)
        cut = PROMPT - 5
        a, past = model.model.mtp_step(
            out.hidden_states[:, :cut],
            nxt[:, :cut],
            model.lm_head,
            pos[:, :cut],
            lookahead_ids=nxt[:, cut : cut + 1],
        )
        b, _ = model.model.mtp_step(
            out.hidden_states[:, cut:], nxt[:, cut:], model.lm_head, pos[:, cut:], past
        )
    for d in range(2):
        err = (torch.cat([a[d], b[d]], dim=1) - out.mtp_per_depth_logits[d]).abs().max().item()
        assert err <= 1e-5, (d, err)
