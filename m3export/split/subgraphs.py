"""Subgraph modules with explicit named inputs and outputs, cut from a full model by the stage plan.

Each wrapper holds references to the owned submodules of the full model (no copies), so the
chained subgraphs compute exactly what the full model computes (parity step a). Forwards take
their tensors positionally, in the plan's input order (`export_onnx` names the graph inputs).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from m3export.model.attention import KVCache
from m3export.model.splice import splice_features
from m3export.model.text import M3ForCausalLM, cache_len
from m3export.split.plan import HIDDEN_PREFIX, SubgraphPlan


class VisionStage(nn.Module):
    """(pixel_values, vision_cos, vision_sin, vision_segment_ids) -> image_features (§4.5); run once
    for the images and once for the videos of a prompt (its output then feeds `video_features`)."""

    def __init__(self, vl: Any, plan: SubgraphPlan) -> None:  # M3ForConditionalGeneration
        super().__init__()
        self.plan = plan
        self.vl = vl

    def forward(
        self, pixel_values: Tensor, vision_cos: Tensor, vision_sin: Tensor, vision_segment_ids: Tensor
    ) -> tuple[Tensor]:
        return (self.vl.vision_features(pixel_values, vision_cos, vision_sin, vision_segment_ids),)


def _cache(inputs: dict[str, Tensor], layer: str) -> KVCache:
    """The `past.{layer}.*` inputs as one layer's cache (index_key only for sparse layers)."""
    return KVCache(
        inputs[f"past.{layer}.key"], inputs[f"past.{layer}.value"], inputs.get(f"past.{layer}.index_key")
    )


def _present(layer: str, cache: KVCache) -> list[Tensor]:
    """One layer's `present.{layer}.*` outputs, in the plan's order (key, value, index_key?)."""
    return [cache.key, cache.value] + ([] if cache.index_key is None else [cache.index_key])


class _NamedInputs(nn.Module):
    """Base of the text/MTP wrappers: `forward(*tensors)` in the plan's input order (graph input names
    such as `past.3.key` are not Python identifiers); `run(inputs)` gets them by name."""

    plan: SubgraphPlan

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return self.run(dict(zip(self.plan.input_names, tensors, strict=True)))

    def run(self, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        raise NotImplementedError


class TextStage(_NamedInputs):
    """Text layers [start, end) with their KV caches; stage 0 adds embedding + splice, the last adds
    norm + lm_head. One graph serves prefill (past_seq 0) and decode."""

    def __init__(self, lm: M3ForCausalLM, plan: SubgraphPlan, multimodal: Any = None) -> None:
        super().__init__()
        self.plan = plan
        text = lm.model
        self.first = "input_ids" in plan.input_names
        # The residual stream comes in as `hidden_states.{first layer}` (m3export.split.plan.boundary_sig).
        self.hidden_in = next((n for n in plan.input_names if n.startswith(HIDDEN_PREFIX)), None)
        self.last = "logits" in plan.output_names
        self.emit_final_hidden = "final_hidden_states" in plan.output_names
        # (input name, placeholder id) of the vision features stage 0 splices in (§4.5).
        self.splices = [
            (name, getattr(multimodal, f"{media}_token_index"))
            for media in ("image", "video")
            if (name := f"{media}_features") in plan.input_names
        ]
        self.embed_tokens = text.embed_tokens if self.first else None
        self.layers = nn.ModuleDict({str(i): text.layers[str(i)] for i in plan.layers})
        self.norm = text.norm if self.last else None
        self.lm_head = lm.lm_head if self.last else None
        self._layer_inputs = text.layer_inputs

    def run(self, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        position_ids = inputs["position_ids"]
        if self.first:
            assert self.embed_tokens is not None
            input_ids = inputs["input_ids"]
            x = self.embed_tokens(input_ids)
            for name, token_id in self.splices:
                x = splice_features(x, input_ids, inputs[name], token_id)
        else:
            assert self.hidden_in is not None
            x = inputs[self.hidden_in]
        caches = {name: _cache(inputs, name) for name in self.layers}
        cos, sin, causal = self._layer_inputs(position_ids, cache_len(next(iter(caches.values()))))
        presents: list[Tensor] = []
        for name, layer in self.layers.items():
            x, present = layer(x, cos, sin, position_ids, causal, caches[name])
            presents += _present(name, present)
        if not self.last:
            return (x, *presents)
        assert self.norm is not None and self.lm_head is not None
        h = self.norm(x)
        heads = (self.lm_head(h), h) if self.emit_final_hidden else (self.lm_head(h),)
        return (*heads, *presents)


class MTPStage(_NamedInputs):
    """MTP depths with their caches: (final_hidden_states, mtp_input_ids, position_ids, past.mtp.*) ->
    mtp_logits.{d}, present.mtp.* (§3.2, §3.4)."""

    def __init__(self, lm: M3ForCausalLM, plan: SubgraphPlan) -> None:
        super().__init__()
        self.plan = plan
        self.lm = lm

    def run(self, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        model = self.lm.model
        past = [_cache(inputs, f"mtp.{d}") for d in range(model.text.num_mtp_modules)]
        logits, presents = model.mtp_step(
            inputs["final_hidden_states"],
            inputs["mtp_input_ids"],
            self.lm.lm_head,
            inputs["position_ids"],
            past,
            inputs.get("mtp_lookahead_ids"),
        )
        return (*logits, *(t for d, c in enumerate(presents) for t in _present(f"mtp.{d}", c)))


# The wrapper of each subgraph kind, from the full eager model (VL or text-only) and the plan.
def _lm(model: nn.Module) -> Any:
    """The causal LM inside a VL model (`language_model`), or the text-only model itself."""
    return getattr(model, "language_model", model)


STAGE_OF_KIND: dict[str, Any] = {
    "vision": lambda model, plan: VisionStage(model, plan),
    "text": lambda model, plan: TextStage(_lm(model), plan, getattr(model, "multimodal", None)),
    "mtp": lambda model, plan: MTPStage(_lm(model), plan),
}


def build_stage(model: nn.Module, plan: SubgraphPlan) -> nn.Module:
    """The wrapper module of one planned subgraph; `model` is the full eager model (VL or text-only)."""
    return STAGE_OF_KIND[plan.kind](model, plan).eval()
