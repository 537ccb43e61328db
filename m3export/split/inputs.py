"""Golden cases, their inputs and the trace inputs of a build: what every parity step and `check` run on,
and the names of the case variants (the one place their spelling lives).

Trace shapes differ from every golden shape so that the exported graphs are validated at shapes other
than the ones they were traced at (export-notes §7); golden cases cover seq 12 (MSA == dense) and 40
(MSA drops blocks), batch 1 and 2, 0-2 images and a video (m3-architecture.md §2.4, §4.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from m3export.errors import InputError
from m3export.spec import M3Spec
from m3export.split.plan import HIDDEN_PREFIX, SubgraphPlan

# Trace shapes: batch and seq >= 2 and distinct from every other dim (the exporter specialises
# size-1 dims and dims that coincide); golden cases use other shapes so dynamic axes are exercised.
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 16, 5
TRACE_GRIDS: tuple[tuple[int, int, int], ...] = ((1, 4, 4), (1, 4, 8))  # 48 patches, 12 image tokens
TRACE_VIDEO = (2, 4, 4)  # 8 video tokens in row 0 after its 4 image tokens


# Case ids: a golden case `c` also has variants `c.decode` (its last one-token decode step through the
# cache) and `c.video` (the vision subgraph on its video); comparisons of a chained step run by backend
# B are labelled `c:B`. The chain names the vision subgraph's video feed `vision:video`.
DECODE_SUFFIX, VIDEO_SUFFIX = ".decode", ".video"


def decode_case(case: str) -> str:
    return case + DECODE_SUFFIX


def video_case(case: str) -> str:
    return case + VIDEO_SUFFIX


def base_case(case: str) -> str:
    """The golden case a variant or a labelled comparison belongs to: `c.decode`, `c:ort` -> `c`."""
    return case.split(":", 1)[0].split(".", 1)[0]


def labelled(case: str, backend: str) -> str:
    return f"{case}:{backend}"


def media_feed(subgraph: str, media: str) -> str:
    """The chain's feed name of a subgraph run on one medium: `vision` (images), `vision:video`."""
    return subgraph if media == "image" else f"{subgraph}:{media}"


@dataclass(frozen=True)
class GoldenCase:
    """One golden input: batch x seq tokens holding the placeholders of `grids` (one image each)."""

    name: str
    batch: int
    seq: int
    grids: tuple[tuple[int, int, int], ...] = ()
    video: tuple[int, int, int] | None = None  # one video's grid_thw, in row 0 after its images


def golden_cases(spec: M3Spec) -> list[GoldenCase]:
    """Seq 12 (MSA == dense) and seq 40 (MSA drops blocks with block 8 / top-2), batch 1 and 2,
    0 / 1 / 2 images and a video for a VL spec."""
    if not spec.is_vl:
        return [GoldenCase("b1_s12", 1, 12), GoldenCase("b2_s40", 2, 40), GoldenCase("b2_s12", 2, 12)]
    return [
        GoldenCase("b1_s12_img0", 1, 12),
        GoldenCase("b2_s12_img1", 2, 12, ((1, 2, 4),)),
        GoldenCase("b1_s40_img1", 1, 40, ((1, 4, 6),)),
        GoldenCase("b2_s40_img2", 2, 40, ((1, 4, 4), (1, 6, 4))),
        # 5 temporal patches: two attention segments of <= 4 (§4.6), 20 video tokens.
        GoldenCase("b2_s40_img1_vid1", 2, 40, ((1, 2, 4),), video=(5, 4, 4)),
    ]


def case_inputs(spec: M3Spec, case: GoldenCase, seed: int) -> dict[str, Tensor]:
    """input_ids / position_ids (+ vision inputs) of one case; placeholders sit in row order."""
    g = torch.Generator().manual_seed(seed)
    vocab = spec.text.vocab_size
    ids = torch.randint(3, min(vocab, 1000), (case.batch, case.seq), generator=g)
    if spec.multimodal is not None:  # keep random ids off the special placeholder ids
        mm = spec.multimodal
        ids[(ids == mm.image_token_index) | (ids == mm.video_token_index)] = 3
    out: dict[str, Tensor] = {}
    if case.grids:
        from m3export.model.vision_inputs import build_vision_inputs

        assert spec.vision is not None and spec.multimodal is not None
        vi = build_vision_inputs(list(case.grids), spec.vision)
        # Place image i's tokens in row i % batch, at offset 1 + (its rank in that row) * (tokens + 1).
        cursor = [1] * case.batch
        for i, n in enumerate(vi.num_tokens):
            row = i % case.batch
            if cursor[row] + n > case.seq:
                raise InputError(
                    f"golden case {case.name}: image {i} ({n} tokens) does not fit seq {case.seq}"
                )
            ids[row, cursor[row] : cursor[row] + n] = spec.multimodal.image_token_index
            cursor[row] += n + 1
        # Feature order is flattened batch-major: reorder images by (row, position).
        order = sorted(range(len(case.grids)), key=lambda i: (i % case.batch, i // case.batch))
        if order != list(range(len(case.grids))):
            vi = build_vision_inputs([case.grids[i] for i in order], spec.vision)
        out["pixel_values"] = torch.randn(vi.num_patches, spec.vision.patch_dim, generator=g).to(
            getattr(torch, spec.graph_dtype)
        )
        out["vision_cos"], out["vision_sin"] = vi.rope_cos, vi.rope_sin
        out["vision_segment_ids"] = vi.segment_ids
        out["image_grid_thw"] = torch.tensor([list(r) for r in vi.grid_thw])
        if case.video is not None:
            vv = build_vision_inputs([case.video], spec.vision)
            n = vv.num_tokens[0]
            if cursor[0] + n > case.seq:
                raise InputError(
                    f"golden case {case.name}: the video ({n} tokens) does not fit seq {case.seq}"
                )
            ids[0, cursor[0] : cursor[0] + n] = spec.multimodal.video_token_index
            out["pixel_values_videos"] = torch.randn(vv.num_patches, spec.vision.patch_dim, generator=g).to(
                getattr(torch, spec.graph_dtype)
            )
            out["video_cos"], out["video_sin"] = vv.rope_cos, vv.rope_sin
            out["video_segment_ids"] = vv.segment_ids
            out["video_grid_thw"] = torch.tensor([list(case.video)])
    out["input_ids"] = ids
    out["position_ids"] = torch.arange(case.seq)[None, :].expand(case.batch, case.seq).contiguous()
    return out


def to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy()


def trace_json() -> dict[str, Any]:
    return {
        "batch": TRACE_BATCH,
        "seq": TRACE_SEQ,
        "past_seq": TRACE_PAST,
        "grids": [list(g) for g in TRACE_GRIDS],
        "video": list(TRACE_VIDEO),
    }


def trace_inputs(spec: M3Spec, plan: SubgraphPlan) -> dict[str, Tensor]:
    """Random inputs at the trace shapes, named and typed as the plan's inputs."""
    g = torch.Generator().manual_seed(7)
    case = GoldenCase("trace", TRACE_BATCH, TRACE_SEQ, TRACE_GRIDS if spec.is_vl else (), TRACE_VIDEO)
    base = case_inputs(spec, case, seed=7)
    act = getattr(torch, spec.graph_dtype)
    n_img = (
        sum(t * h * w for t, h, w in TRACE_GRIDS) // (spec.vision.spatial_merge_size**2) if spec.vision else 0
    )
    h = spec.text.hidden_size
    extra = {
        "image_features": torch.randn(n_img, h, generator=g).to(act),
        "video_features": torch.randn(
            int((base["input_ids"] == (spec.multimodal.video_token_index if spec.multimodal else -1)).sum()),
            h,
            generator=g,
        ).to(act),
        "final_hidden_states": torch.randn(TRACE_BATCH, TRACE_SEQ, h, generator=g).to(act),
        "mtp_input_ids": base["input_ids"],
        "mtp_lookahead_ids": base["input_ids"][:, : max(spec.text.num_mtp_modules - 1, 0)],
    }
    # Positions continue after TRACE_PAST cached ones (a chunked-prefill call).
    base["position_ids"] = base["position_ids"] + TRACE_PAST
    sizes = {"batch": TRACE_BATCH, "past_seq": TRACE_PAST}
    for sig in plan.inputs:
        if sig.name.startswith(HIDDEN_PREFIX):  # a stage boundary `hidden_states.{layer}`
            extra[sig.name] = torch.randn(TRACE_BATCH, TRACE_SEQ, h, generator=g).to(act)
    for sig in plan.cache_inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in sig.dims]
        extra[sig.name] = torch.randn(*shape, generator=g).to(act)
    return {s.name: base[s.name] if s.name in base else extra[s.name] for s in plan.inputs}
