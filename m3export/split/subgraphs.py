"""Subgraph modules with explicit named inputs and outputs, cut from a full model by the stage plan.

Each wrapper holds references to the owned submodules of the full model (no copies), so the
chained subgraphs compute exactly what the full model computes (parity step a). Forwards take
explicit keyword parameters named as the plan's graph inputs (torch.export binds them by name).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from m3export.model.splice import splice_features
from m3export.model.text import M3ForCausalLM
from m3export.split.plan import SubgraphPlan


class VisionStage(nn.Module):
    """(pixel_values, vision_cos, vision_sin, vision_segment_ids) -> image_features (§4.5)."""

    def __init__(self, vl: Any, plan: SubgraphPlan) -> None:  # M3ForConditionalGeneration
        super().__init__()
        self.plan = plan
        self.vl = vl

    def forward(
        self, pixel_values: Tensor, vision_cos: Tensor, vision_sin: Tensor, vision_segment_ids: Tensor
    ) -> tuple[Tensor]:
        return (self.vl.vision_features(pixel_values, vision_cos, vision_sin, vision_segment_ids),)


class TextStage(nn.Module):
    """Text layers [start, end); stage 0 adds embedding + splice, the last adds norm + lm_head."""

    def __init__(self, lm: M3ForCausalLM, plan: SubgraphPlan, image_token_index: int | None) -> None:
        super().__init__()
        self.plan = plan
        text = lm.model
        self.first = "input_ids" in plan.input_names
        self.last = "logits" in plan.output_names
        self.emit_final_hidden = "final_hidden_states" in plan.output_names
        self.image_token_index = image_token_index if "image_features" in plan.input_names else None
        self.embed_tokens = text.embed_tokens if self.first else None
        self.layers = nn.ModuleDict({str(i): text.layers[str(i)] for i in plan.layers})
        self.norm = text.norm if self.last else None
        self.lm_head = lm.lm_head if self.last else None
        self._layer_inputs = text.layer_inputs

    def forward(
        self,
        input_ids: Tensor | None = None,
        image_features: Tensor | None = None,
        hidden_states: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        assert position_ids is not None, "position_ids is a required input"
        if self.first:
            assert self.embed_tokens is not None and input_ids is not None
            x = self.embed_tokens(input_ids)
            if self.image_token_index is not None:
                assert image_features is not None
                x = splice_features(x, input_ids, image_features, self.image_token_index)
        else:
            assert hidden_states is not None
            x = hidden_states
        cos, sin, causal = self._layer_inputs(position_ids)
        for layer in self.layers.values():
            x = layer(x, cos, sin, position_ids, causal)
        if not self.last:
            return (x,)
        assert self.norm is not None and self.lm_head is not None
        h = self.norm(x)
        return (self.lm_head(h), h) if self.emit_final_hidden else (self.lm_head(h),)


class MTPStage(nn.Module):
    """MTP depths: (final_hidden_states, input_ids, position_ids) -> mtp_logits.{d} (§3.2)."""

    def __init__(self, lm: M3ForCausalLM, plan: SubgraphPlan) -> None:
        super().__init__()
        self.plan = plan
        self.lm = lm

    def forward(
        self, final_hidden_states: Tensor, input_ids: Tensor, position_ids: Tensor
    ) -> tuple[Tensor, ...]:
        return tuple(self.lm.model.mtp_logits(final_hidden_states, input_ids, self.lm.lm_head, position_ids))


def build_stage(model: nn.Module, plan: SubgraphPlan, image_token_index: int | None = None) -> nn.Module:
    """The wrapper module of one planned subgraph; `model` is the full eager model (VL or text-only)."""
    lm: Any = getattr(model, "language_model", model)
    if plan.kind == "vision":
        return VisionStage(model, plan).eval()
    if plan.kind == "text":
        return TextStage(lm, plan, image_token_index).eval()
    return MTPStage(lm, plan).eval()
