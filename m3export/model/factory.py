"""The eager model a spec describes: VL or text-only, random weights or its checkpoint."""

from __future__ import annotations

from torch import nn

from m3export.model.text import M3ForCausalLM
from m3export.model.vl import M3ForConditionalGeneration
from m3export.spec import M3Spec


def load_model(spec: M3Spec) -> nn.Module:
    """`M3ForConditionalGeneration` for a VL spec, else `M3ForCausalLM`; from the spec's checkpoint when
    it names one, else the deterministic random init of its seed (m3export/model/init.py)."""

    cls = M3ForConditionalGeneration if spec.is_vl else M3ForCausalLM
    if spec.weights.checkpoint is not None:
        return cls.from_pretrained(spec)
    return cls.from_config(spec)
