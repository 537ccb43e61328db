"""One subgraph's pass of a build, with only its own weights resident:

1. materialise the tensors it owns (and the shared ones it uses) from the checkpoint or the seed (in a
   reduced-precision build first in fp32, to advance the fp32 reference streams, then cast);
2. advance every golden case's eager stream through it (its golden feeds: prompt, last decode step,
   video) and compute its content key from those weights;
3. export the stage wrapper (or reuse the previous build's files when the key is unchanged), check its
   graph I/O against the plan, write its goldens (eager outputs and layer intermediates per feed) and
   build its TensorRT flavour when that is a target;
4. release the weights, then open its ONNX Runtime session: run the subgraph-scoped steps (onnx,
   routing) and advance the ORT streams; close the sessions.

The memory high-water mark is one subgraph's weights plus what the exporter and ONNX Runtime hold
for it, never two subgraphs'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from m3export.artifacts.goldens import write_goldens
from m3export.artifacts.io import sha256_file
from m3export.artifacts.layout import GOLDEN_KINDS, onnx_file
from m3export.artifacts.manifest import Manifest
from m3export.build.cache import reuse_onnx, subgraph_key
from m3export.build.heap import release_heap
from m3export.build.prepare import CaseStream
from m3export.build.trt_result import TrtResult
from m3export.export.onnx_export import OnnxArtifact, export_onnx
from m3export.model.factory import Weights
from m3export.parity.compare import ParityReport
from m3export.parity.intermediates import capture_intermediates, expose_intermediates
from m3export.runners.ort_runner import OrtRunner
from m3export.runners.torch_runner import TorchRunner, plan_dtypes
from m3export.spec import M3Spec
from m3export.split.inputs import decode_case, media_feed, trace_inputs, video_case
from m3export.split.plan import SubgraphPlan, plan_subgraphs
from m3export.split.subgraphs import build_stage

Cases = dict[str, dict[str, np.ndarray]]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class SubgraphExport:
    """One subgraph's exported (or reused) files, goldens and its step reports."""

    plan: SubgraphPlan
    key: str
    reused: bool
    node_counts: dict[str, int]
    export_seconds: float | None
    files: dict[str, str]  # relative path -> sha256
    onnx_path: Path | None  # None when the export failed
    trt: TrtResult | None = None
    reports: tuple[ParityReport, ...] = ()  # export failure, subgraph-scoped steps, TensorRT checks


class SubgraphSessions:
    """What the subgraph-scoped steps (onnx, routing) see: the subgraph's goldens, and its ONNX Runtime
    session or the parity copy exposing every layer, one of them open at a time (each holds the
    subgraph's weights: two at once would double the build's high-water mark)."""

    def __init__(
        self, plan: SubgraphPlan, path: Path, feeds: Cases, eager: Cases, intermediates: Cases
    ) -> None:
        self.plan, self.path = plan, path
        self.feeds, self.eager, self.intermediates = feeds, eager, intermediates
        self._open: tuple[str, OrtRunner] | None = None

    def _session(self, which: str) -> OrtRunner:
        if self._open is None or self._open[0] != which:
            self._open = None
            release_heap()
            runner = OrtRunner(self.path) if which == "ort" else expose_intermediates(self.path).runner()
            self._open = (which, runner)
        return self._open[1]

    def ort(self) -> OrtRunner:
        return self._session("ort")

    def debug(self) -> OrtRunner:
        """The parity copy (in memory; it reads the file's external weights)."""
        return self._session("debug")

    def close(self) -> None:
        self._open = None
        release_heap()


@dataclass
class BuildPass:
    """What every subgraph's pass shares: the spec, the weights, the streams, the output, the reuse."""

    spec: M3Spec
    weights: Weights
    eager: list[CaseStream]
    ort: list[CaseStream]
    staging: Path
    prev: tuple[Manifest, Path] | None
    moe: Any
    tools: dict[str, str]
    trace: dict[str, Any]
    say: Progress
    subgraph_steps: Callable[[SubgraphSessions], list[ParityReport]]
    ref32: list[CaseStream] | None = None  # a reduced-precision build: the fp32 reference streams
    keys: dict[str, str] = field(default_factory=dict)  # when computed ahead (reuse decisions)
    ort_broken: str | bool = False  # why the ORT streams cannot be trusted (a subgraph failed to run)


def export_plan(
    stage: Any, plan: SubgraphPlan, spec: Any, lowering: Any, path: Path, shared: Sequence[str] = ()
) -> OnnxArtifact:
    """Export one stage wrapper at the trace shapes, the plan's symbolic dims as dynamic axes;
    `shared`: the stage's names of the weights stored once for every graph that uses them."""
    return export_onnx(
        stage,
        trace_inputs(spec, plan),
        path,
        output_names=plan.output_names,
        dynamic_axes=plan.dynamic_axes,
        opset=spec.export.opset,
        lowering=lowering,
        shared=shared,
    )


def _shared_names(bp: BuildPass, plan: SubgraphPlan, stage: Any) -> list[str]:
    """The stage's own names of the weights of the modules several subgraphs use (the embedding and
    the lm_head, `plan.shared_uses`, and their owners' copies): found by identity in the model."""
    users = {m for p in plan_subgraphs(bp.spec) for m, _ in p.shared_uses}
    ids = {id(t) for m in users for t in bp.weights.model.get_submodule(m).parameters()}
    return [n for n, t in stage.named_parameters(remove_duplicate=False) if id(t) in ids]


def graph_files(onnx_path: Path) -> list[Path]:
    """The ONNX graph and every external-data file it references."""
    model = onnx.load(onnx_path, load_external_data=False)
    locations = {
        e.value
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    return [onnx_path, *(onnx_path.parent / loc for loc in sorted(locations))]


def owned_modules(plan: SubgraphPlan) -> list[str]:
    """The modules whose weights a subgraph needs: those it owns and the shared ones it uses."""
    return [*plan.modules, *(m for m, _ in plan.shared_uses)]


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).splitlines())[:500]}"


def _feeds(streams: list[CaseStream], plan: SubgraphPlan, run: Any, hidden: int) -> Cases:
    """Advance every stream through `plan`; its golden feeds by case id."""
    feeds: Cases = {}
    for stream in streams:
        prompt, last = stream.advance(plan, run, hidden)
        name = stream.case.name
        for case, got in ((name, prompt), (decode_case(name), last)):
            if plan.name in got:  # vision without images / a decode step: no feed
                feeds[case] = got[plan.name]
        if (video := prompt.get(media_feed(plan.name, "video"))) is not None:
            feeds[video_case(name)] = video
    return feeds


def _materialise(bp: BuildPass, plan: SubgraphPlan, modules: list[str]) -> None:
    """The subgraph's weights in the graph precision; in a reduced-precision build first in fp32, to
    advance the fp32 reference streams through it, then cast in place (one tensor at a time)."""
    if bp.ref32 is None:
        bp.weights.materialise(modules)
        return
    bp.weights.materialise(modules, fp32=True)
    stage = build_stage(bp.weights.model, plan)
    fp32 = {n: torch.float32 for n in plan_dtypes(plan)}
    runner = TorchRunner(stage, plan.input_names, plan.output_names, f"torch-fp32:{plan.name}", fp32)
    _feeds(bp.ref32, plan, lambda _p, f: runner.infer(f), bp.spec.text.hidden_size)
    bp.weights.to_graph_dtype(modules)


def stream_only(bp: BuildPass, plan: SubgraphPlan) -> None:
    """A subgraph left out of this build (`--only`): its eager outputs still feed the later ones."""
    modules = owned_modules(plan)
    _materialise(bp, plan, modules)
    try:
        stage = build_stage(bp.weights.model, plan)
        runner = TorchRunner.for_plan(stage, plan)
        _feeds(bp.eager, plan, lambda _p, f: runner.infer(f), bp.spec.text.hidden_size)
        bp.ort_broken = bp.ort_broken or f"{plan.name} is not part of this build"
    finally:
        bp.weights.release(modules)


def run_subgraph(bp: BuildPass, plan: SubgraphPlan) -> SubgraphExport:
    """The module docstring's pass for `plan`."""
    modules = owned_modules(plan)
    _materialise(bp, plan, modules)
    try:
        stage = build_stage(bp.weights.model, plan)
        torch_runner = TorchRunner.for_plan(stage, plan)
        feeds = _feeds(bp.eager, plan, lambda _p, f: torch_runner.infer(f), bp.spec.text.hidden_size)
        key = bp.keys.get(plan.name) or subgraph_key(
            bp.spec, plan, bp.weights.model, bp.moe.name, bp.trace, bp.tools
        )
        exported = _export(bp, plan, stage, key)
        if exported.onnx_path is None:
            return exported
        eager = {c: torch_runner.infer(f) for c, f in feeds.items()}
        dbg = {c: capture_intermediates(stage, f) for c, f in feeds.items()}
        exported = _write_goldens(bp, exported, stage, feeds, eager, dbg)
    finally:
        bp.weights.release(modules)
        release_heap()
    return _check(bp, exported, feeds, eager, dbg)


def _export(bp: BuildPass, plan: SubgraphPlan, stage: Any, key: str) -> SubgraphExport:
    (bp.staging / plan.name).mkdir()
    onnx_path = onnx_file(bp.staging, plan.name)
    reused = reuse_onnx(bp.prev, plan.name, key, bp.staging)
    if reused is not None:
        bp.say(f"[b export] {plan.name}: unchanged (key {key[:12]}), reusing its ONNX files")
        return SubgraphExport(plan, key, True, dict(reused.node_counts), None, {}, onnx_path)
    bp.say(f"[b export] {plan.name} (moe lowering {bp.moe.name})")
    try:
        art = export_plan(stage, plan, bp.spec, bp.moe, onnx_path, _shared_names(bp, plan, stage))
    except Exception as err:  # the lowering check or the exporter failed: a failed gate, not a crash
        msg = f"export failed: {_describe(err)}"
        bp.say(f"[b export] {plan.name}: FAIL {msg}")
        return SubgraphExport(
            plan,
            key,
            False,
            {},
            None,
            {},
            None,
            reports=(ParityReport("onnx", plan.name, "export", {}, (), msg),),
        )
    return SubgraphExport(plan, key, False, art.node_counts, art.export_seconds, {}, onnx_path)


def _write_goldens(
    bp: BuildPass, ex: SubgraphExport, stage: Any, feeds: Cases, eager: Cases, dbg: Cases
) -> SubgraphExport:
    """Goldens for `check` (inputs / outputs per case, and the eager layer outputs / expert choices it
    uses to localise a failure and re-run routing), and the TensorRT flavour."""
    assert ex.onnx_path is not None
    sub_dir = bp.staging / ex.plan.name
    for kind, values in zip(GOLDEN_KINDS, (feeds, eager, dbg), strict=True):
        write_goldens(sub_dir, kind, values)
    trt = None
    reports: tuple[ParityReport, ...] = ex.reports
    if bp.spec.export.trt_graphs:
        from m3export.build.trt_step import trt_for_subgraph

        trt = trt_for_subgraph(
            bp.spec, ex.plan, stage, sub_dir, feeds, eager, ex.onnx_path, bp.staging, bp.say
        )
        reports = (*reports, *trt.reports, *trt.skips)
    owned = [*sorted(sub_dir.iterdir()), *graph_files(ex.onnx_path)]
    files = {f.relative_to(bp.staging).as_posix(): sha256_file(f) for f in owned}
    return SubgraphExport(
        ex.plan, ex.key, ex.reused, ex.node_counts, ex.export_seconds, files, ex.onnx_path, trt, reports
    )


def _check(bp: BuildPass, ex: SubgraphExport, feeds: Cases, eager: Cases, dbg: Cases) -> SubgraphExport:
    """With the weights released: the ORT streams and the subgraph-scoped steps, one session at a time.
    A failing ORT run breaks the ORT streams (steps c, d then report it) instead of crashing the build."""
    assert ex.onnx_path is not None
    sessions = SubgraphSessions(ex.plan, ex.onnx_path, feeds, eager, dbg)
    reports = list(ex.reports)
    try:
        if not bp.ort_broken:
            _feeds(bp.ort, ex.plan, lambda _p, f: sessions.ort().infer(f), bp.spec.text.hidden_size)
    except Exception as err:
        bp.ort_broken = f"{ex.plan.name}: {_describe(err)}"
    reports += bp.subgraph_steps(sessions)
    sessions.close()
    return SubgraphExport(
        ex.plan,
        ex.key,
        ex.reused,
        ex.node_counts,
        ex.export_seconds,
        ex.files,
        ex.onnx_path,
        ex.trt,
        tuple(reports),
    )
