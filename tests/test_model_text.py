"""The PyTorch text model on m3-tiny: shapes, dtypes, init, MSA selection, export-friendliness, checkpoint I/O."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from conftest import spec_variant
from parityhelp import dense_causal_msa, dropped_pairs
from safetensors.torch import load_file, save_file

from m3export.errors import CheckpointError
from m3export.model.attention import M3Attention, select_blocks
from m3export.model.checkpoint import hf_to_native, load_checkpoint, native_to_hf, save_checkpoint
from m3export.model.init import init_weights
from m3export.model.moe import SparseMoeBlock, build_moe_config
from m3export.model.norm import GemmaRMSNorm
from m3export.model.text import M3ForCausalLM
from m3export.spec import M3Spec, SparseAttentionSpec


@pytest.fixture(scope="module")
def model(tiny_text_spec: M3Spec) -> M3ForCausalLM:
    return M3ForCausalLM.from_config(tiny_text_spec)


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _with_dtype(spec: M3Spec, dtype: str) -> M3Spec:
    """The spec with its graphs (and so its eager model) in `dtype`; tolerances re-defaulted for it."""
    data = spec.model_dump(mode="json")
    data["export"]["precision"]["dtype"] = dtype
    data.pop("tolerances")
    return M3Spec.model_validate(data)


@torch.no_grad()
def test_forward_shapes_and_input_paths(model: M3ForCausalLM, tiny_text_spec: M3Spec) -> None:
    ids = _ids(2, 20)
    out = model(ids)
    assert out.logits.shape == (2, 20, 1024) and out.hidden_states.shape == (2, 20, 128)
    assert out.mtp_per_depth_logits is not None and [t.shape for t in out.mtp_per_depth_logits] == [
        (2, 20, 1024)
    ]
    assert list(model.model.layers.keys()) == ["0", "1", "2", "3"]
    pos = torch.arange(20)[None].expand(2, 20)
    assert torch.equal(model(ids, position_ids=pos).logits, out.logits)
    by_embeds = model(inputs_embeds=model.model.embed_tokens(ids))
    assert torch.equal(by_embeds.logits, out.logits) and by_embeds.mtp_per_depth_logits is None
    assert torch.equal(
        model.model.mtp_logits(out.hidden_states, ids, model.lm_head)[0], out.mtp_per_depth_logits[0]
    )
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=by_embeds.hidden_states)
    assert build_moe_config(tiny_text_spec.text).top_k == 2


@torch.no_grad()
def test_bfloat16_runs_and_tracks_float32(model: M3ForCausalLM, tiny_text_spec: M3Spec) -> None:
    bf = M3ForCausalLM.from_config(_with_dtype(tiny_text_spec, "bfloat16"))
    moe = bf.model.layers["1"].block_sparse_moe
    assert bf.lm_head.weight.dtype == torch.bfloat16
    # Selection-sensitive tensors stay fp32 (§2.7), also through a later cast of the model.
    assert moe.gate.weight.dtype == moe.e_score_correction_bias.dtype == torch.float32
    assert (
        bf.to(torch.bfloat16).model.layers["1"].block_sparse_moe.e_score_correction_bias.dtype
        == torch.float32
    )
    ids = _ids(2, 64)
    got, want = bf(ids).logits, model(ids).logits
    assert got.dtype == torch.bfloat16 and got.isfinite().all()
    cos = torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1)
    assert cos.min() > 0.99, cos.min()


def test_init_is_deterministic_and_per_tensor(model: M3ForCausalLM, tiny_text_spec: M3Spec) -> None:
    same = M3ForCausalLM.from_config(tiny_text_spec)
    other = M3ForCausalLM.from_config(tiny_text_spec, seed=1)
    # Built on meta, materialised, then initialised: per-name seeding gives the same tensors.
    late = M3ForCausalLM.from_config(tiny_text_spec, device="meta").to_empty(device="cpu")
    init_weights(late, tiny_text_spec.weights.random.seed)  # type: ignore[union-attr]
    ref = model.state_dict()
    for name, t in ref.items():
        assert torch.equal(t, same.state_dict()[name]), name
        assert torch.equal(t, late.state_dict()[name]), name
        assert not torch.equal(t, other.state_dict()[name]), name


def test_init_is_not_degenerate(model: M3ForCausalLM) -> None:
    norms = [m.weight for m in model.modules() if isinstance(m, GemmaRMSNorm)]
    # final + 5 blocks (4 layers, MTP) x in/post/q/k + 4 MSA blocks x index q/k + MTP e/h/final
    assert len(norms) == 1 + 5 * 4 + 4 * 2 + 3
    assert all(0.05 < w.std() < 0.2 for w in norms)
    sd = model.state_dict()
    assert abs(sd["model.embed_tokens.weight"].std() - 1.0) < 0.02
    lm = sd["lm_head.weight"]
    # trunc-normal at ±3σ: std ≈ 0.986σ, nothing beyond 3σ
    assert abs(lm.std() / 128**-0.5 - 0.986) < 0.02 and lm.abs().max() <= 3 * 128**-0.5
    assert abs(sd["model.layers.0.self_attn.q_proj.weight"].std() - 0.02) < 0.002
    assert all(
        bool(torch.all(m.e_score_correction_bias != 0))
        for m in model.modules()
        if isinstance(m, SparseMoeBlock)
    )


@torch.no_grad()
def test_correction_bias_changes_selection(model: M3ForCausalLM) -> None:
    """The init's correction bias changes the top-k for a good fraction of tokens in every MoE layer."""
    seen: list[tuple[SparseMoeBlock, torch.Tensor]] = []
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    hooks = [b.register_forward_pre_hook(lambda mod, a: seen.append((mod, a[0]))) for b in blocks]
    model(_ids(2, 64))
    for h in hooks:
        h.remove()
    assert len(seen) == 4  # 3 MoE layers + the MTP block
    for moe, x in seen:
        s = torch.sigmoid(x.reshape(-1, 128).float() @ moe.gate.weight.float().t())
        k = moe.cfg.top_k
        plain = torch.topk(s, k).indices.sort(-1).values
        biased = torch.topk(s + moe.e_score_correction_bias, k).indices.sort(-1).values
        frac = (plain != biased).any(-1).float().mean().item()
        assert frac > 0.3, frac


def _dense_vs_sparse(model: M3ForCausalLM, seq: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, float]:
    """(causal pairs MSA dropped, max |logits(MSA) - logits(dense causal)|) on one batch."""
    ids = _ids(2, seq, seed=seq)
    dropped = sum(dropped_pairs(model, ids))
    with torch.no_grad():
        sparse = model(ids).logits
        with monkeypatch.context() as mp:
            mp.setattr(M3Attention, "msa_attention", dense_causal_msa)
            dense = model(ids).logits
    return dropped, (sparse - dense).abs().max().item()


@pytest.mark.parametrize("seq", [1, 5, 8, 16])
def test_msa_is_dense_causal_up_to_topk_blocks(
    model: M3ForCausalLM, seq: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped, diff = _dense_vs_sparse(model, seq, monkeypatch)  # seq <= topk·block = 16
    # Every causal block is read: equal up to fp32 summation order (gathered vs dense kernels).
    assert dropped == 0 and diff <= 1e-5


@pytest.mark.parametrize("seq", [17, 40, 64])
def test_msa_drops_blocks_beyond_topk_blocks(
    model: M3ForCausalLM, seq: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped, diff = _dense_vs_sparse(model, seq, monkeypatch)
    assert dropped > 0 and diff > 1e-3


def _brute_force_selection(scores: torch.Tensor, pos: torch.Tensor, sa: SparseAttentionSpec) -> torch.Tensor:
    """Python-loop transcription of §2.4 steps 7-8 (HF local-block semantics, §10.5)."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    for b, g, i in itertools.product(*(range(n) for n in scores.shape[:3])):
        qb = int(pos[b, i]) // sa.sparse_block_size
        cands = list(range(min(qb + 1, scores.shape[-1])))
        forced = {c for c in cands if c > qb - sa.sparse_local_block or c < sa.sparse_init_block}
        ranked = sorted(cands, key=lambda c: (c not in forced, -scores[b, g, i, c].item()))
        out[b, g, i, ranked[: sa.sparse_topk_blocks]] = True
    return out


@pytest.mark.parametrize(("topk", "local", "init"), [(2, 1, 0), (3, 1, 0), (3, 2, 0), (3, 1, 1), (4, 2, 1)])
def test_select_blocks_matches_brute_force(topk: int, local: int, init: int) -> None:
    sa = SparseAttentionSpec(
        sparse_block_size=4, sparse_topk_blocks=topk, sparse_num_index_heads=2, sparse_index_dim=8,
        sparse_init_block=init, sparse_local_block=local, sparse_attention_freq=[1], sparse_disable_index_value=[1],
    )  # fmt: skip
    g = torch.Generator().manual_seed(topk * 10 + local + init)
    pos = torch.stack(
        [torch.arange(30), torch.arange(30) + 7]
    )  # second row: a chunk that starts at position 7
    scores = torch.randn(2, 2, 30, 10, generator=g)
    got = select_blocks(scores, pos, sa)
    assert torch.equal(got, _brute_force_selection(scores, pos, sa))
    assert (got.sum(-1) <= topk).all()


def test_export_with_dynamic_sequence(model: M3ForCausalLM) -> None:
    """No data-dependent control flow or host syncs: torch.export with a dynamic sequence length, run at
    lengths other than the trace length (shorter than one block and longer than topk·block)."""
    import torch.fx.experimental._config as fx_config

    class Logits(torch.nn.Module):
        def __init__(self, m: M3ForCausalLM) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.m(ids)
            return out.logits, out.mtp_per_depth_logits[0]

    seq = torch.export.Dim("seq", min=2, max=1024)
    # Sizes derived from seq (number of key blocks) would otherwise be specialised to >= 2 by
    # contiguity checks on freshly allocated tensors.
    with fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
        ep = torch.export.export(Logits(model), (_ids(2, 40),), dynamic_shapes=({1: seq},), strict=False)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum(t == "m3.moe.default" for t in targets) == 4  # 3 MoE layers + MTP block, one node each
    assert not any("local_scalar_dense" in t or "nonzero" in t for t in targets)
    with torch.no_grad():
        for s in (5, 77):
            ids = _ids(2, s, seed=s)
            got, want = ep.module()(ids), Logits(model)(ids)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# checkpoint I/O


def test_checkpoint_layout_and_round_trip(
    model: M3ForCausalLM, tiny_text_spec: M3Spec, tmp_path: Path
) -> None:
    save_checkpoint(model, tiny_text_spec, tmp_path)
    disk = load_file(tmp_path / "model.safetensors")
    assert (tmp_path / "config.json").is_file()
    t = tiny_text_spec.text
    p = "model.layers.1.block_sparse_moe."
    assert disk[p + "experts.7.w1.weight"].shape == (t.intermediate_size, t.hidden_size)
    assert disk[p + "experts.7.w3.weight"].shape == (t.intermediate_size, t.hidden_size)
    assert disk[p + "experts.7.w2.weight"].shape == (t.hidden_size, t.intermediate_size)
    assert disk[p + "e_score_correction_bias"].dtype == torch.float32
    assert "model.mtp.layers.0.transformer_layer.self_attn.index_q_proj.weight" in disk
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in disk)
    stacked = model.state_dict()[p + "experts.gate_up_proj"]
    assert torch.equal(disk[p + "experts.3.w3.weight"], stacked[3, t.intermediate_size :])

    loaded = M3ForCausalLM.from_pretrained(tmp_path, spec=tiny_text_spec)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_key_conversion_is_a_bijection(model: M3ForCausalLM) -> None:
    native = model.state_dict()
    for vl in (False, True):
        hf = native_to_hf(native, vl=vl)
        assert all(k.startswith("language_model.") for k in hf) == vl
        back, skipped = hf_to_native({**hf, "vision_tower.x": torch.zeros(1)} if vl else hf, vl=vl)
        assert skipped == (["vision_tower.x"] if vl else [])
        assert back.keys() == native.keys() and all(torch.equal(back[k], native[k]) for k in native)


def _write(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def test_load_checkpoint_errors(model: M3ForCausalLM, tiny_text_spec: M3Spec, tmp_path: Path) -> None:
    hf = native_to_hf(model.state_dict(), vl=False)
    target = M3ForCausalLM.from_config(tiny_text_spec)
    gap = {k: v for k, v in hf.items() if k != "model.layers.2.block_sparse_moe.experts.5.w3.weight"}
    with pytest.raises(CheckpointError, match=r"experts\.5: missing w3"):
        load_checkpoint(target, _write(gap, tmp_path / "a.safetensors"))
    extra = {**hf, "model.layers.0.self_attn.index_q_proj.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="1 unexpected"):
        load_checkpoint(target, _write(extra, tmp_path / "b.safetensors"))
    wrong = {k: (v[:-1] if k == "lm_head.weight" else v) for k, v in hf.items()}
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(target, _write(wrong, tmp_path / "c.safetensors"))
    # A model without MTP passes over a checkpoint's MTP tensors and says so (§3.4).
    no_mtp = M3ForCausalLM.from_config(spec_variant(tiny_text_spec, num_mtp_modules=0))
    report = load_checkpoint(no_mtp, _write(hf, tmp_path / "d.safetensors"))
    assert report.skipped and all(k.startswith("model.mtp.") for k in report.skipped)
    assert torch.equal(no_mtp.lm_head.weight, model.lm_head.weight)
