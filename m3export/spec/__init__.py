"""Variant specs: pydantic models, YAML loading, HF config mapping, sizes. Imports no torch.

Files: models.py (the frozen pydantic `M3Spec`), base.py (the strict base, `Tolerance`), export.py
(the `export` section: targets, lowering, precision, TensorRT), load.py (YAML, canonical dump and hash, HF config.json
mapping), defaults.py (default tolerances per graph precision), lowerings.py (the `export.moe` names),
size.py (analytic parameter counts and weight bytes), memory.py (memory estimates and the guard).
"""

from m3export.spec.base import Tolerance
from m3export.spec.export import ExportSpec, PrecisionSpec, TrtSpec
from m3export.spec.load import dump_spec, from_hf_config, load_spec, parse_spec, spec_hash, to_hf_config
from m3export.spec.models import (
    M3Spec,
    MultimodalSpec,
    PipelineSpec,
    SparseAttentionSpec,
    TextSpec,
    TolerancesSpec,
    VisionSpec,
    WeightsSpec,
)

__all__ = [
    "ExportSpec",
    "M3Spec",
    "MultimodalSpec",
    "PipelineSpec",
    "PrecisionSpec",
    "SparseAttentionSpec",
    "TextSpec",
    "Tolerance",
    "TolerancesSpec",
    "TrtSpec",
    "VisionSpec",
    "WeightsSpec",
    "dump_spec",
    "from_hf_config",
    "load_spec",
    "parse_spec",
    "spec_hash",
    "to_hf_config",
]
