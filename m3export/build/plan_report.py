"""`m3export plan SPEC`: what a build of SPEC holds and needs, from the spec alone (no weights read).

Per subgraph: the layers and modules it owns, the shared modules it uses, its parameter count, the
bytes of its ONNX Runtime graph's weights at the spec dtype (owned + shared used), the bytes it adds
to the artifact directory (shared weights are stored once), and the memory its build pass needs
(`spec.memory.stage_memory_bytes`: the pass holds one subgraph's weights at a time). For the build:
the total parameter count (m3-architecture.md §2.8/§8: ~427B for m3-full), the unique weight bytes,
the disk the build writes, its peak memory, and whether the whole-model steps (split, generate) fit
the memory budget (`pipeline.memory_budget_gib`, else this machine's available memory).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from m3export.build.driver import estimate_artifact_bytes
from m3export.build.export_step import owned_modules
from m3export.spec import M3Spec
from m3export.spec.memory import GiB, budget_bytes, stage_memory_bytes, whole_model_bytes
from m3export.spec.size import graph_weight_bytes, module_sizes, total_parameters, weight_bytes
from m3export.split.plan import SubgraphPlan, plan_subgraphs

_LAYER = re.compile(r"(?:^|\.)(?:model\.)?(layers|mtp\.layers)\.(\d+)$")


@dataclass(frozen=True)
class SubgraphFigures:
    name: str
    kind: str
    layers: str  # e.g. "layers 0-14" / "mtp depths 0-0" / "" (vision)
    modules: list[str]
    shared_uses: list[str]
    parameters: int  # owned + shared used: what the graph holds
    weight_bytes: int  # of those parameters at export.precision.dtype (router + bias in fp32)
    disk_bytes: int  # what this subgraph adds to the artifact directory (owned weights only)
    peak_memory_bytes: int  # its build pass


@dataclass(frozen=True)
class BuildFigures:
    spec: str
    dtype: str
    total_parameters: int
    weight_bytes: int  # every weight once
    disk_bytes: int  # the whole artifact directory (estimate_artifact_bytes)
    peak_memory_bytes: int  # the largest subgraph pass, or the whole-model steps when they run
    stage_peak_memory_bytes: int
    whole_model_memory_bytes: int
    memory_budget_bytes: int
    whole_model_steps: bool  # split + generate run only when the whole model fits the budget
    subgraphs: list[SubgraphFigures]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _layers(plan: SubgraphPlan) -> str:
    found: dict[str, list[int]] = {}
    for m in plan.modules:
        if (hit := _LAYER.search(m)) is not None:
            found.setdefault("mtp depths" if hit[1] == "mtp.layers" else "layers", []).append(int(hit[2]))
    return ", ".join(f"{k} {min(v)}-{max(v)}" for k, v in found.items())


def plan_figures(spec: M3Spec) -> BuildFigures:
    sizes = module_sizes(spec)
    plans = plan_subgraphs(spec)
    subs = []
    for p in plans:
        used = owned_modules(p)
        subs.append(
            SubgraphFigures(
                name=p.name,
                kind=p.kind,
                layers=_layers(p),
                modules=list(p.modules),
                shared_uses=[m for m, _ in p.shared_uses],
                parameters=sum(sizes[m].parameters for m in used),
                weight_bytes=weight_bytes(spec, used),
                disk_bytes=graph_weight_bytes(spec, p.modules),
                peak_memory_bytes=stage_memory_bytes(spec, used),
            )
        )
    stage_peak = max(s.peak_memory_bytes for s in subs)
    whole, budget = whole_model_bytes(spec), budget_bytes(spec)
    runs_whole = whole <= budget
    return BuildFigures(
        spec=spec.name,
        dtype=spec.graph_dtype,
        total_parameters=total_parameters(spec),
        weight_bytes=weight_bytes(spec),
        disk_bytes=estimate_artifact_bytes(spec, plans),
        peak_memory_bytes=max(stage_peak, whole) if runs_whole else stage_peak,
        stage_peak_memory_bytes=stage_peak,
        whole_model_memory_bytes=whole,
        memory_budget_bytes=budget,
        whole_model_steps=runs_whole,
        subgraphs=subs,
    )


def _gb(n: int) -> str:
    return f"{n / GiB:,.1f} GiB"


def _params(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M"


def format_figures(f: BuildFigures) -> list[str]:
    """The human-readable table `m3export plan` prints."""
    head = f"{'subgraph':<9} {'kind':<7} {'layers':<22} {'params':>9} {'weights':>12} {'disk':>12} {'peak mem':>12}"
    lines = [f"plan {f.spec} ({f.dtype}): {len(f.subgraphs)} subgraphs", head]
    for s in f.subgraphs:
        shared = (
            f" + shared {', '.join(m.rsplit('.', 1)[-1] for m in s.shared_uses)}" if s.shared_uses else ""
        )
        lines.append(
            f"{s.name:<9} {s.kind:<7} {(s.layers or '-') + shared:<22} {_params(s.parameters):>9} "
            f"{_gb(s.weight_bytes):>12} {_gb(s.disk_bytes):>12} {_gb(s.peak_memory_bytes):>12}"
        )
    lines.append(
        f"total: {_params(f.total_parameters)} parameters ({f.total_parameters:,}), weights {_gb(f.weight_bytes)}"
        f" stored once; artifact directory ~{_gb(f.disk_bytes)}"
    )
    steps = (
        "run (the whole model fits the budget)"
        if f.whole_model_steps
        else f"skipped (they need {_gb(f.whole_model_memory_bytes)})"
    )
    fits = "fits" if f.stage_peak_memory_bytes <= f.memory_budget_bytes else "does NOT fit (build refuses)"
    lines.append(
        f"peak memory: {_gb(f.peak_memory_bytes)} (largest subgraph pass {_gb(f.stage_peak_memory_bytes)}), "
        f"{fits} the budget of {_gb(f.memory_budget_bytes)}; whole-model steps (split, generate): {steps}"
    )
    return lines
