"""Stage plan (which modules go where, named I/O declared once) and the subgraph wrappers.

Files: plan.py (`SubgraphPlan`, the kinds' traits, stage boundaries), subgraphs.py (the wrappers:
`forward(*tensors)` in plan order), inputs.py (golden cases, their inputs, trace inputs, case ids).
"""

from m3export.split.plan import (
    SubgraphPlan,
    TensorSig,
    get_pipeline_stage_metas,
    plan_subgraphs,
    stage_layer_ranges,
)

__all__ = ["SubgraphPlan", "TensorSig", "get_pipeline_stage_metas", "plan_subgraphs", "stage_layer_ranges"]
