"""M3 text backbone: decoder layer, text model, causal-LM head (m3-architecture.md §2.1-2.2, §3).

Parameter names are the HF checkpoint keys of §6.1 (text-only layout `model.*` / `lm_head.*`)
except for the stacked routed experts (docs/design.md). The forward has no data-dependent Python
control flow, so it traces and exports as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from m3export.model.attention import KVCache, M3Attention, causal_keep
from m3export.model.checkpoint import load_checkpoint, resolve_pretrained
from m3export.model.init import init_weights, to_spec_dtypes
from m3export.model.moe import SparseMoeBlock, SwiGLUMLP, build_moe_config, quantise_experts
from m3export.model.mtp import MTP, MTPDepth, mtp_forward, shift_left
from m3export.model.norm import GemmaRMSNorm
from m3export.model.rope import rope_cos_sin
from m3export.spec.models import M3Spec, TextSpec


class M3CausalLMOutput(NamedTuple):
    """logits [B, S, V]; per-depth MTP logits (None without MTP or input_ids); post-norm hidden [B, S, H];
    the KV cache of every decoder layer after this forward (past + these positions)."""

    logits: Tensor
    mtp_per_depth_logits: list[Tensor] | None
    hidden_states: Tensor
    past_key_values: list[KVCache] | None = None


class TextModelOutput(NamedTuple):
    """Post-final-norm hidden states [B, S, H] and the per-layer caches (past + these positions)."""

    hidden_states: Tensor
    past_key_values: list[KVCache]


class DecoderLayer(nn.Module):
    """Pre-norm block: x += attn(norm(x)); x += ffn(norm(x)) (§2.2). FFN is `mlp` or `block_sparse_moe`."""

    def __init__(self, text: TextSpec, *, moe: bool, sparse: bool) -> None:
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(text.hidden_size, text.rms_norm_eps)
        self.self_attn = M3Attention(text, sparse=sparse)
        self.post_attention_layernorm = GemmaRMSNorm(text.hidden_size, text.rms_norm_eps)
        self.is_moe = moe
        if moe:
            self.block_sparse_moe = SparseMoeBlock(text)
        else:
            self.mlp = SwiGLUMLP(text.hidden_size, text.dense_intermediate_size, build_moe_config(text))

    @classmethod
    def for_layer(cls, text: TextSpec, layer: int) -> DecoderLayer:
        """The decoder layer at global index `layer`, with its dense/MoE and full/MSA flags (§1.1)."""
        return cls(text, moe=text.is_moe_layer(layer), sparse=text.is_sparse_layer(layer))

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        position_ids: Tensor,
        causal: Tensor,
        past: KVCache | None = None,
    ) -> tuple[Tensor, KVCache]:
        """x [B, S, H] -> [B, S, H] and this layer's cache; cos/sin from `rope_cos_sin`, causal from
        `causal_keep` over the P cached + S new key slots."""
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, position_ids, causal, past)
        x = x + a
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        return x + ffn(self.post_attention_layernorm(x)), present


def cache_len(past: KVCache | None) -> int:
    """Number of cached positions (0 without a cache); symbolic under export."""
    return 0 if past is None else past.key.shape[2]


def default_position_ids(batch: int, seq: int, device: torch.device) -> Tensor:
    """arange(S) per row, [B, S] (§2.1.2)."""
    return torch.arange(seq, device=device)[None, :].expand(batch, seq)


class M3TextModel(nn.Module):
    """Embedding, decoder layers (ModuleDict keyed "0".."N-1"), final norm and optional MTP depths."""

    def __init__(self, text: TextSpec) -> None:
        super().__init__()
        self.text = text
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer.for_layer(text, i) for i in range(text.num_hidden_layers)}
        )
        self.norm = GemmaRMSNorm(text.hidden_size, text.rms_norm_eps)
        if text.num_mtp_modules:
            # The MTP block is always MoE + MSA (Automodel builds it as the last layer, §3.1).
            sparse = text.uses_sparse_attention
            depths = [
                MTPDepth(text.hidden_size, text.rms_norm_eps, DecoderLayer(text, moe=True, sparse=sparse))
                for _ in range(text.num_mtp_modules)
            ]
            self.mtp = MTP(depths)

    def layer_inputs(self, position_ids: Tensor, past_len: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """RoPE cos/sin (fp32) and the causal keep mask over past_len + S key slots, shared by every layer."""
        cos, sin = rope_cos_sin(position_ids, self.text.rotary_dim, self.text.rope_theta)
        return cos, sin, causal_keep(position_ids, past_len + position_ids.shape[1])

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: list[KVCache] | None = None,
    ) -> TextModelOutput:
        """Post-final-norm hidden states [B, S, H] and the caches. Give exactly one of input_ids [B, S] or
        inputs_embeds. With `past_key_values` (one per layer, P positions) `position_ids` must be given."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            if past_key_values is not None:
                raise ValueError("position_ids are required with past_key_values")
            position_ids = default_position_ids(x.shape[0], x.shape[1], x.device)
        past: list[KVCache | None] = (
            list(past_key_values) if past_key_values is not None else [None] * len(self.layers)
        )
        cos, sin, causal = self.layer_inputs(position_ids, cache_len(past[0]))
        presents: list[KVCache] = []
        for layer, layer_past in zip(self.layers.values(), past, strict=True):
            x, present = layer(x, cos, sin, position_ids, causal, layer_past)
            presents.append(present)
        return TextModelOutput(self.norm(x), presents)

    def mtp_logits(
        self, hidden_states: Tensor, input_ids: Tensor, lm_head: nn.Module, position_ids: Tensor | None = None
    ) -> list[Tensor]:
        """Per-depth MTP logits [B, S, V] from the post-norm hidden states (§3.2, training semantics: the
        ids are shifted inside, the vacated tail is token 0); [] without MTP."""
        if not self.text.num_mtp_modules:
            return []
        if position_ids is None:
            position_ids = default_position_ids(input_ids.shape[0], input_ids.shape[1], input_ids.device)
        return self.mtp_step(hidden_states, shift_left(input_ids), lm_head, position_ids)[0]

    def mtp_step(
        self,
        hidden_states: Tensor,
        next_ids: Tensor,
        lm_head: nn.Module,
        position_ids: Tensor,
        past: list[KVCache] | None = None,
        lookahead_ids: Tensor | None = None,
    ) -> tuple[list[Tensor], list[KVCache]]:
        """MTP with a cache (§3.4): position i combines h_i with the embedding of `next_ids[:, i]` (the
        token after position i); depth d reads the ids d further on, taking the last d from
        `lookahead_ids` [B, D-1] (the tokens after this chunk; zeros when unknown, as in training).
        Returns per-depth logits and each depth's cache (past + these positions)."""
        depths = len(self.mtp.layers)
        past_list: list[KVCache | None] = list(past) if past is not None else [None] * depths
        if lookahead_ids is None:
            lookahead_ids = next_ids.new_zeros(next_ids.shape[0], depths - 1)
        ids = torch.cat((next_ids, lookahead_ids), dim=1)
        cos, sin, causal = self.layer_inputs(position_ids, cache_len(past_list[0]))
        presents: list[KVCache] = []

        def run_layer(depth: int, layer: nn.Module, x: Tensor) -> Tensor:
            out, present = layer(x, cos, sin, position_ids, causal, past_list[depth])
            presents.append(present)
            return out

        return mtp_forward(self.mtp, hidden_states, ids, self.embed_tokens, lm_head, run_layer), presents


class M3ForCausalLM(nn.Module):
    """M3 text model plus the untied `lm_head` (§2.1.3)."""

    def __init__(self, text: TextSpec) -> None:
        super().__init__()
        self.model = M3TextModel(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)

    @classmethod
    def from_config(
        cls, spec: M3Spec, device: str | torch.device | None = None, *, seed: int | None = None
    ) -> M3ForCausalLM:
        """Build in the spec's dtype. On "meta" nothing is initialised; otherwise a deterministic
        random init from `seed`, else `spec.weights.random.seed`, else 0 (m3export.model.init)."""
        device = torch.device(device or "cpu")
        with device:
            model = cls(spec.text)
        if device.type != "meta":
            if seed is None:
                seed = spec.weights.random.seed if spec.weights.random is not None else 0
            init_weights(model, seed)
        to_spec_dtypes(model, spec, random=device.type != "meta")
        return model.eval()

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | M3Spec,
        *,
        spec: M3Spec | None = None,
        device: str | torch.device | None = None,
    ) -> M3ForCausalLM:
        """Load an HF-layout checkpoint directory (§6.1). `source` is the directory, or a spec whose
        `weights.checkpoint` names it; `spec` overrides the architecture read from config.json."""

        spec, path = resolve_pretrained(source, spec)
        model = cls.from_config(spec, device="meta").to_empty(device=device or "cpu")
        load_checkpoint(model, path)
        quantise_experts(model, spec.export.precision)
        return model.eval()

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: list[KVCache] | None = None,
    ) -> M3CausalLMOutput:
        """Logits [B, S, V], MTP logits per depth (when MTP exists, input_ids are given and there is no
        cache: the training semantics of §3.2), hidden [B, S, H] and the per-layer caches."""
        out = self.model(
            input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, past_key_values=past_key_values
        )
        mtp = None
        if input_ids is not None and past_key_values is None and self.model.text.num_mtp_modules:
            mtp = self.model.mtp_logits(out.hidden_states, input_ids, self.lm_head, position_ids)
        return M3CausalLMOutput(self.lm_head(out.hidden_states), mtp, out.hidden_states, out.past_key_values)
