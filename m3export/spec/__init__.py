"""Variant specs: pydantic models, YAML loading, HF config mapping. Imports no torch."""

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
