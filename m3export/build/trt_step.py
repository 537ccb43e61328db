"""`build_trt_targets`: the TensorRT target of one planned subgraph, for `m3export build`.

Steps (each recorded in the result; a failed check fails the build, a skipped engine does not pass):
  1. export      the TensorRT-flavoured ONNX `<name>.trt.onnx` (MoE lowered to the plugin node);
  2. rewrites    the documented TensorRT-specific rewrites (m3export/trt/rewrites.py);
  3. graph check every node is in the TensorRT parser's operator matrix or is our plugin with the
                 registered signature (m3export/trt/graph_check.py);
  4. graph diff  vs the ONNX Runtime graph of the same subgraph (when given): equal once the MoE
                 lowerings are collapsed and the same rewrites applied;
  5. twin        the ORT twin `<name>.trt.twin.onnx` vs the eager subgraph on the golden cases, with
                 the spec's `onnx` tolerance;
  6. engine      `<name>.engine` with one optimisation profile from `export.trt.profiles`, when
                 TensorRT and a GPU are present; else skipped, with the reason; then, if
                 `export.trt.tolerances.engine` is set, the engine vs the eager subgraph.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from m3export.artifacts.io import sha256_file
from m3export.artifacts.layout import TIMING_CACHE, rtx_engine_name
from m3export.build.trt_result import Golden, TrtResult, failed_report
from m3export.export.onnx_export import export_onnx
from m3export.export.trt.engine import (
    ProfileShapes,
    build_engine,
    profile_shapes,
    resolve_precision,
    tensorrt_unavailable,
)
from m3export.export.trt.graph_check import check_trt_graph, load_supported_ops
from m3export.export.trt.graph_diff import diff_graphs
from m3export.export.trt.rewrites import apply_trt_rewrites
from m3export.export.trt.rtx import RtxBuildError, build_rtx_engine, rtx_unavailable
from m3export.export.trt.twin import make_ort_twin
from m3export.ops.lowering import count_nodes, get_lowering
from m3export.ops.trt_plugin import plugin_record
from m3export.parity.compare import ParityReport, compare_outputs, kinds_by_name
from m3export.runners.ort_runner import OrtRunner
from m3export.runners.trt_runner import TrtRunner
from m3export.spec.export import TrtSpec
from m3export.split.inputs import trace_inputs

if TYPE_CHECKING:
    from torch import Tensor, nn

    from m3export.spec.base import Tolerance
    from m3export.spec.export import TrtSpec
    from m3export.spec.models import M3Spec
    from m3export.split.plan import SubgraphPlan


def _compare(
    step: str, plan: SubgraphPlan, golden: Golden, run: Callable[..., Any], tol: Tolerance
) -> list[ParityReport]:
    reports = []
    for case, (feed, want) in golden.items():
        try:
            got = run(feed)
            reports.append(
                compare_outputs(step, plan.name, case, got, want, tol, kinds_by_name(plan.output_names))
            )
        except Exception as err:
            reports.append(
                ParityReport(
                    step, plan.name, case, tol.model_dump(mode="json"), (), f"{type(err).__name__}: {err}"
                )
            )
    return reports


def _export_trt_onnx(
    stage: nn.Module,
    plan: SubgraphPlan,
    spec: M3Spec,
    trace: Mapping[str, Tensor],
    axes: Mapping[str, Mapping[int, str]],
    path: Path,
) -> Any:

    return export_onnx(
        stage,
        trace,
        path,
        output_names=plan.output_names,
        dynamic_axes=axes,
        opset=spec.export.opset,
        lowering=get_lowering("trt"),
    )


def _graph_steps(res: TrtResult, path: Path, ort_onnx: Path | None) -> None:
    """Rewrites, graph check and (with the ORT graph) graph diff, recorded into `res`."""

    model = onnx.load(path, load_external_data=False)
    res.rewrites = apply_trt_rewrites(model)
    onnx.save(model, path)
    res.node_counts = {(f"{d}::{t}" if d else t): n for (d, t), n in sorted(count_nodes(model).items())}
    res.graph_check = check_trt_graph(model)
    if not res.graph_check.passed:
        issues = "; ".join(f"{i.node} ({i.op}): {i.problem}" for i in res.graph_check.issues[:8])
        res.reports.append(
            failed_report("trt_graph", res.subgraph, f"{len(res.graph_check.issues)} issue(s): {issues}")
        )
    if ort_onnx is not None:
        ort_model = onnx.load(ort_onnx, load_external_data=False)
        apply_trt_rewrites(ort_model)
        res.graph_diff = diff_graphs(ort_model, copy.deepcopy(model), ort_onnx.parent, path.parent)
        if not res.graph_diff.equivalent:
            res.reports.append(
                failed_report(
                    "trt_graph_diff",
                    res.subgraph,
                    f"differs beyond MoE + rewrites: {res.graph_diff.first_difference}",
                )
            )


def build_trt_targets(
    spec: M3Spec,
    plan: SubgraphPlan,
    stage: nn.Module,
    out_dir: Path,
    trace_inputs: Mapping[str, Tensor],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    golden: Golden,
    *,
    ort_onnx: Path | None = None,
    timing_cache: Path | None = None,
    say: Callable[[str], None] = lambda _msg: None,
) -> TrtResult:
    """Run the module docstring's steps for `plan` into `out_dir` (the subgraph's directory).

    `trace_inputs` / `dynamic_axes`: as for the ORT export. `golden`: case -> (feed, eager outputs).
    `ort_onnx`: the ORT-flavoured graph of the same subgraph, for the diff. Timing cache:
    `export.trt.timing_cache` if set, else `timing_cache`, else `<out_dir>/../trt_timing.cache`.
    Raises SpecError for a spec the target cannot honour (precision, profile dims); every other
    failure is recorded in the result.
    """

    start = time.perf_counter()
    trt_spec = spec.export.trt or TrtSpec()
    precision = resolve_precision(spec)
    shapes = profile_shapes(plan, trt_spec, spec)
    res = TrtResult(plan.name, precision, {k: [list(s) for s in v] for k, v in shapes.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    _cpu_steps(res, spec, plan, stage, out_dir, trace_inputs, dynamic_axes, golden, ort_onnx, say)
    cache = Path(trt_spec.timing_cache or timing_cache or out_dir.parent / TIMING_CACHE)
    if "trt" in spec.export.targets:
        _engine_steps(res, plan, trt_spec, shapes, golden, cache, say)
    if "trt_rtx" in spec.export.targets:
        _rtx_engine_step(res, plan, trt_spec, shapes, say)
    made = (
        res.onnx_path,
        res.twin_path,
        out_dir / f"{plan.name}.trt.onnx.data",
        res.engine.path if res.engine else None,
        res.rtx_engine.path if res.rtx_engine else None,
    )
    res.files = {f.name: sha256_file(f) for f in made if f is not None and f.is_file()}
    res.seconds = time.perf_counter() - start
    return res


def _cpu_steps(
    res: TrtResult,
    spec: M3Spec,
    plan: SubgraphPlan,
    stage: nn.Module,
    out_dir: Path,
    trace: Mapping[str, Tensor],
    axes: Mapping[str, Mapping[int, str]],
    golden: Golden,
    ort_onnx: Path | None,
    say: Callable[[str], None],
) -> None:
    """Steps 1-5: export, rewrites, graph check, graph diff, twin and its parity."""

    path = out_dir / f"{plan.name}.trt.onnx"
    say(f"[trt export] {plan.name} (plugin lowering, {res.precision})")
    try:
        _export_trt_onnx(stage, plan, spec, trace, axes, path)
        res.onnx_path = path
        _graph_steps(res, path, ort_onnx)
        res.twin_path = make_ort_twin(path).path
    except Exception as err:  # an export/check crash is a failed gate, not a crash of the build
        res.reports.append(failed_report("trt_export", plan.name, err))
        say(f"[trt export] {plan.name}: FAIL {res.reports[-1].error}")
    say(
        f"[trt graph] {plan.name}: {'pass' if res.checks_passed else 'FAIL'} ({len(res.rewrites)} rewrite(s))"
    )
    tol = spec.tolerances.onnx
    if res.twin_path is None or tol is None:
        return
    try:
        reports = _compare("trt_twin", plan, golden, OrtRunner(res.twin_path).infer, tol)
    except Exception as err:  # onnxruntime cannot load the twin
        reports = [failed_report("trt_twin", plan.name, err)]
    res.reports += reports
    verdict = "pass" if all(r.passed for r in reports) else "FAIL"
    say(f"[trt twin] {plan.name}: {verdict} ({len(reports)} cases)")


def _skip_reason(res: TrtResult, unavailable: str | None) -> str | None:
    """Why an engine is not built here: the library is missing, or the CPU checks failed."""
    return unavailable if unavailable is not None else None if res.checks_passed else "CPU checks failed"


def _skip(res: TrtResult, step: str, plan: SubgraphPlan, reason: str, say: Callable[[str], None]) -> None:
    # Shown in the build's table as SKIP: never counted as passed (nor as failed).
    res.skips.append(ParityReport(step, plan.name, "-", {}, skipped=f"no engine: {reason}"))
    say(f"[{step.replace('_engine', ' engine')}] {plan.name}: SKIPPED ({reason})")


def _engine_steps(
    res: TrtResult,
    plan: SubgraphPlan,
    trt_spec: TrtSpec,
    shapes: ProfileShapes,
    golden: Golden,
    cache: Path,
    say: Callable[[str], None],
) -> None:
    """Step 6: build the engine where TensorRT and a GPU are present (else skipped, with the reason),
    then compare it with the eager subgraph when `export.trt.tolerances.engine` is set."""

    reason = _skip_reason(res, tensorrt_unavailable())
    if reason is not None:
        res.engine_status, res.engine_reason = "skipped", reason
        _skip(res, "trt_engine", plan, reason, say)
        return
    assert res.onnx_path is not None
    res.timing_cache = cache
    try:
        res.engine = build_engine(
            res.onnx_path,
            res.onnx_path.with_name(f"{plan.name}.engine"),
            shapes,
            precision=res.precision,
            timing_cache=cache,
            optimization_level=trt_spec.builder_optimization_level,
            workspace_gib=trt_spec.workspace_gib,
            tf32=trt_spec.tf32,
        )
    except Exception as err:  # parser / builder refusal: a failed gate with TensorRT's message
        res.engine_status, res.engine_reason = "failed", str(err)
        res.reports.append(failed_report("trt_engine", plan.name, err))
        say(f"[trt engine] {plan.name}: FAIL {err}")
        return
    res.engine_status = "built"
    say(f"[trt engine] {plan.name}: built in {res.engine.build_seconds:.1f} s")
    tol = trt_spec.tolerances.engine
    if tol is None:
        return

    try:
        reports = _compare(
            "trt_engine", plan, golden, TrtRunner(res.engine.path, [plugin_record()]).infer, tol
        )
    except Exception as err:
        reports = [failed_report("trt_engine", plan.name, err)]
    res.reports += reports
    say(f"[trt engine] {plan.name}: parity {'pass' if all(r.passed for r in reports) else 'FAIL'}")


def _rtx_engine_step(
    res: TrtResult, plan: SubgraphPlan, trt_spec: TrtSpec, shapes: ProfileShapes, say: Callable[[str], None]
) -> None:
    """The TensorRT-RTX engine, built ahead of time on CPU in a child process (export/trt/rtx.py).
    Without the wheels: skipped with the install hint. Running it needs an RTX GPU: its execution
    parity is always reported as skipped here, never as passed."""

    reason = _skip_reason(res, rtx_unavailable())
    if reason is not None:
        res.rtx_status, res.rtx_reason = "skipped", reason
        _skip(res, "trt_rtx_engine", plan, reason, say)
        return
    assert res.onnx_path is not None
    try:
        res.rtx_engine = build_rtx_engine(
            res.onnx_path,
            res.onnx_path.with_name(rtx_engine_name(plan.name)),
            shapes,
            subgraph=plan.name,
            precision=res.precision,
            compute_capabilities=trt_spec.compute_capabilities,
            optimization_level=trt_spec.builder_optimization_level,
            workspace_gib=trt_spec.workspace_gib,
        )
    except RtxBuildError as err:
        res.rtx_status, res.rtx_reason = "failed", str(err)
        res.reports.append(failed_report("trt_rtx_engine", plan.name, str(err)))
        say(f"[trt_rtx engine] {plan.name}: FAIL {err}")
        return
    eng = res.rtx_engine
    res.rtx_status = "built"
    what = (
        f"{eng.path.name}, {eng.precision}, {'/'.join(eng.compute_capabilities)}, TensorRT-RTX "
        f"{eng.version}, {eng.build_seconds:.1f} s"
    )
    res.skips.append(ParityReport("trt_rtx_engine", plan.name, "-", {}, built=what))
    res.skips.append(
        ParityReport(
            "trt_rtx_run",
            plan.name,
            "-",
            {},
            skipped="executing a TensorRT-RTX engine needs an RTX GPU (none here); m3export never "
            "creates an execution context without one",
        )
    )
    say(f"[trt_rtx engine] {plan.name}: built ({what})")


def trt_for_subgraph(
    spec: M3Spec,
    plan: SubgraphPlan,
    stage: nn.Module,
    sub_dir: Path,
    feeds: Mapping[str, dict[str, np.ndarray]],
    eager: Mapping[str, dict[str, np.ndarray]],
    onnx_path: Path,
    staging: Path,
    say: Callable[[str], None],
) -> Any:
    """The TensorRT flavour of one subgraph (docs/tensorrt.md): plugin-lowered ONNX, CPU checks, ORT
    twin parity, and the engine where TensorRT and a GPU exist (else a skipped report). `feeds` /
    `eager`: the golden feeds and the eager outputs, by golden case."""

    pairs = {c: (feeds[c], eager[c]) for c in sorted(feeds)}
    return build_trt_targets(
        spec,
        plan,
        stage,
        sub_dir,
        trace_inputs(spec, plan),
        plan.dynamic_axes,
        pairs,
        ort_onnx=onnx_path if onnx_path.is_file() else None,
        timing_cache=staging / TIMING_CACHE,
        say=say,
    )


def trt_manifest_section(spec: M3Spec, results: list[Any], staging: Path) -> dict[str, Any]:
    """The top-level `trt` section: aggregate status, plugin records, the operator list's source."""
    if not spec.export.trt_graphs:
        return {}

    statuses = {r.status for r in results}
    status = "fail" if "fail" in statuses else "skipped" if "skipped" in statuses else "pass"
    cache = staging / TIMING_CACHE
    return {
        "trt": {
            "status": status,
            "plugins": [plugin_record()],
            "timing_cache": cache.name if cache.is_file() else None,
            "supported_ops_source": load_supported_ops().source,
        }
    }
