"""m3export text model vs the transformers oracle (`transformers.models.minimax_m3_vl`), fp32 CPU.

Both directions go through HF-layout checkpoints on disk (m3-architecture.md §6.1): m3export saves
and transformers loads, and transformers (every tensor re-randomised) saves and m3export loads.
transformers has no MTP, so MTP logits are checked against a float64 transcription of §3.2 (with
its own transcription of the decoder block, §2.2-2.6) that reads the checkpoint tensors by their
HF names. Mutation tests show that the comparisons can fail.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import spec_variant
from parityhelp import assert_within as _assert_within
from parityhelp import dense_causal_msa, dropped_pairs
from parityhelp import stats as _stats
from safetensors.torch import load_file

import m3export.ops.moe as ops_moe
from m3export.errors import CheckpointError
from m3export.model.attention import M3Attention
from m3export.model.checkpoint import save_checkpoint
from m3export.model.text import M3ForCausalLM
from m3export.parity.hf_oracle import randomise_hf_weights
from m3export.spec import M3Spec, Tolerance

transformers = pytest.importorskip("transformers")
from transformers import MiniMaxM3SparseForConditionalGeneration, MiniMaxM3VLForCausalLM  # noqa: E402
from transformers.conversion_mapping import (  # noqa: E402
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

VL_NON_TEXT = ("model.vision_tower.", "model.multi_modal_projector.")
DENSE_SEQ, SPARSE_SEQ, BATCH = 12, 64, 2


@pytest.fixture(scope="module", autouse=True)
def _text_only_conversion() -> None:
    """transformers registers the §6.1 key conversion for the VL model type only. The text-only class
    gets the same renames/merges minus the VL prefix moves (the ones anchored at `^`)."""
    vl = get_checkpoint_conversion_mapping("minimax_m3_vl")
    text = [t for t in vl if not any(p.startswith("^") for p in t.source_patterns)]
    register_checkpoint_conversion_mapping("MiniMaxM3VLForCausalLM", text, overwrite=True)


def _tol(spec: M3Spec) -> Tolerance:
    assert spec.tolerances.reference is not None
    return spec.tolerances.reference


def _ids(spec: M3Spec, seq: int, seed: int) -> torch.Tensor:
    # Below 1021 so that a VL model sees no image/video placeholder ids.
    return torch.randint(0, 1000, (BATCH, seq), generator=torch.Generator().manual_seed(seed))


def _hf_load(cls: Any, path: Path) -> tuple[Any, dict[str, Any]]:
    model, info = cls.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


@pytest.fixture(scope="module")
def ours_to_hf(
    tiny_text_spec: M3Spec, tmp_path_factory: pytest.TempPathFactory
) -> tuple[M3ForCausalLM, Path]:
    model = M3ForCausalLM.from_config(tiny_text_spec)
    path = save_checkpoint(model, tiny_text_spec, tmp_path_factory.mktemp("ours"))
    return model, path


def test_m3export_checkpoint_in_transformers(
    ours_to_hf: tuple[M3ForCausalLM, Path], tiny_text_spec: M3Spec
) -> None:
    ours, path = ours_to_hf
    hf, info = _hf_load(MiniMaxM3VLForCausalLM, path)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for seq, seed in ((DENSE_SEQ, 0), (SPARSE_SEQ, 1)):
        ids = _ids(tiny_text_spec, seq, seed)
        dropped = dropped_pairs(ours, ids)
        assert len(dropped) == 3 + tiny_text_spec.text.num_mtp_modules  # + the MTP block
        # seq 12 <= topk·block = 16: MSA is dense causal; seq 64: every sparse layer drops blocks.
        assert all(d == 0 for d in dropped) if seq == DENSE_SEQ else all(d > 0 for d in dropped), dropped
        with torch.no_grad():
            s = _assert_within(ours(ids).logits, hf(ids).logits, _tol(tiny_text_spec))
        print(f"ours->hf seq {seq}: {s}")


def test_parity_fails_without_correction_bias(
    ours_to_hf: tuple[M3ForCausalLM, Path], tiny_text_spec: M3Spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation: routing that ignores e_score_correction_bias must fail the comparison."""
    ours, path = ours_to_hf
    hf, _ = _hf_load(MiniMaxM3VLForCausalLM, path)
    ids = _ids(tiny_text_spec, SPARSE_SEQ, 1)
    real_route = ops_moe.route
    monkeypatch.setattr(ops_moe, "route", lambda h, w, b, k, s: real_route(h, w, torch.zeros_like(b), k, s))
    with torch.no_grad():
        err = _stats(ours(ids).logits, hf(ids).logits)["max_abs"]
    print(f"mutated max abs err {err:.3g}")
    assert err > 100 * _tol(tiny_text_spec).max_abs, err


def test_parity_fails_without_msa_selection(
    ours_to_hf: tuple[M3ForCausalLM, Path], tiny_text_spec: M3Spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation: dense causal attention on the sparse layers must fail the comparison at seq 64."""
    ours, path = ours_to_hf
    hf, _ = _hf_load(MiniMaxM3VLForCausalLM, path)
    ids = _ids(tiny_text_spec, SPARSE_SEQ, 1)
    monkeypatch.setattr(M3Attention, "msa_attention", dense_causal_msa)
    with torch.no_grad():
        err = _stats(ours(ids).logits, hf(ids).logits)["max_abs"]
    print(f"mutated max abs err {err:.3g}")
    assert err > 100 * _tol(tiny_text_spec).max_abs, err


def _randomise(model: Any, seed: int) -> None:
    """Overwrite every parameter and persistent buffer, norms and correction biases included."""
    randomise_hf_weights(model, seed)
    for name, t in model.state_dict().items():
        assert t.abs().min() > 0 or t.numel() > 64, name


def _no_mtp(spec: M3Spec) -> M3Spec:
    return spec_variant(spec, num_mtp_modules=0)


def _hf_config(spec: M3Spec) -> Any:
    from m3export.spec import to_hf_config

    cfg = {k: v for k, v in to_hf_config(spec).items() if k != "architectures"}
    if spec.is_vl:
        return transformers.MiniMaxM3VLConfig(**cfg)
    return transformers.MiniMaxM3VLTextConfig(**cfg)


def test_transformers_checkpoint_in_m3export(tiny_text_spec: M3Spec, tmp_path: Path) -> None:
    hf = MiniMaxM3VLForCausalLM(_hf_config(tiny_text_spec)).eval()
    _randomise(hf, seed=7)
    hf.save_pretrained(tmp_path)
    spec = _no_mtp(tiny_text_spec)  # transformers writes no MTP tensors
    # config.json is transformers' own here; the architecture comes from the spec.
    ours = M3ForCausalLM.from_pretrained(tmp_path, spec=spec)
    for seq, seed in ((DENSE_SEQ, 2), (SPARSE_SEQ, 3)):
        ids = _ids(spec, seq, seed)
        if seq == SPARSE_SEQ:
            assert all(d > 0 for d in dropped_pairs(ours, ids))
        with torch.no_grad():
            s = _assert_within(ours(ids).logits, hf(ids).logits, _tol(spec))
        print(f"hf->ours seq {seq}: {s}")
    with pytest.raises(CheckpointError, match="missing"):
        M3ForCausalLM.from_pretrained(tmp_path, spec=tiny_text_spec)  # the spec wants an MTP depth


def test_vl_layout_both_directions(tiny_spec: M3Spec, tmp_path: Path) -> None:
    """VL layout (`language_model.` prefix): text logits agree; only vision-side keys are not ours."""
    ours = M3ForCausalLM.from_config(tiny_spec)
    save_checkpoint(ours, tiny_spec, tmp_path / "ours")
    hf, info = _hf_load(MiniMaxM3SparseForConditionalGeneration, tmp_path / "ours")
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert info["missing_keys"] and all(k.startswith(VL_NON_TEXT) for k in info["missing_keys"]), info
    ids = _ids(tiny_spec, SPARSE_SEQ, 4)
    with torch.no_grad():
        print("ours->hf VL:", _assert_within(ours(ids).logits, hf(input_ids=ids).logits, _tol(tiny_spec)))

    hf = MiniMaxM3SparseForConditionalGeneration(_hf_config(tiny_spec)).eval()
    _randomise(hf, seed=8)
    hf.save_pretrained(tmp_path / "hf")
    ours = M3ForCausalLM.from_pretrained(tmp_path / "hf", spec=_no_mtp(tiny_spec))
    with torch.no_grad():
        print("hf->ours VL:", _assert_within(ours(ids).logits, hf(input_ids=ids).logits, _tol(tiny_spec)))


# ---------------------------------------------------------------------------------------------
# MTP: float64 transcription of §3.2, with its own decoder block (§2.2-2.6), on checkpoint keys.


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1.0 + w)


def _rope(x: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """x [S, N, D], positions 0..S-1; NeoX halves on the first rotary_dim channels (§2.3.3)."""
    half = rotary_dim // 2
    inv = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / rotary_dim)
    a = torch.arange(x.shape[0], dtype=torch.float64)[:, None, None] * inv
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    return torch.cat((x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin(), x[..., rotary_dim:]), dim=-1)


def _msa_allowed(iq: torch.Tensor, ik: torch.Tensor, spec: M3Spec, stats: dict[str, int]) -> torch.Tensor:
    """allowed[g, i, j] for one sequence (§2.4 steps 5-9), one query at a time."""
    sa = spec.text.sparse_attention_config
    assert sa is not None
    seq, groups, blk = iq.shape[0], iq.shape[1], sa.sparse_block_size
    allowed = torch.zeros(groups, seq, seq, dtype=torch.bool)
    for g in range(groups):
        for i in range(seq):
            s = ik[: i + 1] @ iq[i, g]
            qb = i // blk
            score = {b: s[b * blk : (b + 1) * blk].max().item() for b in range(qb + 1)}
            forced = {b for b in score if b > qb - sa.sparse_local_block or b < sa.sparse_init_block}
            chosen = sorted(score, key=lambda b: (b not in forced, -score[b]))[: sa.sparse_topk_blocks]
            for b in chosen:
                allowed[g, i, b * blk : min((b + 1) * blk, i + 1)] = True
            stats["dropped_blocks"] += qb + 1 - len(chosen)
    return allowed


def _ref_block(
    x: torch.Tensor, w: dict[str, torch.Tensor], p: str, spec: M3Spec, stats: dict
) -> torch.Tensor:
    """One MoE + MSA decoder block for one sequence x [S, H]."""
    t = spec.text
    eps, d, nh, nkv = t.rms_norm_eps, t.head_dim, t.num_attention_heads, t.num_key_value_heads
    sa = t.sparse_attention_config
    assert sa is not None
    seq = x.shape[0]
    a = _rms(x, w[p + "input_layernorm.weight"], eps)
    q = _rope(
        _rms(
            (a @ w[p + "self_attn.q_proj.weight"].T).view(seq, nh, d), w[p + "self_attn.q_norm.weight"], eps
        ),
        t.rotary_dim,
        t.rope_theta,
    )
    k = _rope(
        _rms(
            (a @ w[p + "self_attn.k_proj.weight"].T).view(seq, nkv, d), w[p + "self_attn.k_norm.weight"], eps
        ),
        t.rotary_dim,
        t.rope_theta,
    )
    v = (a @ w[p + "self_attn.v_proj.weight"].T).view(seq, nkv, d)
    di = sa.sparse_index_dim
    iq = _rope(
        _rms(
            (a @ w[p + "self_attn.index_q_proj.weight"].T).view(seq, -1, di),
            w[p + "self_attn.index_q_norm.weight"],
            eps,
        ),
        t.rotary_dim,
        t.rope_theta,
    )
    ik = _rope(
        _rms(
            (a @ w[p + "self_attn.index_k_proj.weight"].T).view(seq, 1, di),
            w[p + "self_attn.index_k_norm.weight"],
            eps,
        ),
        t.rotary_dim,
        t.rope_theta,
    )[:, 0]
    allowed = _msa_allowed(iq, ik, spec, stats)
    heads = []
    for h in range(nh):
        g = h // (nh // nkv)  # KV head = index head = MSA group (§2.3.4, §10.3)
        s = (q[:, h] @ k[:, g].T) / math.sqrt(d)
        heads.append(torch.softmax(s.masked_fill(~allowed[g], -math.inf), dim=-1) @ v[:, g])
    x = x + torch.cat(heads, dim=-1) @ w[p + "self_attn.o_proj.weight"].T
    return x + _ref_moe(
        _rms(x, w[p + "post_attention_layernorm.weight"], eps), w, p + "block_sparse_moe.", spec
    )


def _swiglu(g: torch.Tensor, u: torch.Tensor, spec: M3Spec) -> torch.Tensor:
    t = spec.text
    g, u = g.clamp(max=t.swiglu_limit), u.clamp(-t.swiglu_limit, t.swiglu_limit)
    return g * torch.sigmoid(t.swiglu_alpha * g) * (u + t.swiglu_beta)


def _ref_moe(x: torch.Tensor, w: dict[str, torch.Tensor], p: str, spec: M3Spec) -> torch.Tensor:
    t = spec.text
    out = _swiglu(
        x @ w[p + "shared_experts.gate_proj.weight"].T, x @ w[p + "shared_experts.up_proj.weight"].T, spec
    )
    out = out @ w[p + "shared_experts.down_proj.weight"].T
    s = torch.sigmoid(x @ w[p + "gate.weight"].T)
    chosen = torch.argsort(-(s + w[p + "e_score_correction_bias"]), dim=-1, stable=True)[
        :, : t.num_experts_per_tok
    ]
    for i in range(x.shape[0]):
        weights = s[i, chosen[i]] / s[i, chosen[i]].sum() * t.routed_scaling_factor
        for e, we in zip(chosen[i].tolist(), weights, strict=True):
            e_p = f"{p}experts.{e}."
            act = _swiglu(w[e_p + "w1.weight"] @ x[i], w[e_p + "w3.weight"] @ x[i], spec)
            out[i] += we * (w[e_p + "w2.weight"] @ act)
    return out


def reference_mtp_logits(
    h0: torch.Tensor, ids: torch.Tensor, w: dict[str, torch.Tensor], spec: M3Spec, *, cumulative: bool = True
) -> tuple[list[torch.Tensor], dict[str, int]]:
    """§3.2 per depth: shift ids left (cumulative, 0-filled), eh_proj([enorm(emb); hnorm(h)]), block,
    final_layernorm, shared lm_head. h0 is the main model's post-final-norm hidden state."""
    eps, stats = spec.text.rms_norm_eps, {"dropped_blocks": 0}
    logits, h, cur = [], h0.double(), ids
    for d in range(spec.text.num_mtp_modules):
        p = f"model.mtp.layers.{d}."
        src = cur if cumulative else ids
        cur = torch.cat((src[:, 1:], torch.zeros_like(src[:, :1])), dim=1)
        emb = w["model.embed_tokens.weight"][cur]
        x = torch.cat((_rms(emb, w[p + "enorm.weight"], eps), _rms(h, w[p + "hnorm.weight"], eps)), -1)
        x = x @ w[p + "eh_proj.weight"].T
        x = torch.stack([_ref_block(xb, w, p + "transformer_layer.", spec, stats) for xb in x])
        h = _rms(x, w[p + "final_layernorm.weight"], eps)
        logits.append(h @ w["lm_head.weight"].T)
    return logits, stats


@pytest.mark.parametrize("depths", [1, 2])
def test_mtp_logits_match_float64_transcription(tiny_text_spec: M3Spec, tmp_path: Path, depths: int) -> None:
    spec = spec_variant(tiny_text_spec, num_mtp_modules=depths)
    ours = M3ForCausalLM.from_config(spec)
    save_checkpoint(ours, spec, tmp_path)
    w = {k: v.double() for k, v in load_file(tmp_path / "model.safetensors").items()}
    hf, _ = _hf_load(MiniMaxM3VLForCausalLM, tmp_path)  # ignores the mtp.* keys
    ids = _ids(spec, SPARSE_SEQ, 5)
    with torch.no_grad():
        out = ours(ids)
        h0 = hf.model(input_ids=ids).last_hidden_state  # post-final-norm, from the oracle
    ref, stats = reference_mtp_logits(h0, ids, w, spec)
    assert stats["dropped_blocks"] > 0  # the MTP block's MSA really drops blocks at seq 64
    assert out.mtp_per_depth_logits is not None and len(out.mtp_per_depth_logits) == depths
    for d in range(depths):
        print(f"mtp depth {d}/{depths}:", _assert_within(out.mtp_per_depth_logits[d], ref[d], _tol(spec)))
    if depths == 2:  # the transcription can tell a non-cumulative shift apart
        wrong, _ = reference_mtp_logits(h0, ids, w, spec, cumulative=False)
        assert _stats(out.mtp_per_depth_logits[1], wrong[1])["max_abs"] > 100 * _tol(spec).max_abs
