"""`m3export build`: split the eager model into planned subgraphs, export each to ONNX, gate on parity.

Steps (each compared with the spec's tolerance of the same name, every step always runs):

  a. split       chained eager subgraphs vs the full eager model, on every golden case;
  b. onnx        each subgraph exported with the spec's MoE lowering, checked for the lowering's
                 custom nodes, then run in ONNX Runtime vs the eager wrapper, on golden cases whose
                 shapes differ from the trace shapes (prefill and one-token decode), plus `routing`
                 agreement per MoE layer;
  c. end_to_end  chained ONNX Runtime subgraphs vs the full eager model;
  d. decode      chunked prefill + one-token steps through the KV cache vs the full recompute;
  e. generate    greedy tokens: ORT vs eager torch vs transformers, MTP speculative vs plain.

Everything is written to a staging directory and published to `out` when every check passed, or
to `<out>.failed` otherwise (a previous good `out` stays intact).
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from m3export.artifacts import MANIFEST, SCHEMA_VERSION, sha256_file, tool_versions, write_json_atomic
from m3export.buildcache import previous_build, reuse_onnx, subgraph_key, up_to_date
from m3export.errors import InputError, OutputError
from m3export.goldens import (
    GoldenCase,
    case_inputs,
    full_eager_outputs,
    golden_cases,
    to_numpy,
    trace_inputs,
    trace_json,
)
from m3export.integrity import seal_manifest, sign_manifest
from m3export.memory import build_memory_bytes, require_memory
from m3export.outdir import (
    build_lock,
    check_out,
    failed_path,
    new_staging_dir,
    publish,
    remove_stale_staging,
)
from m3export.parity.compare import ParityReport, compare_outputs, kinds_by_name
from m3export.parity.intermediates import (
    capture_intermediates,
    expose_intermediates,
    localise,
    routing_report,
)
from m3export.runners.chain import run_chain, run_chunks
from m3export.runners.ort_runner import require_onnxruntime
from m3export.spec import M3Spec, dump_spec, spec_hash
from m3export.spec.size import weight_bytes
from m3export.split.plan import SubgraphPlan, plan_subgraphs
from m3export.trt.build import trt_for_subgraph, trt_manifest_section

Progress = Callable[[str], None]

# Decode parity (step d): the last DECODE_STEPS positions of each golden case are fed one at a time
# through the cache after a chunked prefill of the rest.
DECODE_STEPS = 3
STEP_LETTER = {"split": "a", "onnx": "b", "routing": "b", "end_to_end": "c", "decode": "d", "generate": "e"}
GENERATE_TOKENS = 16  # step e: new tokens per prompt (decode queries reach past 2 x top-k blocks)


@dataclass
class SubgraphResult:
    plan: SubgraphPlan
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    key: str = ""  # content key of the exported files (m3export.buildcache)
    trt: Any = None  # m3export.trt.result.TrtResult when "trt" is an export target
    reused: bool = False  # the ONNX files were taken from the previous build (same key)
    node_counts: dict[str, int] = field(default_factory=dict)
    export_seconds: float | None = None
    reports: list[ParityReport] = field(default_factory=list)


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


# ------------------------------------------------------------------------------------- inputs


# ------------------------------------------------------------------------------------- build


def build(
    spec: M3Spec,
    out_dir: str | Path,
    only: Sequence[str] | None = None,
    progress: Progress | None = None,
    sign_key: bytes | None = None,
) -> BuildResult:
    """Build every planned subgraph and publish them with a manifest (signed with `sign_key`, an
    HMAC key, when given: `check --key` then detects tampering by anyone without the key).

    Incremental: a subgraph whose content key matches the previous (intact, passing) build in
    `out_dir` reuses its ONNX files; when every key matches, nothing is rebuilt ("up to date").
    `only` limits what is (re)exported: other subgraphs are carried over from the previous build when
    unchanged, else left out. Steps a, c, d and e need every subgraph.
    """
    from m3export.ops.lowering import get_lowering

    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    plans = plan_subgraphs(spec)
    names = [p.name for p in plans]
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise InputError(f"--only: unknown subgraph(s) {unknown}; this spec plans {names}")
    moe_name = spec.export.moe
    moe = get_lowering(moe_name)
    require_onnxruntime(moe.onnxruntime, moe_name)  # every build step runs these graphs in ORT
    if "trt" in spec.export.targets:  # the TensorRT graphs' ORT twins use the `ort` lowering
        require_onnxruntime(get_lowering("ort").onnxruntime, "ort")
    out = check_out(out_dir, need_bytes=estimate_artifact_bytes(spec, plans))
    require_memory(build_memory_bytes(spec), f"build {spec.name}")
    with build_lock(out):
        return _build_locked(spec, out, plans, only, moe_name, moe, say, start, sign_key)


def estimate_artifact_bytes(spec: M3Spec, plans: Sequence[SubgraphPlan]) -> int:
    """Disk a build writes: every subgraph's weights (shared ones in each graph that uses them), twice
    with the TensorRT target (its own ONNX), plus goldens (a few MiB per subgraph at most here)."""
    copies = 2 if "trt" in spec.export.targets else 1
    graphs = sum(weight_bytes(spec, [*p.modules, *(m for m, _ in p.shared_uses)]) for p in plans)
    return copies * graphs + len(plans) * (16 << 20)


def _build_locked(
    spec: M3Spec,
    out: Path,
    plans: list[SubgraphPlan],
    only: Sequence[str] | None,
    moe_name: str,
    moe: Any,
    say: Progress,
    start: float,
    sign_key: bytes | None = None,
) -> BuildResult:
    """`build` once OUT is validated and locked."""
    from m3export.forward import load_model

    say(f"load model {spec.name} ({'checkpoint' if spec.weights.checkpoint else 'random'} weights)")
    model = load_model(spec)
    tools = tool_versions()
    keys = {p.name: subgraph_key(spec, p, model, moe_name, trace_json(), tools) for p in plans}
    prev = previous_build(out, say)
    # --only limits what is (re)exported; unchanged subgraphs of the previous build are carried over.
    prev_keys = {n: s.get("key") for n, s in (prev or {}).get("subgraphs", {}).items()}
    selected = [p for p in plans if not only or p.name in only or prev_keys.get(p.name) == keys[p.name]]
    complete = len(selected) == len(plans)
    if not complete and prev is not None and set(prev_keys) == set(keys):
        stale = [p.name for p in plans if p not in selected]
        raise InputError(
            f"--only {','.join(only or [])}: {', '.join(stale)} changed since the complete build in {out} "
            "(spec, weights or code) and would be dropped from it; build them too (drop --only)"
        )
    keys = {p.name: keys[p.name] for p in selected}
    remove_stale_staging(out)  # builds killed earlier (safe: we hold OUT's lock)
    if prev is not None and up_to_date(prev, spec, keys) and sign_key is None:
        say(f"up to date: {out} holds a passing build of every selected subgraph with the same keys")
        return BuildResult(out, True, [], prev, time.perf_counter() - start, up_to_date=True)
    staging = new_staging_dir(out)
    try:
        return _build_into(
            spec,
            out,
            staging,
            plans,
            selected,
            complete,
            keys,
            prev,
            only,
            model,
            tools,
            moe_name,
            moe,
            say,
            start,
            sign_key,
        )
    except OSError as err:  # writing the staging directory failed: disk full, read-only, permissions
        where = err.filename or staging
        raise OutputError(
            f"--out {out}: writing the build failed ({err.strerror}: {where}); nothing was published"
        ) from None
    finally:
        if staging.exists():  # not published: an exception or an interrupt
            shutil.rmtree(staging, ignore_errors=True)


def _build_into(
    spec: M3Spec,
    out: Path,
    staging: Path,
    plans: list[SubgraphPlan],
    selected: list[SubgraphPlan],
    complete: bool,
    keys: dict[str, str],
    prev: dict[str, Any] | None,
    only: Sequence[str] | None,
    model: nn.Module,
    tools: dict[str, str],
    moe_name: str,
    moe: Any,
    say: Progress,
    start: float,
    sign_key: bytes | None,
) -> BuildResult:
    """Steps a-e into `staging`, then the manifest and the publish."""
    from m3export.export.onnx_export import export_onnx
    from m3export.runners.ort_runner import OrtRunner
    from m3export.runners.torch_runner import TorchRunner
    from m3export.split.subgraphs import build_stage

    tols = spec.tolerances
    stages = {p.name: build_stage(model, p) for p in plans}
    torch_runners = {
        p.name: TorchRunner(stages[p.name], p.input_names, p.output_names, f"torch:{p.name}") for p in plans
    }

    def run_torch(plan: SubgraphPlan, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return torch_runners[plan.name].infer(feed)

    hidden = spec.text.hidden_size
    cases = golden_cases(spec)
    case_tensors = {c.name: case_inputs(spec, c, seed=1000 + i) for i, c in enumerate(cases)}
    case_arrays = {name: {k: to_numpy(v) for k, v in inp.items()} for name, inp in case_tensors.items()}
    refs = {
        c.name: {k: to_numpy(v) for k, v in full_eager_outputs(model, spec, case_tensors[c.name]).items()}
        for c in cases
    }
    final_names = list(refs[cases[0].name])

    def chunked(c: GoldenCase, run: Any) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
        bounds = [c.seq - DECODE_STEPS + i for i in range(DECODE_STEPS)]
        return run_chunks(plans, case_arrays[c.name], run, bounds, hidden_size=hidden, outputs=final_names)

    eager = {c.name: run_chain(plans, case_arrays[c.name], run_torch, hidden_size=hidden) for c in cases}
    # Golden feeds per subgraph: each case's prompt forward (past_seq 0), and its last decode step
    # (past_seq S-1, seq 1) from a chunked run through the eager cache.
    eager_decode = {c.name: chunked(c, run_torch) for c in cases}
    feeds_by_case: list[tuple[str, dict[str, dict[str, np.ndarray]]]] = []
    for c in cases:
        feeds_by_case += [(c.name, eager[c.name].feeds), (f"{c.name}.decode", eager_decode[c.name][1])]
        if "vision:video" in eager[c.name].feeds:  # the vision subgraph on the case's video
            feeds_by_case.append((f"{c.name}.video", {"vision": eager[c.name].feeds["vision:video"]}))

    results = {p.name: SubgraphResult(p) for p in selected}
    global_reports: list[ParityReport] = []

    def gate(step: str, case: str, produce: Callable[[], dict[str, np.ndarray]], tol: Any) -> None:
        try:
            got = produce()
            rep = compare_outputs(
                step, "pipeline", case, got, refs[case.split(":")[0]], tol, kinds_by_name(final_names)
            )
        except Exception as err:  # a runner or chain failure is a failed gate, not a crash
            rep = ParityReport(step, "pipeline", case, tol.model_dump(mode="json"), (), _describe(err))
        global_reports.append(rep)
        say(f"[{STEP_LETTER[step]} {step}] {case}: {'pass' if rep.passed else 'FAIL'}")

    # a. split: chained eager subgraphs vs the full model (exact: the wrappers share the modules).
    if complete:
        for c in cases:
            gate("split", c.name, functools.partial(lambda n: eager[n].values, c.name), tols.split)

    # b. onnx: export each subgraph, then ORT vs the eager wrapper on the golden feeds.
    ort_runners: dict[str, OrtRunner] = {}
    for plan in selected:
        res = results[plan.name]
        sub_dir = staging / plan.name
        sub_dir.mkdir()
        onnx_path = sub_dir / f"{plan.name}.onnx"
        res.key = keys[plan.name]
        reused = reuse_onnx(prev, out, plan.name, res.key, sub_dir)
        if reused is not None:
            res.node_counts, res.export_seconds, res.reused = reused["node_counts"], None, True
            say(f"[b export] {plan.name}: unchanged (key {res.key[:12]}), reusing its ONNX files")
        else:
            say(f"[b export] {plan.name} (moe lowering {moe_name})")
            try:
                art = _export_subgraph(export_onnx, stages[plan.name], plan, spec, moe, onnx_path)
            except Exception as err:  # the lowering check or the exporter failed: a failed gate, not a crash
                msg = f"export failed: {type(err).__name__}: {' '.join(str(err).splitlines())[:500]}"
                res.reports.append(ParityReport("onnx", plan.name, "export", {}, (), msg))
                say(f"[b export] {plan.name}: FAIL {msg}")
                continue
            res.node_counts, res.export_seconds = art.node_counts, art.export_seconds
        ort_runners[plan.name] = OrtRunner(onnx_path)
        # A parity copy exposing each layer's output and each MoE's expert indices (in memory only).
        debug = expose_intermediates(onnx_path).runner()
        golden: dict[str, dict[str, np.ndarray]] = {"inputs": {}, "outputs": {}, "intermediates": {}}
        for case, feeds in feeds_by_case:
            feed = feeds.get(plan.name)
            if feed is None:  # vision without images, or a decode step
                continue
            want = torch_runners[plan.name].infer(feed)
            want_dbg = capture_intermediates(stages[plan.name], feed)
            for kind, values in (("inputs", feed), ("outputs", want), ("intermediates", want_dbg)):
                golden[kind].update({f"{case}/{k}": v for k, v in values.items()})
            try:
                got = ort_runners[plan.name].infer(feed)
                rep = compare_outputs(
                    "onnx", plan.name, case, got, want, tols.onnx, kinds_by_name(plan.output_names)
                )
                got_dbg = debug.infer(feed)
            except Exception as err:
                rep = ParityReport(
                    "onnx", plan.name, case, tols.onnx.model_dump(mode="json"), (), f"ORT: {err}"
                )
                got_dbg = {}
            if rep.failed and got_dbg:
                rep = localise(rep, got_dbg, want_dbg, tols.onnx)
            res.reports.append(rep)
            say(f"[b onnx] {plan.name} {case}: {'pass' if rep.passed else 'FAIL'}")
            if got_dbg and any(n.endswith(".experts") for n in want_dbg):
                routing = routing_report("routing", plan.name, case, got_dbg, want_dbg, tols.onnx)
                res.reports.append(routing)
                say(f"[b routing] {plan.name} {case}: {'pass' if routing.passed else 'FAIL'}")
        # Goldens for `check`: inputs/outputs per case, and the eager layer outputs / expert choices
        # (golden_intermediates) it uses to localise a failure.
        for kind, values in golden.items():
            np.savez(sub_dir / f"golden_{kind}.npz", **values)  # type: ignore[arg-type]
        if "trt" in spec.export.targets:
            res.trt = trt_for_subgraph(
                spec, plan, stages[plan.name], sub_dir, golden, onnx_path, staging, say
            )
            res.reports += res.trt.reports + res.trt.skips
        for f in sorted(sub_dir.iterdir()):
            res.files[f"{plan.name}/{f.name}"] = sha256_file(f)

    all_ort = complete and len(ort_runners) == len(plans)

    def run_ort(plan: SubgraphPlan, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return ort_runners[plan.name].infer(feed)

    # c. end_to_end: chained ORT subgraphs vs the full eager model.
    if all_ort:
        for c in cases:
            e2e = functools.partial(
                lambda n: run_chain(plans, case_arrays[n], run_ort, hidden_size=hidden).values, c.name
            )
            gate("end_to_end", c.name, e2e, tols.end_to_end)

    # d. decode: a chunked prefill then DECODE_STEPS one-token steps through the KV cache vs the
    # full recompute, for the eager stages and the chained ORT graphs.
    if complete:
        for c in cases:
            gate(
                "decode",
                f"{c.name}:torch",
                functools.partial(lambda n: eager_decode[n][0], c.name),
                tols.decode,
            )
            if all_ort:
                gate(
                    "decode",
                    f"{c.name}:ort",
                    functools.partial(lambda c: chunked(c, run_ort)[0], c),
                    tols.decode,
                )

    # e. generate: greedy tokens through the caches on the batch-1 golden prompts.
    golden_tokens: dict[str, dict[str, list[int]]] = {}
    if all_ort:
        prompts = {c.name: case_arrays[c.name] for c in cases if c.batch == 1}
        gen_reports, golden_tokens = _generate_reports(
            spec, model, plans, run_ort, run_torch, prompts, tols.generate, say
        )
        global_reports += gen_reports

    reports = [r for p in selected for r in results[p.name].reports] + global_reports
    # A gate that compared nothing has not passed; a skipped check never counts.
    passed = any(r.passed for r in reports) and not any(r.failed for r in reports)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "spec": dump_spec(spec),
        "spec_hash": spec_hash(spec),
        "tool_versions": tools,
        "moe_lowering": moe_name,
        "runtime": {"onnxruntime": moe.onnxruntime},
        "status": "pass" if passed else "fail",
        "only": list(only) if only else None,
        "complete": complete,
        "trace_shapes": trace_json(),
        "golden_cases": [
            {
                "name": c.name,
                "batch": c.batch,
                "seq": c.seq,
                "grids": [list(g) for g in c.grids],
                "video": list(c.video) if c.video else None,
            }
            for c in cases
        ],
        "subgraphs": {
            name: {
                **r.plan.to_json(),
                "files": r.files,
                "key": r.key,
                "reused": r.reused,
                "node_counts": r.node_counts,
                "export_seconds": r.export_seconds,
                "parity": [rep.to_json() for rep in r.reports],
                **({"trt": r.trt.manifest_entry()} if r.trt is not None else {}),
            }
            for name, r in results.items()
        },
        **trt_manifest_section(spec, [r.trt for r in results.values() if r.trt is not None], staging),
        "parity": [rep.to_json() for rep in global_reports],
        # Step e's tokens (ORT; equal to torch's and transformers' when the build passed), re-run by check.
        "golden_tokens": golden_tokens,
    }
    write_json_atomic(staging / MANIFEST, _jsonable(manifest))
    seal_manifest(staging)  # manifest.sha256: `check` refuses a manifest edited after the build
    if sign_key is not None:
        sign_manifest(staging, sign_key)  # manifest.sig: `check --key` refuses one signed otherwise
    dest = out if passed else failed_path(out)
    publish(staging, dest)
    say(f"published {dest} ({'pass' if passed else 'FAIL'})")
    return BuildResult(dest, passed, reports, manifest, time.perf_counter() - start)


def _generate_reports(
    spec: M3Spec,
    model: nn.Module,
    plans: Sequence[SubgraphPlan],
    run_ort: Any,
    run_torch: Any,
    prompts: dict[str, dict[str, np.ndarray]],
    tol: Any,
    say: Progress,
) -> tuple[list[ParityReport], dict[str, dict[str, list[int]]]]:
    """Step e: GENERATE_TOKENS greedy tokens per prompt from ORT vs eager torch vs transformers'
    generate (skipped without transformers), and MTP speculative vs plain decoding (ORT). Also
    returns the ORT tokens per prompt ("plain", and "mtp") for `check` to re-run."""
    from m3export.generate import generate_tokens
    from m3export.parity.hf_oracle import hf_greedy

    def tokens(run: Any, mtp: bool = False) -> dict[str, list[int]] | str:
        try:
            return {
                n: generate_tokens(spec, plans, run, p, GENERATE_TOKENS, mtp=mtp).tokens
                for n, p in prompts.items()
            }
        except Exception as err:  # a decoding failure is a failed gate, not a crash
            return f"FAILED: {_describe(err)}"

    ort = tokens(run_ort)
    others: dict[str, dict[str, list[int]] | str] = {"torch": tokens(run_torch)}
    if spec.text.num_mtp_modules:
        others["mtp"] = tokens(run_ort, mtp=True)
    try:
        hf = hf_greedy(spec, model, list(prompts.values()), GENERATE_TOKENS)
        others["transformers"] = dict(zip(prompts, hf, strict=True))
    except ImportError as err:
        others["transformers"] = f"transformers is not installed ({err}); pip install 'm3export[dev]'"
    reports = []
    for ref, got in others.items():
        for name in prompts:
            case = f"{name}:ort-vs-{ref}"
            bad = (
                ort
                if isinstance(ort, str)
                else got
                if isinstance(got, str) and got.startswith("FAILED")
                else None
            )
            if bad is not None:
                rep = ParityReport("generate", "pipeline", case, tol.model_dump(mode="json"), (), bad)
            elif isinstance(got, str):
                rep = ParityReport("generate", "pipeline", case, tol.model_dump(mode="json"), skipped=got)
            else:
                assert not isinstance(ort, str)
                want = {"tokens": np.array(got[name])}
                rep = compare_outputs(
                    "generate", "pipeline", case, {"tokens": np.array(ort[name])}, want, tol
                )
            reports.append(rep)
            say(f"[e generate] {case}: {rep.status.upper() if rep.status != 'pass' else 'pass'}")
    golden: dict[str, dict[str, list[int]]] = {}
    if not isinstance(ort, str):
        mtp = others.get("mtp")
        for name in prompts:
            golden[name] = {"plain": ort[name]}
            if isinstance(mtp, dict):
                golden[name]["mtp"] = mtp[name]
    return reports, golden


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).splitlines())[:500]}"


def _export_subgraph(
    export_onnx: Callable[..., Any], stage: nn.Module, plan: SubgraphPlan, spec: M3Spec, moe: Any, path: Path
) -> Any:
    """Export one wrapper at the trace shapes with the plan's symbolic dims as dynamic axes."""
    return export_onnx(
        stage,
        trace_inputs(spec, plan),
        path,
        output_names=plan.output_names,
        dynamic_axes=plan.dynamic_axes,
        opset=spec.export.opset,
        lowering=moe,
    )


def _jsonable(x: Any) -> Any:
    """Replace non-finite floats (inf metrics of a missing output) by strings so the JSON is strict."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    return x


def parity_rows(reports: Sequence[ParityReport]) -> list[tuple[str, ...]]:
    """(subgraph, step, case, output, max_abs, cosine, top1, verdict) per output of every report."""
    rows: list[tuple[str, ...]] = []
    for r in reports:
        if r.skipped is not None:
            rows.append((r.subject, r.step, r.case, "-", "-", "-", "-", f"SKIP ({r.skipped})"))
            continue
        if r.error is not None or not r.outputs:
            rows.append((r.subject, r.step, r.case, "-", "-", "-", "-", f"FAIL ({r.error})"))
            continue
        for o in r.outputs:
            top1 = "-" if o.top1_agreement is None else f"{o.top1_agreement:.4f}"
            verdict = "pass" if o.passed else "FAIL: " + "; ".join(o.failures)
            rows.append(
                (r.subject, r.step, r.case, o.name, f"{o.max_abs:.3g}", f"{o.cosine:.7f}", top1, verdict)
            )
    return rows
