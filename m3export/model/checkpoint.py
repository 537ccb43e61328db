"""HF-layout checkpoint I/O for the text model (m3-architecture.md §6.1).

Native names equal the HF checkpoint keys except for the routed experts, which are stacked here
(docs/design.md): native `...block_sparse_moe.experts.gate_up_proj` [E, 2I, H] = per expert
cat(w1, w3) along rows, `...experts.down_proj` [E, H, I] = stacked w2; on disk they are
`...block_sparse_moe.experts.{e}.w1/w3/w2.weight`. A VL checkpoint puts the text model under
`language_model.`; the vision-side keys belong to the vision loader and are passed over here.

The key conversion is two pure functions, `native_to_hf` and `hf_to_native`, so that later
layers (shards, dtype casts, MXFP8 dequantisation) can wrap them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from m3export.errors import CheckpointError
from m3export.spec import M3Spec, to_hf_config

VL_TEXT_PREFIX = "language_model."
VL_NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")
_STACKED = re.compile(r"^(?P<moe>.+\.block_sparse_moe\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(?P<moe>.+\.block_sparse_moe\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")


def native_to_hf(state: Mapping[str, Tensor], *, vl: bool) -> dict[str, Tensor]:
    """Native state dict -> HF checkpoint tensors (§6.1): split stacked experts, add the VL prefix."""
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
    """HF checkpoint tensors -> (native text state dict, keys passed over as not text).

    Per-expert w1/w3/w2 are stacked into gate_up_proj / down_proj; a gap in expert numbering or a
    missing w1/w2/w3 raises CheckpointError.
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


def _native_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def save_checkpoint(model: nn.Module, spec: M3Spec, out_dir: str | Path) -> Path:
    """Write `model.safetensors` (HF layout, §6.1) and `config.json` (`to_hf_config(spec)`) to out_dir."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in native_to_hf(_native_state(model), vl=spec.is_vl).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(to_hf_config(spec), indent=2) + "\n")
    return out


@dataclass
class LoadReport:
    """What `load_checkpoint` did: tensors loaded, and checkpoint keys it passed over (not text, or MTP
    depths the model does not have)."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files found")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _is_vl_checkpoint(keys: list[str]) -> bool:
    return any(k.startswith(VL_TEXT_PREFIX) for k in keys)


def load_checkpoint(model: nn.Module, path: str | Path) -> LoadReport:
    """Load an HF-layout checkpoint (file or directory; text-only or VL layout) into `model` in place.

    Every model tensor must be present with its exact shape; unknown text keys raise. Tensors are
    cast to the model's dtype for each parameter (fp32 stays fp32 for the router and bias).
    """
    p = Path(path)
    raw = _read_safetensors(p)
    native, skipped = hf_to_native(raw, vl=_is_vl_checkpoint(list(raw)))
    own = model.state_dict()
    has_mtp = any(".mtp." in k for k in own)
    if not has_mtp:  # the BF16 release declares MTP but many checkpoints lack it, and vice versa (§3.4)
        skipped += [k for k in native if k.startswith("model.mtp.")]
        native = {k: v for k, v in native.items() if not k.startswith("model.mtp.")}
    missing = sorted(set(own) - set(native))
    unexpected = sorted(set(native) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{p}: checkpoint does not match the model: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    bad = [
        f"{k} {tuple(native[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if native[k].shape != v.shape
    ]
    if bad:
        raise CheckpointError(f"{p}: {len(bad)} tensors have the wrong shape, e.g. {bad[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(native[k].to(v.dtype))
    return LoadReport(loaded=sorted(own), skipped=sorted(skipped))
