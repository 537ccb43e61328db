"""Stage plan (which modules go where) and subgraph wrappers with explicit named I/O."""

from m3export.split.plan import (
    SubgraphPlan,
    TensorSig,
    get_pipeline_stage_metas,
    plan_subgraphs,
    stage_layer_ranges,
)

__all__ = ["SubgraphPlan", "TensorSig", "get_pipeline_stage_metas", "plan_subgraphs", "stage_layer_ranges"]
