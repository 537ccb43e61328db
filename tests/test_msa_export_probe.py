"""Probe: does MSA block selection (m3-architecture.md §2.4), written the way the model will write
it, export with dynamic batch and seq at opset 23 and run in onnxruntime like eager?

`msa_keep_mask` is a standalone transcription for this probe; the model's own implementation lives
in m3export/model/attention.py. Small geometry (block 4, top-k 3) so that dropping starts at 13 tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3export.export import OnnxArtifact, export_onnx

BLOCK, TOPK = 4, 3
HEADS, GROUPS, HEAD_DIM, INDEX_DIM = 4, 2, 8, 8
TRACE = (2, 22)  # (batch, seq): sparse regime, seq not a multiple of BLOCK
DENSE_SEQS = (1, 5, 12)  # seq ≤ TOPK·BLOCK: MSA is exactly causal attention
SPARSE_SEQS = (13, 29, 64)  # blocks are dropped (64 ≥ 2·TOPK·BLOCK)


DYNAMIC_AXES = {
    **{n: {0: "batch", 2: "seq"} for n in ("q", "k", "v")},
    **{n: {0: "batch", 1: "seq"} for n in ("iq", "ik", "position_ids")},
}


def msa_keep_mask(iq: Tensor, ik: Tensor, position_ids: Tensor, block: int, topk: int) -> Tensor:
    """§2.4 selection → boolean keep mask [B, G, S, S] (True = attend).

    iq [B, S, G, Di] and ik [B, S, Di] are the normed, rotated index queries/keys; key j is key
    slot j, query i sits at position_ids[b, i]. TopK has a static k: the block axis is right-padded
    with `topk` -inf columns, and -inf picks (non-candidates) are dropped afterwards.
    """
    bsz, seq, groups, index_dim = iq.shape
    neg_inf, pos_inf = float("-inf"), float("inf")
    # MatMul rather than einsum: the exporter keeps einsum as an ONNX Einsum node, which TensorRT
    # handles only for some equations.
    scores = iq.float().transpose(1, 2) @ ik.float()[:, None].transpose(-1, -2) / math.sqrt(index_dim)
    key_slot = torch.arange(seq, device=iq.device)
    causal = key_slot[None, None, :] <= position_ids[:, :, None]  # [B, S, S]
    scores = scores.masked_fill(~causal[:, None], neg_inf)

    num_blocks = (seq + block - 1) // block
    scores = F.pad(scores, (0, num_blocks * block - seq), value=neg_inf)
    block_scores = scores.reshape(bsz, groups, seq, num_blocks, block).amax(dim=-1)  # [B, G, S, nb]

    block_ids = torch.arange(num_blocks, device=iq.device)
    own_block = (position_ids // block)[:, None, :, None]  # [B, 1, S, 1]
    block_scores = block_scores.masked_fill(block_ids > own_block, neg_inf)
    block_scores = block_scores.masked_fill(block_ids == own_block, pos_inf)

    padded = F.pad(block_scores, (0, topk), value=neg_inf)  # nb + topk ≥ topk: static k is valid
    top_vals, top_idx = padded.topk(topk, dim=-1)
    chosen = torch.zeros_like(padded, dtype=torch.bool).scatter(-1, top_idx, top_vals > neg_inf)
    chosen = chosen[..., :num_blocks]

    keep = chosen[..., key_slot // block]  # [B, G, S, S]: block of each key
    return keep & causal[:, None]


class MsaProbe(nn.Module):
    """GQA attention whose boolean mask comes from MSA selection (the indexer projections omitted)."""

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, iq: Tensor, ik: Tensor, position_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        keep = msa_keep_mask(iq, ik, position_ids, BLOCK, TOPK)  # [B, G, S, S]
        rep = q.shape[1] // k.shape[1]
        mask = keep.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), attn_mask=mask
        )
        return out, keep.to(torch.int8)


def _inputs(batch: int, seq: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(batch, HEADS, seq, HEAD_DIM, generator=g),
        "k": torch.randn(batch, GROUPS, seq, HEAD_DIM, generator=g),
        "v": torch.randn(batch, GROUPS, seq, HEAD_DIM, generator=g),
        "iq": torch.randn(batch, seq, GROUPS, INDEX_DIM, generator=g),
        "ik": torch.randn(batch, seq, INDEX_DIM, generator=g),
        "position_ids": torch.arange(seq).expand(batch, seq).contiguous(),
    }


def _reference_keep(x: dict[str, Tensor]) -> np.ndarray:
    """Loop transcription of §2.4 steps 5-9 in float64 (independent of the vectorised version)."""
    iq, ik = x["iq"].double().numpy(), x["ik"].double().numpy()
    bsz, seq, groups, _ = iq.shape
    keep = np.zeros((bsz, groups, seq, seq), dtype=bool)
    for b in range(bsz):
        for g in range(groups):
            for i in range(seq):
                own = i // BLOCK
                best = [
                    max(iq[b, i, g] @ ik[b, j] for j in range(blk * BLOCK, min((blk + 1) * BLOCK, i + 1)))
                    for blk in range(own)
                ]
                picked = {own, *sorted(range(own), key=lambda blk: -best[blk])[: TOPK - 1]}
                for j in range(i + 1):
                    keep[b, g, i, j] = j // BLOCK in picked
    return keep


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> OnnxArtifact:
    return export_onnx(
        MsaProbe().eval(),
        _inputs(*TRACE, seed=0),
        tmp_path_factory.mktemp("msa") / "msa.onnx",
        output_names=["attn_out", "keep"],
        dynamic_axes=DYNAMIC_AXES,
        opset=23,
    )


def test_seq_traced_at_one_is_rejected(tmp_path: Path) -> None:
    """torch 2.13 specialises a dynamic dim traced at size 1 without any error; export_onnx catches it."""
    with pytest.raises(ValueError, match=r"'seq'.*came out static"):
        export_onnx(
            MsaProbe().eval(),
            _inputs(2, 1, seed=0),
            tmp_path / "s1.onnx",
            output_names=["attn_out", "keep"],
            dynamic_axes=DYNAMIC_AXES,
            opset=23,
        )


def test_selection_transcription_matches_loop_reference() -> None:
    for seq in (*DENSE_SEQS, *SPARSE_SEQS):
        x = _inputs(2, seq, seed=seq)
        got = msa_keep_mask(x["iq"], x["ik"], x["position_ids"], BLOCK, TOPK).numpy()
        np.testing.assert_array_equal(got, _reference_keep(x), err_msg=f"seq={seq}")


def test_msa_graph_is_standard_and_uses_attention(exported: OnnxArtifact) -> None:
    model = onnx.load(exported.path, load_external_data=False)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert exported.node_counts.get("Attention") == 1
    assert exported.node_counts.get("TopK") == 1
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims[0] == ["batch", HEADS, "seq", HEAD_DIM]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seq", [*DENSE_SEQS, *SPARSE_SEQS])
def test_msa_ort_matches_eager(exported: OnnxArtifact, batch: int, seq: int) -> None:
    x = _inputs(batch, seq, seed=100 * batch + seq)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(exported.path), opts, providers=["CPUExecutionProvider"])
    got_out, got_keep = sess.run(["attn_out", "keep"], {n: t.numpy() for n, t in x.items()})
    with torch.no_grad():
        want_out, want_keep = MsaProbe()(**x)
    np.testing.assert_array_equal(got_keep, want_keep.numpy())
    causal = np.tril(np.ones((seq, seq), dtype=np.int8))
    if seq <= TOPK * BLOCK:
        assert (got_keep == causal).all(), "dense regime must be exactly causal"
    else:
        dropped = int((causal - got_keep).sum())
        assert dropped > 0, "sparse regime must drop blocks"
    np.testing.assert_allclose(got_out, want_out.numpy(), atol=1e-5, rtol=0)
