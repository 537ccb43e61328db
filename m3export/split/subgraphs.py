"""Subgraph modules with explicit named inputs and outputs, cut from a full model by the stage plan.

Each wrapper holds references to the owned submodules of the full model (no copies), so the
chained subgraphs compute exactly what the full model computes (parity step a).
"""

from __future__ import annotations

from torch import Tensor, nn

from m3export.model.splice import splice_features
from m3export.model.text import M3ForCausalLM
from m3export.split.plan import SubgraphPlan


class TextStage(nn.Module):
    """Text layers [start, end); stage 0 adds embedding + splice, the last adds norm + lm_head."""

    def __init__(self, lm: M3ForCausalLM, plan: SubgraphPlan, image_token_index: int | None) -> None:
        super().__init__()
        self.plan = plan
        text = lm.model
        self.first = "input_ids" in plan.input_names
        self.last = "logits" in plan.output_names
        self.emit_final_hidden = "final_hidden_states" in plan.output_names
        self.image_token_index = image_token_index
        self.embed_tokens = text.embed_tokens if self.first else None
        self.layers = nn.ModuleDict({str(i): text.layers[str(i)] for i in plan.layers})
        self.norm = text.norm if self.last else None
        self.lm_head = lm.lm_head if self.last else None
        self._layer_inputs = text.layer_inputs

    def forward(self, **inputs: Tensor) -> tuple[Tensor, ...]:
        position_ids = inputs["position_ids"]
        if self.first:
            assert self.embed_tokens is not None
            x = self.embed_tokens(inputs["input_ids"])
            if self.image_token_index is not None:
                x = splice_features(x, inputs["input_ids"], inputs["image_features"], self.image_token_index)
        else:
            x = inputs["hidden_states"]
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

    def forward(self, final_hidden_states: Tensor, input_ids: Tensor, position_ids: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.lm.model.mtp_logits(final_hidden_states, input_ids, self.lm.lm_head, position_ids))
