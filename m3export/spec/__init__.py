"""Variant specs: pydantic models, YAML loading, HF config mapping, sizes. Imports no torch.

Files: models.py (the frozen pydantic `M3Spec`), load.py (YAML, canonical dump and hash, HF config.json
mapping), defaults.py (default tolerances per dtype), lowerings.py (the `export.moe` names),
size.py (analytic parameter counts and weight bytes), memory.py (memory estimates and the guard).
"""

from m3export.spec.load import dump_spec, from_hf_config, load_spec, parse_spec, spec_hash, to_hf_config
from m3export.spec.models import (
    ExportSpec,
    M3Spec,
    MultimodalSpec,
    PipelineSpec,
    SparseAttentionSpec,
    TextSpec,
    Tolerance,
    TolerancesSpec,
    VisionSpec,
    WeightsSpec,
)

__all__ = [
    "ExportSpec",
    "M3Spec",
    "MultimodalSpec",
    "PipelineSpec",
    "SparseAttentionSpec",
    "TextSpec",
    "Tolerance",
    "TolerancesSpec",
    "VisionSpec",
    "WeightsSpec",
    "dump_spec",
    "from_hf_config",
    "load_spec",
    "parse_spec",
    "spec_hash",
    "to_hf_config",
]
