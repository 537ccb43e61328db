"""Pure key mapping between native state dicts and HF checkpoint keys (m3-architecture.md §6.1-6.2).

Native names equal the HF checkpoint keys except for the routed experts, which are stacked
(docs/design.md): native `...block_sparse_moe.experts.gate_up_proj` [E, 2I, H] = per expert
cat(w1, w3) along rows, `...experts.down_proj` [E, H, I] = stacked w2; on disk they are
`...block_sparse_moe.experts.{e}.w1/w3/w2.weight`. The rules hold under any root, so a VL module
(`language_model.*` + vision keys) maps with the same functions as the text model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from m3export.errors import CheckpointError

VL_TEXT_PREFIX = "language_model."
VL_NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")
SCALE_SUFFIX = "_scale_inv"

_STACKED = re.compile(r"^(?P<moe>.+\.block_sparse_moe\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(?P<moe>.+\.block_sparse_moe\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
# §6.2 write side (Automodel `_MXFP8_QUANT_KEY_RE`); the vision tower is never quantised.
_MXFP8_WRITE = re.compile(
    r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|block_sparse_moe\.experts\.\d+\.w[123]"
    r"|block_sparse_moe\.shared_experts\.(gate|up|down)_proj)\.weight$"
)
# Kept fp32 on disk whatever the checkpoint dtype (§6.1, §7; Megatron-Bridge for the patch embedding).
_KEEP_FP32 = re.compile(r"(block_sparse_moe\.gate\.weight|e_score_correction_bias|patch_embedding\.weight)$")


def native_to_hf(state: Mapping[str, Tensor], *, vl: bool = False) -> dict[str, Tensor]:
    """Native state dict -> HF checkpoint tensors (§6.1): split stacked experts (as views), and with
    `vl` put everything under `language_model.`. Keys of a module already rooted at the VL layout
    pass through with `vl=False`."""
    out: dict[str, Tensor] = {}
    prefix = VL_TEXT_PREFIX if vl else ""
    for key, t in state.items():
        m = _STACKED.match(key)
        if m is None:
            out[prefix + key] = t
            continue
        moe = prefix + m["moe"]
        if m["kind"] == "gate_up_proj":
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{moe}.{e}.w1.weight"] = t[e, :inter]
                out[f"{moe}.{e}.w3.weight"] = t[e, inter:]
        else:
            for e in range(t.shape[0]):
                out[f"{moe}.{e}.w2.weight"] = t[e]
    return out


def hf_to_native(state: Mapping[str, Tensor], *, vl: bool) -> tuple[dict[str, Tensor], list[str]]:
    """HF checkpoint tensors -> (native text state dict, keys passed over as not text), in memory.

    Per-expert w1/w3/w2 are stacked into gate_up_proj / down_proj; a gap in expert numbering or a
    missing w1/w2/w3 raises CheckpointError. `load_checkpoint` streams instead of calling this.
    """
    native: dict[str, Tensor] = {}
    skipped: list[str] = []
    experts: dict[str, dict[int, dict[str, Tensor]]] = {}
    for key, t in state.items():
        if vl:
            if not key.startswith(VL_TEXT_PREFIX):
                skipped.append(key)
                continue
            key = key.removeprefix(VL_TEXT_PREFIX)
        m = _PER_EXPERT.match(key)
        if m is None:
            native[key] = t
        else:
            experts.setdefault(m["moe"], {}).setdefault(int(m["e"]), {})[m["w"]] = t
    for moe, per in experts.items():
        native.update(_stack_experts(moe, per))
    return native, skipped


def _stack_experts(moe: str, per: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    n = len(per)
    if sorted(per) != list(range(n)):
        raise CheckpointError(f"{moe}: expert indices must be 0..{n - 1}, found {sorted(per)}")
    for e, w in per.items():
        if set(w) != {"w1", "w2", "w3"}:
            missing = sorted({"w1", "w2", "w3"} - set(w))
            raise CheckpointError(f"{moe}.{e}: missing {', '.join(missing)} (expected w1, w2, w3)")
    gate_up = torch.stack([torch.cat((per[e]["w1"], per[e]["w3"]), dim=0) for e in range(n)])
    down = torch.stack([per[e]["w2"] for e in range(n)])
    return {f"{moe}.gate_up_proj": gate_up, f"{moe}.down_proj": down}


# transformers 5.18's save_pretrained renamed every `.mlp.` to `.block_sparse_moe.` (its load-time
# rename run backwards), so the dense-layer and vision MLPs of a checkpoint it wrote read
# `layers.{l}.block_sparse_moe.{gate,up,down}_proj.weight` and
# `encoder.layers.{l}.block_sparse_moe.fc{1,2}.{weight,bias}`; 5.24 and the released checkpoint write
# `mlp.` (§6.1). The MoE layers' own `block_sparse_moe.*` keys (gate, experts, shared_experts,
# e_score_correction_bias) are the same in both.
_V518_MLP = re.compile(
    r"^(?P<layer>.*layers\.\d+)\.block_sparse_moe\.(?P<w>(?:gate|up|down)_proj|fc[12])\.(?P<p>(?:weight|bias)(?:_scale_inv)?)$"
)


def canonical_key(key: str) -> str:
    """The §6.1 spelling of a checkpoint key (transformers 5.18's dense/vision MLP names mapped)."""
    m = _V518_MLP.match(key)
    return key if m is None else f"{m['layer']}.mlp.{m['w']}.{m['p']}"


def checkpoint_root(model_keys: Iterable[str], checkpoint_keys: Iterable[str]) -> str:
    """The prefix to strip from checkpoint keys: `language_model.` when a text-only module reads a VL
    checkpoint, else "" (a VL module's own names already carry the VL roots)."""
    if any(k.startswith(VL_TEXT_PREFIX) for k in model_keys):
        return ""
    return VL_TEXT_PREFIX if any(k.startswith(VL_TEXT_PREFIX) for k in checkpoint_keys) else ""


def is_mtp_key(key: str) -> bool:
    """A key of an MTP depth (`...model.mtp.layers.{d}.*`, §6.1)."""
    return ".mtp.layers." in f".{key}"


def is_mxfp8_write_key(key: str) -> bool:
    """Whether `save_checkpoint(mxfp8=True)` quantises this HF key (§6.2 write-side set)."""
    return _MXFP8_WRITE.search(key) is not None and not key.startswith(VL_NON_TEXT_PREFIXES)


def keeps_fp32(key: str) -> bool:
    """Router weight, correction bias and patch embedding stay fp32 in a bf16 checkpoint (§6.1)."""
    return _KEEP_FP32.search(key) is not None


def describe_missing(keys: list[str]) -> list[str]:
    """Missing HF keys for an error message; per-expert pieces grouped as `<experts>.{e}: missing w1, w3`."""
    out: list[str] = []
    experts: dict[str, list[str]] = {}
    for k in keys:
        m = _PER_EXPERT.match(k)
        if m is None:
            out.append(k)
        else:
            experts.setdefault(f"{m['moe']}.{m['e']}", []).append(m["w"])
    return out + [f"{e}: missing {', '.join(sorted(ws))}" for e, ws in experts.items()]
