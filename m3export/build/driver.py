"""`m3export build`: split the eager model into planned subgraphs, export each to ONNX, gate on parity.

The driver validates everything cheap first (plan, `--only`, lowering and its onnxruntime range, the
output directory, memory and disk), takes OUT's lock, then: load the model, decide what to reuse
(cache.py), prepare the eager side once (prepare.py), export every selected subgraph into a staging
directory (export_step.py), run the step table (steps.py), write the manifest and publish OUT, or
`OUT.failed` when a step failed (a previous good OUT stays intact).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from m3export.build.export_step import SubgraphExport, export_subgraph
from m3export.build.prepare import prepare
from m3export.build.steps import StepContext, run_steps
from m3export.build.trt_step import trt_manifest_section
from m3export.errors import InputError
from m3export.model.factory import load_model
from m3export.ops.lowering import get_lowering
from m3export.parity.compare import ParityReport
from m3export.runners.ort_runner import require_onnxruntime
from m3export.spec import M3Spec, dump_spec, spec_hash
from m3export.spec.memory import build_memory_bytes, require_memory
from m3export.spec.size import weight_bytes
from m3export.split.inputs import trace_json
from m3export.split.plan import SubgraphPlan, plan_subgraphs
from m3export.parity.compare import jsonable

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
    them with a manifest, signed with `sign_key` (an HMAC key) when given. Incremental: a subgraph whose
    content key matches the previous passing build in `out_dir` reuses its ONNX files; when every key
    matches, nothing is rebuilt ("up to date")."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    plans = plan_subgraphs(spec)
    _check_only(only, plans)
    moe = get_lowering(spec.export.moe)
    require_onnxruntime(moe.onnxruntime, moe.name)  # every step runs these graphs in ORT
    if "trt" in spec.export.targets:  # the TensorRT graphs' ORT twins use the `ort` lowering
        require_onnxruntime(get_lowering("ort").onnxruntime, "ort")
    out = check_out(out_dir, need_bytes=estimate_artifact_bytes(spec, plans))
    require_memory(build_memory_bytes(spec), f"build {spec.name}")
    with build_lock(out):
        say(f"load model {spec.name} ({'checkpoint' if spec.weights.checkpoint else 'random'} weights)")
        model = load_model(spec)
        tools = tool_versions()
        keys = {p.name: subgraph_key(spec, p, model, moe.name, trace_json(), tools) for p in plans}
        prev = previous_build(out, say)
        selected = _selected(plans, keys, prev, only, out)
        remove_stale_staging(out)  # builds killed earlier (safe: we hold OUT's lock)
        if prev is not None and up_to_date(prev[0], spec, {p.name: keys[p.name] for p in selected}) and sign_key is None:
            say(f"up to date: {out} holds a passing build of every selected subgraph with the same keys")
            return BuildResult(out, True, [], prev[0].model_dump(mode="json"), time.perf_counter() - start, up_to_date=True)
        prep = prepare(spec, plans, model)
        with staging_dir(out) as staging:
            exports = {p.name: export_subgraph(prep, p, staging, keys[p.name], prev, moe, say) for p in selected}
            ctx = StepContext(prep, exports, len(selected) == len(plans), say)
            reports, tokens = run_steps(ctx, spec.tolerances)
            manifest = _manifest(spec, ctx, reports, tokens, tools, only, staging)
            passed = manifest.status == "pass"
            write_manifest(staging, manifest)
            seal_manifest(staging)  # manifest.sha256: `check` refuses a manifest edited after the build
            if sign_key is not None:
                sign_manifest(staging, sign_key)  # manifest.sig: `check --key` refuses one signed otherwise
            dest = out if passed else failed_path(out)
            publish(staging, dest)
    say(f"published {dest} ({'pass' if passed else 'FAIL'})")
    every = [*(r for ex in exports.values() for r in _subgraph_reports(ex, reports)), *_global(reports)]
    return BuildResult(dest, passed, every, manifest.model_dump(mode="json"), time.perf_counter() - start)


def estimate_artifact_bytes(spec: M3Spec, plans: Sequence[SubgraphPlan]) -> int:
    """Disk a build writes: every subgraph's weights (shared ones in each graph that uses them), twice
    with the TensorRT target (its own ONNX), plus goldens (a few MiB per subgraph at most here)."""
    copies = 2 if "trt" in spec.export.targets else 1
    graphs = sum(weight_bytes(spec, [*p.modules, *(m for m, _ in p.shared_uses)]) for p in plans)
    return copies * graphs + len(plans) * (16 << 20)


def _check_only(only: Sequence[str] | None, plans: list[SubgraphPlan]) -> None:
    names = [p.name for p in plans]
    unknown = [n for n in only or () if n not in names]
    if unknown:
        raise InputError(f"--only: unknown subgraph(s) {unknown}; this spec plans {names}")


def _selected(
    plans: list[SubgraphPlan], keys: dict[str, str], prev: tuple[Manifest, Path] | None, only: Sequence[str] | None, out: Path
) -> list[SubgraphPlan]:
    """The subgraphs to (re)export or carry over: `only`'s and the previous build's unchanged ones.
    `--only` never turns a complete build into a partial one (InputError naming what changed)."""
    prev_keys = {n: s.key for n, s in prev[0].subgraphs.items()} if prev is not None else {}
    selected = [p for p in plans if not only or p.name in only or prev_keys.get(p.name) == keys[p.name]]
    if len(selected) < len(plans) and prev is not None and set(prev_keys) == set(keys):
        stale = [p.name for p in plans if p not in selected]
        raise InputError(
            f"--only {','.join(only or [])}: {', '.join(stale)} changed since the complete build in {out} "
            "(spec, weights or code) and would be dropped from it; build them too (drop --only)"
        )
    return selected


def _subgraph_reports(ex: SubgraphExport, reports: list[ParityReport]) -> list[ParityReport]:
    """A subgraph's own reports: its steps' (by subject) and its TensorRT target's."""
    return [r for r in reports if r.subject == ex.plan.name] + [r for r in ex.reports if r.step != "onnx"]


def _global(reports: list[ParityReport]) -> list[ParityReport]:
    return [r for r in reports if r.subject == "pipeline"]


def _manifest(
    spec: M3Spec,
    ctx: StepContext,
    reports: list[ParityReport],
    tokens: dict[str, dict[str, list[int]]],
    tools: dict[str, str],
    only: Sequence[str] | None,
    staging: Path,
) -> Manifest:
    """The build's record. A gate that compared nothing has not passed; a skipped check never counts."""
    moe = get_lowering(spec.export.moe)
    every = [*(r for ex in ctx.exports.values() for r in _subgraph_reports(ex, reports)), *_global(reports)]
    passed = any(r.passed for r in every) and not any(r.failed for r in every)
    subgraphs = {
        name: {
            **ex.plan.to_json(),
            "files": ex.files,
            "key": ex.key,
            "reused": ex.reused,
            "node_counts": ex.node_counts,
            "export_seconds": ex.export_seconds,
            "parity": [r.to_json() for r in _subgraph_reports(ex, reports)],
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
            {"name": c.name, "batch": c.batch, "seq": c.seq, "grids": [list(g) for g in c.grids], "video": list(c.video) if c.video else None}
            for c in ctx.prep.cases
        ],
        "subgraphs": subgraphs,
        **trt,
        "parity": [r.to_json() for r in _global(reports)],
        # Step e's tokens (ORT; equal to torch's and transformers' when the build passed), re-run by check.
        "golden_tokens": tokens,
    }

    return Manifest.model_validate(jsonable(data))
