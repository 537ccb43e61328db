"""`m3export build`: split the model into planned subgraphs, export each to ONNX, gate on parity.

The driver validates everything cheap first (plan, `--only`, lowering and its onnxruntime range, the
output directory, memory and disk), takes OUT's lock, then: build the model on the meta device,
decide what to reuse (cache.py), run every subgraph's pass in plan order with only its weights
resident (export_step.py: eager streams, export, goldens, subgraph-scoped steps), materialise the
whole model only when it fits the budget (for the whole-model steps), run the build-scoped steps
(steps.py), write the manifest and publish OUT, or `OUT.failed` when a step failed (a previous good
OUT stays intact).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from m3export.artifacts.io import tool_versions
from m3export.artifacts.manifest import SCHEMA_VERSION, Manifest, write_manifest
from m3export.artifacts.outdir import (
    build_lock,
    check_out,
    failed_path,
    publish,
    remove_stale_staging,
    staging_dir,
)
from m3export.artifacts.seal import seal_manifest, sign_manifest
from m3export.build.cache import previous_build, subgraph_key, up_to_date
from m3export.build.export_step import BuildPass, SubgraphExport, owned_modules, run_subgraph, stream_only
from m3export.build.prepare import case_streams, final_names, full_eager_outputs
from m3export.build.steps import Context, WholeModel, run_build_steps, run_subgraph_steps
from m3export.build.trt_step import trt_manifest_section
from m3export.errors import InputError, SpecError
from m3export.model.factory import Weights
from m3export.ops.lowering import get_lowering, lowering_for
from m3export.parity.compare import ParityReport, jsonable
from m3export.runners.ort_runner import OrtRunner, require_onnxruntime
from m3export.runners.torch_runner import TorchRunner
from m3export.spec import M3Spec, dump_spec, spec_hash
from m3export.spec.memory import budget_bytes, require_memory, stage_memory_bytes, whole_model_bytes
from m3export.spec.size import graph_weight_bytes, weight_bytes
from m3export.split.inputs import to_numpy, trace_json
from m3export.split.plan import SubgraphPlan, plan_subgraphs
from m3export.split.subgraphs import build_stage

Progress = Callable[[str], None]


@dataclass
class BuildResult:
    """What `build` did: where it published, the overall verdict and every parity report."""

    out_dir: Path
    passed: bool
    reports: list[ParityReport]
    manifest: dict[str, Any]
    seconds: float
    up_to_date: bool = False  # nothing changed: the previous build in out_dir was kept as it is

    @property
    def status(self) -> str:
        return "pass" if self.passed else "fail"

    def failed_subjects(self) -> list[str]:
        return sorted({r.subject for r in self.reports if r.failed})


def build(
    spec: M3Spec,
    out_dir: str | Path,
    only: Sequence[str] | None = None,
    progress: Progress | None = None,
    sign_key: bytes | None = None,
) -> BuildResult:
    """Build every planned subgraph (or the `only` ones, carrying the unchanged others over) and publish
    them with a manifest, signed with `sign_key` (an HMAC key) when given. One subgraph's weights are
    resident at a time (export_step.py); incremental: a subgraph whose content key matches the previous
    passing build in `out_dir` reuses its ONNX files, and when every key matches nothing is rebuilt."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    _check_precision(spec)
    plans = plan_subgraphs(spec)
    _check_only(only, plans)
    moe = lowering_for(spec)
    require_onnxruntime(moe.onnxruntime, moe.name)  # every step runs these graphs in ORT
    if spec.export.trt_graphs:  # the TensorRT graphs' ORT twins use the `ort` lowering
        require_onnxruntime(get_lowering("ort").onnxruntime, "ort")
    out = check_out(out_dir, need_bytes=estimate_artifact_bytes(spec, plans))
    stage_peak = max(stage_memory_bytes(spec, owned_modules(p)) for p in plans)
    require_memory(stage_peak, f"build {spec.name} (its largest subgraph)", budget_bytes(spec))
    with build_lock(out):
        say(
            f"model {spec.name} on the meta device ({'checkpoint' if spec.weights.checkpoint else 'random'} weights, one subgraph at a time)"
        )
        weights = Weights(spec)
        bp = _pass(spec, weights, moe, out, say)
        selected = _selected(plans, bp.keys, bp.prev, only, out)
        remove_stale_staging(out)  # builds killed earlier (safe: we hold OUT's lock)
        if (
            bp.prev is not None
            and sign_key is None
            and up_to_date(bp.prev[0], spec, {p.name: bp.keys[p.name] for p in selected})
        ):
            say(f"up to date: {out} holds a passing build of every selected subgraph with the same keys")
            return BuildResult(
                out,
                True,
                [],
                bp.prev[0].model_dump(mode="json"),
                time.perf_counter() - start,
                up_to_date=True,
            )
        with staging_dir(out) as staging:
            bp.staging = staging
            exports = _run_pass(bp, plans, selected)
            ctx = _context(bp, plans, exports, len(selected) == len(plans), say)
            build_reports, tokens = run_build_steps(ctx, spec.tolerances)
            weights.release([m for p in plans for m in owned_modules(p)])
            manifest = _manifest(spec, ctx, build_reports, tokens, bp.tools, only, staging)
            passed = manifest.status == "pass"
            write_manifest(staging, manifest)
            seal_manifest(staging)  # manifest.sha256: `check` refuses a manifest edited after the build
            if sign_key is not None:
                sign_manifest(staging, sign_key)  # manifest.sig: `check --key` refuses one signed otherwise
            dest = out if passed else failed_path(out)
            publish(staging, dest)
    say(f"published {dest} ({'pass' if passed else 'FAIL'})")
    every = [*(r for ex in exports.values() for r in ex.reports), *build_reports]
    return BuildResult(dest, passed, every, manifest.model_dump(mode="json"), time.perf_counter() - start)


def _pass(spec: M3Spec, weights: Weights, moe: Any, out: Path, say: Progress) -> BuildPass:
    """The state every subgraph's pass shares; with a previous build, every subgraph's content key
    computed ahead (each subgraph materialised, hashed and released in turn) to decide reuse."""
    tools, trace = tool_versions(), trace_json()
    eager = case_streams(spec, plan_subgraphs(spec))[1]
    ort = case_streams(spec, plan_subgraphs(spec))[1]
    bp = BuildPass(
        spec,
        weights,
        eager,
        ort,
        out,
        previous_build(out, say),
        moe,
        tools,
        trace,
        say,
        _subgraph_steps(spec, say),
        case_streams(spec, plan_subgraphs(spec))[1] if spec.reduced_precision else None,
    )
    if bp.prev is not None:
        for plan in plan_subgraphs(spec):
            modules = owned_modules(plan)
            weights.materialise(modules)
            bp.keys[plan.name] = subgraph_key(spec, plan, weights.model, moe.name, trace, tools)
            weights.release(modules)
    return bp


def _subgraph_steps(spec: M3Spec, say: Progress) -> Callable[[Any], list[ParityReport]]:
    return lambda sessions: run_subgraph_steps(sessions, spec.tolerances, say)


def _run_pass(
    bp: BuildPass, plans: list[SubgraphPlan], selected: list[SubgraphPlan]
) -> dict[str, SubgraphExport]:
    """Every subgraph in plan order: the selected ones built, the others only streamed (their eager
    outputs feed the later subgraphs; their files are not part of this build)."""
    exports = {}
    for plan in plans:
        if plan in selected:
            exports[plan.name] = run_subgraph(bp, plan)
        else:
            stream_only(bp, plan)
    return exports


def _context(
    bp: BuildPass,
    plans: list[SubgraphPlan],
    exports: dict[str, SubgraphExport],
    complete: bool,
    say: Progress,
) -> Context:
    """The build-scoped steps' view; with the whole model resident when it fits the budget."""
    spec = bp.spec
    names = final_names(spec)
    base = Context(
        spec, tuple(plans), bp.eager, bp.ort, exports, complete, bp.ort_broken, None, names, say, bp.ref32
    )
    need, budget = whole_model_bytes(spec), budget_bytes(spec)
    if not complete or need > budget:
        if complete:
            say(
                f"whole-model steps skipped: they need about {need / 2**30:.1f} GiB, the budget is {budget / 2**30:.1f} GiB"
            )
        return base
    say("whole model resident for the whole-model steps (split, generate)")
    bp.weights.materialise([m for p in plans for m in owned_modules(p)])
    model = bp.weights.model
    refs = {
        s.case.name: {
            k: to_numpy(v)
            for k, v in full_eager_outputs(
                model, spec, {k: torch.from_numpy(v) for k, v in s.inputs.items()}
            ).items()
        }
        for s in bp.eager
    }
    torch_runners = {p.name: TorchRunner.for_plan(build_stage(model, p), p) for p in plans}
    run_ort = None
    if base.all_exported:
        ort = {n: OrtRunner(ex.onnx_path) for n, ex in exports.items() if ex.onnx_path is not None}
        run_ort = lambda plan, feed: ort[plan.name].infer(feed)  # noqa: E731
    whole = WholeModel(model, lambda plan, feed: torch_runners[plan.name].infer(feed), run_ort, refs)
    return replace(base, whole=whole)


def _check_precision(spec: M3Spec) -> None:
    """Refuse, before any work, a precision the build cannot make and check here: one line, the field."""
    p = spec.export.precision
    if p.dtype == "bfloat16":
        raise SpecError(
            "export.precision.dtype 'bfloat16': ONNX Runtime's CPU provider has no bfloat16 kernels "
            "(MatMul, Add, Mul, Sigmoid, ReduceMean ... all NOT_IMPLEMENTED in onnxruntime 1.32), so a "
            "bf16 graph can neither run nor be parity-checked here; use float16 (a bfloat16 checkpoint "
            "is read and converted tensor by tensor) or float32"
        )
    if p.experts != "same" and spec.export.trt_graphs:
        raise SpecError(
            f"export.precision.experts {p.experts!r}: the TensorRT MoE plugin takes unquantised expert "
            "weights (its FP8 / int4 forms are not built); build the onnx target only, or use experts: same"
        )


def estimate_artifact_bytes(spec: M3Spec, plans: Sequence[SubgraphPlan]) -> int:
    """Disk a build writes: every weight once in the ONNX Runtime graphs (shared ones stored once),
    with a TensorRT target also its ONNX graphs (shared weights in each) and each target's engines
    (as large),
    plus goldens (a few MiB per subgraph at most here)."""
    onnx = sum(graph_weight_bytes(spec, p.modules) for p in plans)
    trt = sum(weight_bytes(spec, owned_modules(p)) for p in plans) if spec.export.trt_graphs else 0
    engines = sum(t in spec.export.targets for t in ("trt", "trt_rtx"))
    return onnx + (1 + engines) * trt + len(plans) * (16 << 20)


def _check_only(only: Sequence[str] | None, plans: list[SubgraphPlan]) -> None:
    names = [p.name for p in plans]
    unknown = [n for n in only or () if n not in names]
    if unknown:
        raise InputError(f"--only: unknown subgraph(s) {unknown}; this spec plans {names}")


def _selected(
    plans: list[SubgraphPlan],
    keys: dict[str, str],
    prev: tuple[Manifest, Path] | None,
    only: Sequence[str] | None,
    out: Path,
) -> list[SubgraphPlan]:
    """The subgraphs to (re)export or carry over: `only`'s and the previous build's unchanged ones.
    `--only` never turns a complete build into a partial one (InputError naming what changed)."""
    prev_keys = {n: s.key for n, s in prev[0].subgraphs.items()} if prev is not None else {}
    selected = [
        p
        for p in plans
        if not only or p.name in only or (p.name in keys and prev_keys.get(p.name) == keys[p.name])
    ]
    if len(selected) < len(plans) and prev is not None and set(prev_keys) == set(keys):
        stale = [p.name for p in plans if p not in selected]
        raise InputError(
            f"--only {','.join(only or [])}: {', '.join(stale)} changed since the complete build in {out} "
            "(spec, weights or code) and would be dropped from it; build them too (drop --only)"
        )
    return selected


def _manifest(
    spec: M3Spec,
    ctx: Context,
    reports: list[ParityReport],
    tokens: dict[str, dict[str, list[int]]],
    tools: dict[str, str],
    only: Sequence[str] | None,
    staging: Path,
) -> Manifest:
    """The build's record. A gate that compared nothing has not passed; a skipped check never counts."""
    moe = lowering_for(spec)
    every = [*(r for ex in ctx.exports.values() for r in ex.reports), *reports]
    passed = any(r.passed for r in every) and not any(r.failed for r in every)
    subgraphs = {
        name: {
            **ex.plan.to_json(),
            "files": ex.files,
            "key": ex.key,
            "reused": ex.reused,
            "node_counts": ex.node_counts,
            "export_seconds": ex.export_seconds,
            "parity": [r.to_json() for r in ex.reports],
            **({"trt": ex.trt.manifest_entry()} if ex.trt is not None else {}),
        }
        for name, ex in ctx.exports.items()
    }
    trt = trt_manifest_section(spec, [ex.trt for ex in ctx.exports.values() if ex.trt is not None], staging)
    data = {
        "schema_version": SCHEMA_VERSION,
        "spec": dump_spec(spec),
        "spec_hash": spec_hash(spec),
        "tool_versions": tools,
        "moe_lowering": moe.name,
        "runtime": {"onnxruntime": moe.onnxruntime},
        "status": "pass" if passed else "fail",
        "only": list(only) if only else None,
        "complete": ctx.complete,
        "trace_shapes": trace_json(),
        "golden_cases": [
            {
                "name": c.name,
                "batch": c.batch,
                "seq": c.seq,
                "grids": [list(g) for g in c.grids],
                "video": list(c.video) if c.video else None,
            }
            for c in (s.case for s in ctx.eager)
        ],
        "subgraphs": subgraphs,
        **trt,
        "parity": [r.to_json() for r in reports],
        # Step e's tokens (ORT; equal to torch's and transformers' when the build passed), re-run by check.
        "golden_tokens": tokens,
    }

    return Manifest.model_validate(jsonable(data))
