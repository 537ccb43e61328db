"""Analytic parameter counts and weight bytes of a spec, per module, without building anything.

The shapes are m3-architecture.md §6.1's (the native layout of m3export/model); a test pins these
counts to the built model's. Module paths are the stage plan's (`model.layers.3`, `lm_head`, ...,
under `language_model.` for a VL spec), so a subgraph's size is the sum over the modules it owns.
Bytes are at the spec dtype, except the router weight and the correction bias, which stay fp32 (§2.7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from m3export.spec.export import EXPERT_BITS
from m3export.spec.models import M3Spec, TextSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModuleSize:
    """Parameters (and persistent buffers) of one module and their bytes at the spec's dtypes."""

    parameters: int
    fp32_parameters: int  # of which are kept in fp32 whatever the dtype (router weight + bias)
    expert_parameters: int = 0  # of which are routed-expert weights (quantised with experts int8/int4)

    def nbytes(self, dtype: str, experts: str = "same", block: int = 32) -> int:
        """Bytes at `dtype`; with int8 / int4 `experts`, the routed experts as QMoE stores them:
        bits/8 bytes per weight plus one `dtype` scale per block (m3export/ops/quant.py)."""
        size = DTYPE_BYTES[dtype]
        dense = self.parameters - self.fp32_parameters
        if experts == "same":
            return dense * size + self.fp32_parameters * 4
        bits = EXPERT_BITS[experts]
        e = self.expert_parameters
        quantised = e * bits // 8 + e // block * size
        return (dense - e) * size + quantised + self.fp32_parameters * 4


def _attention(t: TextSpec, sparse: bool) -> int:
    h, d = t.hidden_size, t.head_dim
    n = h * t.num_attention_heads * d * 2 + h * t.num_key_value_heads * d * 2 + 2 * d  # q, o, k, v, norms
    if sparse:
        sa = t.sparse_attention_config
        assert sa is not None
        n += h * sa.sparse_num_index_heads * sa.sparse_index_dim + h * sa.sparse_index_dim
        n += 2 * sa.sparse_index_dim
    return n


def decoder_layer_size(t: TextSpec, *, moe: bool, sparse: bool) -> ModuleSize:
    """One decoder layer (§2.2): two norms, attention (+ indexer), dense MLP or MoE + shared expert."""
    h = t.hidden_size
    n = 2 * h + _attention(t, sparse)
    fp32 = experts = 0
    if moe:
        e = t.num_local_experts
        fp32 = e * h + e  # router weight + e_score_correction_bias
        experts = 3 * e * t.intermediate_size * h
        n += fp32 + experts
        n += 3 * h * t.shared_intermediate_size * t.n_shared_experts
    else:
        n += 3 * h * t.dense_intermediate_size
    return ModuleSize(n, fp32, experts)


def module_sizes(spec: M3Spec) -> dict[str, ModuleSize]:
    """Every top-level module of the model, by the stage plan's module path."""
    t = spec.text
    root = "language_model." if spec.is_vl else ""
    h = t.hidden_size
    out: dict[str, ModuleSize] = {f"{root}model.embed_tokens": ModuleSize(t.vocab_size * h, 0)}
    for i in range(t.num_hidden_layers):
        out[f"{root}model.layers.{i}"] = decoder_layer_size(
            t, moe=t.is_moe_layer(i), sparse=t.is_sparse_layer(i)
        )
    out[f"{root}model.norm"] = ModuleSize(h, 0)
    out[f"{root}lm_head"] = ModuleSize(t.vocab_size * h, 0)
    for d in range(t.num_mtp_modules):  # enorm, hnorm, eh_proj, final_layernorm + an MoE/MSA block (§3.1)
        block = decoder_layer_size(t, moe=True, sparse=t.uses_sparse_attention)
        out[f"{root}model.mtp.layers.{d}"] = ModuleSize(
            3 * h + 2 * h * h + block.parameters, block.fp32_parameters, block.expert_parameters
        )
    if spec.vision is not None and spec.multimodal is not None:
        v, ph = spec.vision, spec.multimodal.projector_hidden_size
        vh = v.hidden_size
        layer = 4 * (vh * vh + vh) + (vh * v.intermediate_size + v.intermediate_size)
        layer += v.intermediate_size * vh + vh + 4 * vh  # fc2, two LayerNorms
        vit = v.patch_dim * vh + 2 * vh + v.num_hidden_layers * layer  # patch embedding, pre-LN, layers
        out["vision_tower.vision_model"] = ModuleSize(vit, 0)
        out["multi_modal_projector"] = ModuleSize(vh * ph + ph + ph * h + h, 0)
        window = v.spatial_merge_size**2
        out["patch_merge_mlp"] = ModuleSize(window * h * ph + ph + ph * h + h, 0)
    return out


def total_parameters(spec: M3Spec) -> int:
    return sum(m.parameters for m in module_sizes(spec).values())


def weight_bytes(spec: M3Spec, modules: Sequence[str] | None = None) -> int:
    """Bytes of the named modules' weights at the spec dtype (all modules when None)."""
    return _bytes(spec, modules, "same")


def graph_weight_bytes(spec: M3Spec, modules: Sequence[str] | None = None) -> int:
    """Bytes of the named modules' weights in the exported graphs: `weight_bytes`, but the routed
    experts as export.precision.experts stores them (the eager model holds them dequantised)."""
    return _bytes(spec, modules, spec.export.precision.experts)


def _bytes(spec: M3Spec, modules: Sequence[str] | None, experts: str) -> int:
    sizes = module_sizes(spec)
    names = sizes if modules is None else modules
    block = spec.export.precision.block_size
    return sum(sizes[m].nbytes(spec.graph_dtype, experts, block) for m in names)
