"""Deterministic, non-degenerate random init from a seed (m3-architecture.md §7, with two changes).

§7 as Automodel does it: linears trunc-normal std 0.02, router and experts normal std 0.02,
embed_tokens N(0, 1), lm_head trunc-normal std H^-0.5 cut at ±3σ. Two deliberate departures, so
that parity tests exercise every tensor: Gemma norm weights get N(0, 0.1) instead of 0 (a zero
weight hides a missing "1 +" or a wrong norm axis), and `e_score_correction_bias` gets values
on the scale of the router's sigmoid scores instead of 0, so the bias changes expert selection
(a zero bias hides a routing that ignores it).

Each tensor is drawn from its own generator seeded by (seed, parameter name), so a tensor's values
do not depend on module order, on which other modules exist, or on the device/dtype of the model.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor, nn

from m3export.model.attention import M3Attention
from m3export.model.moe import Router, SparseMoeBlock, StackedExperts, SwiGLUMLP
from m3export.model.mtp import MTPDepth
from m3export.model.norm import GemmaRMSNorm

NORM_STD = 0.1
LINEAR_STD = 0.02


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _fill(t: Tensor, seed: int, name: str, std: float, trunc: float | None = None) -> None:
    """Write N(0, std²) (truncated to ±trunc when given) into t, drawn in fp32 on CPU."""
    g = _generator(seed, name)
    tmp = torch.empty(t.shape, dtype=torch.float32)
    if trunc is None:
        nn.init.normal_(tmp, 0.0, std, generator=g)
    else:
        nn.init.trunc_normal_(tmp, 0.0, std, -trunc, trunc, generator=g)
    t.copy_(tmp)


def correction_bias_std(hidden: int) -> float:
    """Spread of the router's sigmoid scores at init: sigmoid'(0) · 0.02 · sqrt(H) (unit-RMS inputs)."""
    return 0.25 * LINEAR_STD * math.sqrt(hidden)


def round_to_storage(module: nn.Module, spec: Any) -> None:
    """Random weights rounded to the storage dtype (`spec.dtype`), as a checkpoint of that dtype would
    hold them, kept in fp32; the router and its correction bias stay unrounded (model/moe.py)."""
    if spec.dtype != "float32":
        module.to(getattr(torch, spec.dtype)).float()


def to_spec_dtypes(model: nn.Module, spec: Any, random: bool) -> None:
    """The model in the graph precision (export.precision.dtype), random weights first rounded to
    the storage dtype; the router and its correction bias stay fp32 (model/moe.py)."""
    if random:
        round_to_storage(model, spec)
    to_graph_precision(model, spec)


def to_graph_precision(module: nn.Module, spec: Any) -> None:
    """`module` cast to export.precision.dtype (the router and its bias stay fp32: model/moe.py), its
    routed experts then int8 / int4 quantised and dequantised when export.precision.experts says so."""
    from m3export.model.moe import quantise_experts

    module.to(getattr(torch, spec.graph_dtype))
    quantise_experts(module, spec.export.precision)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, only: tuple[str, ...] | None = None) -> None:
    """Initialise every parameter and the correction-bias buffers of an M3 model in place; with `only`
    (module paths relative to `model`) just the modules under them. A tensor's values depend only on
    (seed, its name), so any subset gives the values the whole model would."""
    for mod_name, mod in model.named_modules():
        if only is not None and not any(mod_name == o or mod_name.startswith(o + ".") for o in only):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, GemmaRMSNorm):
            _fill(mod.weight, seed, prefix + "weight", NORM_STD)
        elif isinstance(mod, nn.Embedding):
            _fill(mod.weight, seed, prefix + "weight", 1.0)
        elif isinstance(mod, nn.Linear):
            if mod_name == "lm_head":
                std = mod.in_features**-0.5
                _fill(mod.weight, seed, prefix + "weight", std, trunc=3 * std)
            else:  # torch's default truncation at ±2 (absolute) is inactive at std 0.02 (§7)
                _fill(mod.weight, seed, prefix + "weight", LINEAR_STD, trunc=2.0)
        elif isinstance(mod, Router):
            _fill(mod.weight, seed, prefix + "weight", LINEAR_STD)
        elif isinstance(mod, StackedExperts):
            _fill(mod.gate_up_proj, seed, prefix + "gate_up_proj", LINEAR_STD)
            _fill(mod.down_proj, seed, prefix + "down_proj", LINEAR_STD)
        elif isinstance(mod, SparseMoeBlock):
            std = correction_bias_std(mod.hidden_size)
            _fill(mod.e_score_correction_bias, seed, prefix + "e_score_correction_bias", std)


@torch.no_grad()
def make_mtp_agree(model: nn.Module) -> None:
    """Turn a text model into one whose MTP head always agrees with it, to measure speculative decoding
    at full acceptance (random weights give near-zero acceptance).

    Every decoder layer's output projections (attention o_proj, MLP / expert / shared-expert down
    projections) are zeroed, so h_t = norm(E[x_t]) and the main model's next token is a function of the
    current token only. Each MTP depth gets eh_proj = [I | 0] (embedding half only), enorm = 1 and
    final_layernorm = the main norm, so depth 0 at position i returns norm(E[x_{i+1}]) up to the RMS
    eps: exactly the main model's prediction after x_{i+1}. A test construction, not a real model.
    """

    text = getattr(model, "language_model", model).get_submodule("model")
    main_norm = text.get_parameter("norm.weight")
    for mod in text.modules():
        if isinstance(mod, M3Attention):
            mod.o_proj.weight.zero_()
        elif isinstance(mod, SwiGLUMLP):
            mod.down_proj.weight.zero_()
        elif isinstance(mod, StackedExperts):
            mod.down_proj.zero_()
        elif isinstance(mod, MTPDepth):
            h = mod.eh_proj.weight.shape[0]
            mod.eh_proj.weight.zero_()
            mod.eh_proj.weight[:, :h] = torch.eye(h)
            mod.enorm.weight.zero_()
            mod.final_layernorm.weight.copy_(main_norm)
