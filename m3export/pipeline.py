"""`m3export build`: split the eager model into planned subgraphs, export each to ONNX, gate on parity.

Steps (each compared with the spec's tolerance of the same name; a step whose tolerance is absent
is not run):

  a. split       chained eager subgraphs vs the full eager model, on every golden case;
  b. onnx        each subgraph exported with the spec's MoE lowering, checked for the lowering's
                 custom nodes, then run in ONNX Runtime vs the eager wrapper, on golden cases whose
                 shapes differ from the trace shapes;
  c. end_to_end  chained ONNX Runtime subgraphs vs the full eager model.

Everything is written to a staging directory and published to `out` when every check passed, or
to `<out>.failed` otherwise (a previous good `out` stays intact).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from m3export.artifacts import (
    MANIFEST,
    SCHEMA_VERSION,
    new_staging_dir,
    publish,
    sha256_file,
    tool_versions,
    write_json_atomic,
)
from m3export.errors import InputError
from m3export.parity.compare import Kind, ParityReport, compare_outputs
from m3export.runners.chain import run_chain, run_chunks
from m3export.spec import M3Spec, dump_spec, spec_hash
from m3export.split.plan import SubgraphPlan, plan_subgraphs

Progress = Callable[[str], None]

# Trace shapes: batch and seq >= 2 and distinct from every other dim (the exporter specialises
# size-1 dims and dims that coincide); golden cases use other shapes so dynamic axes are exercised.
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 16, 5
# Decode parity (step d): the last DECODE_STEPS positions of each golden case are fed one at a time
# through the cache after a chunked prefill of the rest.
DECODE_STEPS = 3
STEP_LETTER = {"split": "a", "onnx": "b", "end_to_end": "c", "decode": "d"}
TRACE_GRIDS: tuple[tuple[int, int, int], ...] = ((1, 4, 4), (1, 4, 8))  # 48 patches, 12 image tokens


@dataclass(frozen=True)
class GoldenCase:
    """One golden input: batch x seq tokens holding the placeholders of `grids` (one image each)."""

    name: str
    batch: int
    seq: int
    grids: tuple[tuple[int, int, int], ...] = ()


def golden_cases(spec: M3Spec) -> list[GoldenCase]:
    """Seq 12 (MSA == dense) and seq 40 (MSA drops blocks with block 8 / top-2), batch 1 and 2,
    0 / 1 / 2 images for a VL spec."""
    if not spec.is_vl:
        return [GoldenCase("b1_s12", 1, 12), GoldenCase("b2_s40", 2, 40), GoldenCase("b2_s12", 2, 12)]
    return [
        GoldenCase("b1_s12_img0", 1, 12),
        GoldenCase("b2_s12_img1", 2, 12, ((1, 2, 4),)),
        GoldenCase("b1_s40_img1", 1, 40, ((1, 4, 6),)),
        GoldenCase("b2_s40_img2", 2, 40, ((1, 4, 4), (1, 6, 4))),
    ]


@dataclass
class SubgraphResult:
    plan: SubgraphPlan
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
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

    @property
    def status(self) -> str:
        return "pass" if self.passed else "fail"

    def failed_subjects(self) -> list[str]:
        return sorted({r.subject for r in self.reports if not r.passed})


# ------------------------------------------------------------------------------------- inputs


def _case_inputs(spec: M3Spec, case: GoldenCase, seed: int) -> dict[str, Tensor]:
    """input_ids / position_ids (+ vision inputs) of one case; placeholders sit in row order."""
    g = torch.Generator().manual_seed(seed)
    vocab = spec.text.vocab_size
    ids = torch.randint(3, min(vocab, 1000), (case.batch, case.seq), generator=g)
    if spec.multimodal is not None:  # keep random ids off the special placeholder ids
        mm = spec.multimodal
        ids[(ids == mm.image_token_index) | (ids == mm.video_token_index)] = 3
    out: dict[str, Tensor] = {}
    if case.grids:
        from m3export.model.vision_inputs import build_vision_inputs

        assert spec.vision is not None and spec.multimodal is not None
        vi = build_vision_inputs(list(case.grids), spec.vision)
        # Place image i's tokens in row i % batch, at offset 1 + (its rank in that row) * (tokens + 1).
        cursor = [1] * case.batch
        for i, n in enumerate(vi.num_tokens):
            row = i % case.batch
            if cursor[row] + n > case.seq:
                raise InputError(
                    f"golden case {case.name}: image {i} ({n} tokens) does not fit seq {case.seq}"
                )
            ids[row, cursor[row] : cursor[row] + n] = spec.multimodal.image_token_index
            cursor[row] += n + 1
        # Feature order is flattened batch-major: reorder images by (row, position).
        order = sorted(range(len(case.grids)), key=lambda i: (i % case.batch, i // case.batch))
        if order != list(range(len(case.grids))):
            vi = build_vision_inputs([case.grids[i] for i in order], spec.vision)
        out["pixel_values"] = torch.randn(vi.num_patches, spec.vision.patch_dim, generator=g).to(
            getattr(torch, spec.dtype)
        )
        out["vision_cos"], out["vision_sin"] = vi.rope_cos, vi.rope_sin
        out["vision_segment_ids"] = vi.segment_ids
        out["image_grid_thw"] = torch.tensor([list(r) for r in vi.grid_thw])
    out["input_ids"] = ids
    out["position_ids"] = torch.arange(case.seq)[None, :].expand(case.batch, case.seq).contiguous()
    return out


def _full_eager(model: nn.Module, spec: M3Spec, inp: dict[str, Tensor]) -> dict[str, Tensor]:
    """Reference outputs of the full eager model, named as the plan's final outputs."""
    with torch.no_grad():
        if spec.is_vl:
            out = model(
                inp["input_ids"],
                inp.get("pixel_values"),
                inp.get("image_grid_thw"),
                inp["position_ids"],
            )
        else:
            out = model(inp["input_ids"], position_ids=inp["position_ids"])
    ref = {"logits": out.logits}
    if spec.text.num_mtp_modules:
        ref["final_hidden_states"] = out.hidden_states
        for d, t in enumerate(out.mtp_per_depth_logits or []):
            ref[f"mtp_logits.{d}"] = t
    return ref


def _np(t: Tensor) -> np.ndarray:
    return t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy()


def _kinds(names: Sequence[str]) -> dict[str, Kind]:
    return {n: ("logits" if "logits" in n else "tensor") for n in names}


# ------------------------------------------------------------------------------------- build


def build(
    spec: M3Spec,
    out_dir: str | Path,
    only: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Build every planned subgraph (or those in `only`) and publish them with a manifest.

    Steps a and c need every subgraph, so with `only` they run only if `only` names them all.
    """
    from m3export.export.onnx_export import export_onnx
    from m3export.forward import load_model
    from m3export.ops.lowering import get_lowering
    from m3export.runners.ort_runner import OrtRunner
    from m3export.runners.torch_runner import TorchRunner
    from m3export.split.subgraphs import build_stage

    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    out = Path(out_dir)
    plans = plan_subgraphs(spec)
    names = [p.name for p in plans]
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise InputError(f"--only: unknown subgraph(s) {unknown}; this spec plans {names}")
    selected = [p for p in plans if not only or p.name in only]
    complete = len(selected) == len(plans)
    moe_name = spec.export.moe
    moe = get_lowering(moe_name)
    tols = spec.tolerances
    image_token = spec.multimodal.image_token_index if spec.multimodal else None

    say(f"load model {spec.name} ({'checkpoint' if spec.weights.checkpoint else 'random'} weights)")
    model = load_model(spec)
    stages = {p.name: build_stage(model, p, image_token) for p in plans}
    torch_runners = {
        p.name: TorchRunner(stages[p.name], p.input_names, p.output_names, f"torch:{p.name}") for p in plans
    }

    def run_torch(plan: SubgraphPlan, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return torch_runners[plan.name].infer(feed)

    hidden = spec.text.hidden_size
    cases = golden_cases(spec)
    case_tensors = {c.name: _case_inputs(spec, c, seed=1000 + i) for i, c in enumerate(cases)}
    case_inputs = {name: {k: _np(v) for k, v in inp.items()} for name, inp in case_tensors.items()}
    refs = {
        c.name: {k: _np(v) for k, v in _full_eager(model, spec, case_tensors[c.name]).items()} for c in cases
    }
    final_names = list(refs[cases[0].name])

    def chunked(c: GoldenCase, run: Any) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
        bounds = [c.seq - DECODE_STEPS + i for i in range(DECODE_STEPS)]
        return run_chunks(plans, case_inputs[c.name], run, bounds, hidden_size=hidden, outputs=final_names)

    eager = {c.name: run_chain(plans, case_inputs[c.name], run_torch, hidden_size=hidden) for c in cases}
    # Golden feeds per subgraph: each case's prompt forward (past_seq 0), and its last decode step
    # (past_seq S-1, seq 1) from a chunked run through the eager cache.
    eager_decode = {c.name: chunked(c, run_torch) for c in cases}
    feeds_by_case: list[tuple[str, dict[str, dict[str, np.ndarray]]]] = []
    for c in cases:
        feeds_by_case += [(c.name, eager[c.name].feeds), (f"{c.name}.decode", eager_decode[c.name][1])]

    results = {p.name: SubgraphResult(p) for p in selected}
    global_reports: list[ParityReport] = []
    staging = new_staging_dir(out)

    def gate(step: str, case: str, got: dict[str, np.ndarray], tol: Any) -> None:
        rep = compare_outputs(step, "pipeline", case, got, refs[case.split(":")[0]], tol, _kinds(final_names))
        global_reports.append(rep)
        say(f"[{STEP_LETTER[step]} {step}] {case}: {'pass' if rep.passed else 'FAIL'}")

    # a. split: chained eager subgraphs vs the full model (exact: the wrappers share the modules).
    if tols.split is not None and complete:
        for c in cases:
            gate("split", c.name, eager[c.name].values, tols.split)

    # b. onnx: export each subgraph, then ORT vs the eager wrapper on the golden feeds.
    ort_runners: dict[str, OrtRunner] = {}
    for plan in selected:
        res = results[plan.name]
        sub_dir = staging / plan.name
        sub_dir.mkdir()
        say(f"[b export] {plan.name} (moe lowering {moe_name})")
        try:
            art = _export_subgraph(
                export_onnx, stages[plan.name], plan, spec, moe, sub_dir / f"{plan.name}.onnx"
            )
        except Exception as err:  # the lowering check or the exporter failed: a failed gate, not a crash
            msg = f"export failed: {type(err).__name__}: {' '.join(str(err).splitlines())[:500]}"
            res.reports.append(ParityReport("onnx", plan.name, "export", {}, (), msg))
            say(f"[b export] {plan.name}: FAIL {msg}")
            continue
        res.node_counts, res.export_seconds = art.node_counts, art.export_seconds
        ort_runners[plan.name] = OrtRunner(art.path)
        golden_in: dict[str, np.ndarray] = {}
        golden_out: dict[str, np.ndarray] = {}
        for case, feeds in feeds_by_case:
            feed = feeds.get(plan.name)
            if feed is None:  # vision without images, or a decode step
                continue
            want = torch_runners[plan.name].infer(feed)
            golden_in.update({f"{case}/{k}": v for k, v in feed.items()})
            golden_out.update({f"{case}/{k}": v for k, v in want.items()})
            if tols.onnx is None:
                continue
            try:
                got = ort_runners[plan.name].infer(feed)
                rep = compare_outputs(
                    "onnx", plan.name, case, got, want, tols.onnx, _kinds(plan.output_names)
                )
            except Exception as err:
                rep = ParityReport(
                    "onnx", plan.name, case, tols.onnx.model_dump(mode="json"), (), f"ORT: {err}"
                )
            res.reports.append(rep)
            say(f"[b onnx] {plan.name} {case}: {'pass' if rep.passed else 'FAIL'}")
        np.savez(sub_dir / "golden_inputs.npz", **golden_in)  # type: ignore[arg-type]
        np.savez(sub_dir / "golden_outputs.npz", **golden_out)  # type: ignore[arg-type]
        for f in sorted(sub_dir.iterdir()):
            res.files[f"{plan.name}/{f.name}"] = sha256_file(f)

    all_ort = complete and len(ort_runners) == len(plans)

    def run_ort(plan: SubgraphPlan, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return ort_runners[plan.name].infer(feed)

    # c. end_to_end: chained ORT subgraphs vs the full eager model.
    if tols.end_to_end is not None and all_ort:
        for c in cases:
            values = run_chain(plans, case_inputs[c.name], run_ort, hidden_size=hidden).values
            gate("end_to_end", c.name, values, tols.end_to_end)

    # d. decode: a chunked prefill then DECODE_STEPS one-token steps through the KV cache vs the
    # full recompute, for the eager stages and the chained ORT graphs.
    if tols.decode is not None and complete:
        for c in cases:
            gate("decode", f"{c.name}:torch", eager_decode[c.name][0], tols.decode)
            if all_ort:
                gate("decode", f"{c.name}:ort", chunked(c, run_ort)[0], tols.decode)

    reports = [r for p in selected for r in results[p.name].reports] + global_reports
    passed = all(r.passed for r in reports)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "spec": dump_spec(spec),
        "spec_hash": spec_hash(spec),
        "tool_versions": tool_versions(),
        "moe_lowering": moe_name,
        "status": "pass" if passed else "fail",
        "only": list(only) if only else None,
        "trace_shapes": {
            "batch": TRACE_BATCH,
            "seq": TRACE_SEQ,
            "past_seq": TRACE_PAST,
            "grids": [list(g) for g in TRACE_GRIDS],
        },
        "golden_cases": [
            {"name": c.name, "batch": c.batch, "seq": c.seq, "grids": [list(g) for g in c.grids]}
            for c in cases
        ],
        "subgraphs": {
            name: {
                **r.plan.to_json(),
                "files": r.files,
                "node_counts": r.node_counts,
                "export_seconds": r.export_seconds,
                "parity": [rep.to_json() for rep in r.reports],
            }
            for name, r in results.items()
        },
        "parity": [rep.to_json() for rep in global_reports],
    }
    write_json_atomic(staging / MANIFEST, _jsonable(manifest))
    dest = out if passed else out.with_name(out.name + ".failed")
    publish(staging, dest)
    say(f"published {dest} ({'pass' if passed else 'FAIL'})")
    return BuildResult(dest, passed, reports, manifest, time.perf_counter() - start)


def _export_subgraph(
    export_onnx: Callable[..., Any], stage: nn.Module, plan: SubgraphPlan, spec: M3Spec, moe: Any, path: Path
) -> Any:
    """Export one wrapper at the trace shapes with the plan's symbolic dims as dynamic axes."""
    import torch.fx.experimental._config as fx_config

    trace = _trace_inputs(spec, plan)
    dynamic_axes = {s.name: {i: d for i, d in enumerate(s.dims) if isinstance(d, str)} for s in plan.inputs}
    # Text stages: size-oblivious reasoning keeps batch/seq symbolic through the MSA block logic.
    with fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
        return export_onnx(
            stage,
            trace,
            path,
            output_names=plan.output_names,
            dynamic_axes=dynamic_axes,
            opset=spec.export.opset,
            lowering=moe,
        )


def _trace_inputs(spec: M3Spec, plan: SubgraphPlan) -> dict[str, Tensor]:
    """Random inputs at the trace shapes, named and typed as the plan's inputs."""
    g = torch.Generator().manual_seed(7)
    case = GoldenCase("trace", TRACE_BATCH, TRACE_SEQ, TRACE_GRIDS if spec.is_vl else ())
    base = _case_inputs(spec, case, seed=7)
    act = getattr(torch, spec.dtype)
    n_img = (
        sum(t * h * w for t, h, w in TRACE_GRIDS) // (spec.vision.spatial_merge_size**2) if spec.vision else 0
    )
    h = spec.text.hidden_size
    extra = {
        "image_features": torch.randn(n_img, h, generator=g).to(act),
        "hidden_states": torch.randn(TRACE_BATCH, TRACE_SEQ, h, generator=g).to(act),
        "final_hidden_states": torch.randn(TRACE_BATCH, TRACE_SEQ, h, generator=g).to(act),
        "mtp_input_ids": base["input_ids"],
    }
    # Positions continue after TRACE_PAST cached ones (a chunked-prefill call).
    base["position_ids"] = base["position_ids"] + TRACE_PAST
    sizes = {"batch": TRACE_BATCH, "past_seq": TRACE_PAST}
    for sig in plan.cache_inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in sig.dims]
        extra[sig.name] = torch.randn(*shape, generator=g).to(act)
    return {s.name: base[s.name] if s.name in base else extra[s.name] for s in plan.inputs}


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
