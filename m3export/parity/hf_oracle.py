"""transformers' MiniMax M3 as an independent oracle for greedy generation (export-notes §2).

transformers is an optional dependency (the `dev` extra); callers treat ImportError as "skipped".
The oracle loads the same weights from disk: the spec's checkpoint, or the random-weights model saved
in the HF layout (§6.1). transformers has no MTP, so only the main model is compared.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from m3export.spec import M3Spec


def register_text_only_conversion() -> None:
    """transformers registers the §6.1 key conversion for the VL model type only: give the text-only
    class the same renames and merges minus the VL prefix moves (the patterns anchored at `^`)."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    vl = get_checkpoint_conversion_mapping("minimax_m3_vl")
    text = [t for t in vl if not any(p.startswith("^") for p in t.source_patterns)]
    register_checkpoint_conversion_mapping("MiniMaxM3VLForCausalLM", text, overwrite=True)


def _is_vl_checkpoint(path: Path) -> bool:
    from m3export.model.checkpoint_files import read_checkpoint
    from m3export.model.hf_keys import VL_TEXT_PREFIX

    return any(k.startswith(VL_TEXT_PREFIX) for k in read_checkpoint(Path(path)))


def hf_greedy(
    spec: M3Spec, model: nn.Module, prompts: Sequence[dict[str, np.ndarray]], max_new_tokens: int
) -> list[list[int]]:
    """Tokens of transformers' `generate(use_cache=True, do_sample=False)` for each batch-1 prompt
    (input_ids, optional pixel_values / image_grid_thw), stopping at the spec's EOS like ours."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # The class follows the checkpoint's layout: a text-only spec may read a VL checkpoint (§6.1).
    vl = spec.is_vl or (spec.weights.checkpoint is not None and _is_vl_checkpoint(spec.weights.checkpoint))
    if not vl:
        register_text_only_conversion()
    cls = transformers.MiniMaxM3SparseForConditionalGeneration if vl else transformers.MiniMaxM3VLForCausalLM
    with tempfile.TemporaryDirectory(prefix="m3export-hf-") as tmp:
        # Quantised experts: transformers gets the dequantised weights the graphs were made from.
        if spec.weights.checkpoint is not None and spec.export.precision.experts == "same":
            path = Path(spec.weights.checkpoint)
        else:
            from m3export.model.checkpoint import save_checkpoint

            path = save_checkpoint(model, spec, tmp)
        hf, info = cls.from_pretrained(  # type: ignore[misc]
            path,
            attn_implementation="eager",
            dtype=getattr(torch, spec.graph_dtype),
            output_loading_info=True,
        )
        if info["missing_keys"] or info["mismatched_keys"]:  # a partly random oracle proves nothing
            raise RuntimeError(f"transformers did not load every weight: {info}")
        hf = hf.eval()
    out: list[list[int]] = []
    for prompt in prompts:
        ids = torch.from_numpy(prompt["input_ids"])
        kwargs = {}
        if "pixel_values" in prompt:
            kwargs = {
                "pixel_values": torch.from_numpy(prompt["pixel_values"]),
                "image_grid_thw": torch.from_numpy(prompt["image_grid_thw"]),
            }
        with torch.no_grad():
            seq = hf.generate(
                ids,
                **kwargs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                eos_token_id=spec.text.eos_token_id,
                pad_token_id=0,
            )
        out.append(seq[0, ids.shape[1] :].tolist())
    return out


HF_VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


def randomise_hf_weights(model: Any, seed: int, scale: float | None = None) -> None:
    """Overwrite every parameter and persistent buffer of a transformers M3 model (norms and correction
    biases included, which default inits leave at 0 and so prove nothing, export-notes §2). Text as
    §7 with non-zero norms (or every non-norm tensor N(0, scale²) when `scale` is given); vision
    weights N(0, 1/fan_in), LayerNorms 1 + N(0, 0.1²), biases N(0, 0.1²), so image features are O(1)
    like the token embeddings they replace. One draw per tensor, in state-dict order."""
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.get_text_config().hidden_size
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=g)
            if name.startswith(HF_VISION_PREFIXES):
                if ("layrnorm" in name or "layer_norm" in name) and name.endswith("weight"):
                    t.copy_(1 + 0.1 * noise)
                elif name.endswith("bias"):
                    t.copy_(0.1 * noise)
                else:
                    t.copy_(noise * t[0].numel() ** -0.5)
                continue
            t.copy_(noise * _text_std(name, hidden, scale))


def _text_std(name: str, hidden: int, scale: float | None) -> float:
    if "norm" in name:
        return 0.1
    if scale is not None:
        return scale
    if "e_score_correction_bias" in name:
        return 0.06
    if "embed_tokens" in name:
        return 1.0
    if "lm_head" in name:
        return float(hidden**-0.5)
    return 0.02
