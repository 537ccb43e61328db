"""The parity steps of a build, as a table: adding a step is one `StepDef` and one function.

  a  split       chained eager subgraphs vs the full eager model, every golden case (exact);
  b  onnx        each subgraph in ONNX Runtime vs its eager wrapper on its golden feeds (prompt,
                 one-token decode, video), a failure localised to its first divergent layer;
  b  routing     per MoE layer, the expert set each token selects in the graph vs eagerly;
  c  end_to_end  the ONNX Runtime subgraphs chained vs the reference;
  d  decode      chunked prefill + one-token steps through the KV cache vs the reference, eager
                 stages and (when every subgraph exported) chained ONNX Runtime;
  e  generate    greedy tokens: ONNX Runtime vs eager torch vs transformers, MTP speculative vs
                 plain; the ONNX Runtime tokens are kept for `check`;
  f  precision   a reduced-precision build (export.precision.dtype float16): the pipeline, eager in
                 that precision and chained ONNX Runtime, vs the fp32 eager model on the same weights
                 (cosine, top-1; absent from a float32 build, which has nothing to compare).

`scope` "subgraph": run in each subgraph's pass while its sessions are open (export_step.py);
"build": run after every pass, on the streamed outputs. `needs`: "always", "complete" (every
planned subgraph built), "all_exported" (and each ran in ONNX Runtime), "whole_model" (the whole
model fits the memory budget: `Context.whole` is set). The reference is the full eager model where
it fits, else the chained eager stages (which step a proves bit-identical to it wherever it runs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from torch import nn

from m3export.build.export_step import SubgraphExport, SubgraphSessions
from m3export.build.prepare import CaseStream
from m3export.parity.compare import ParityReport, compare_outputs, kinds_by_name
from m3export.parity.intermediates import localise, routing_report
from m3export.runners.decode import generate_tokens
from m3export.spec import M3Spec
from m3export.spec.base import Tolerance
from m3export.split.inputs import labelled
from m3export.split.plan import SubgraphPlan

Progress = Callable[[str], None]
Run = Callable[[SubgraphPlan, dict[str, np.ndarray]], dict[str, np.ndarray]]
GENERATE_TOKENS = 16  # step e: new tokens per prompt (decode queries reach past 2 x top-k blocks)


@dataclass(frozen=True)
class WholeModel:
    """The whole model resident (only when it fits the budget): eager, every ORT session, references."""

    model: nn.Module
    run_torch: Run
    run_ort: Run | None  # None unless every subgraph exported and ran
    refs: Mapping[str, dict[str, np.ndarray]]  # case -> the full eager model's outputs


@dataclass(frozen=True)
class Context:
    """What the build-scoped steps see: the streamed outputs, the exports and (maybe) the whole model."""

    spec: M3Spec
    plans: tuple[SubgraphPlan, ...]
    eager: Sequence[CaseStream]
    ort: Sequence[CaseStream]
    exports: Mapping[str, SubgraphExport]
    complete: bool
    ort_broken: str | bool
    whole: WholeModel | None
    final_names: list[str]
    say: Progress
    ref32: Sequence[CaseStream] | None = None  # a reduced-precision build's fp32 reference streams

    @property
    def all_exported(self) -> bool:
        return (
            self.complete and not self.ort_broken and all(self.exports[p.name].onnx_path for p in self.plans)
        )

    def ref(self, case: str) -> dict[str, np.ndarray]:
        """The reference outputs of a golden case (see the module docstring)."""
        if self.whole is not None:
            return self.whole.refs[case]
        return next(s for s in self.eager if s.case.name == case).outputs(self.final_names)


@dataclass(frozen=True)
class StepResult:
    reports: list[ParityReport]
    golden_tokens: dict[str, dict[str, list[int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class StepDef:
    name: str
    letter: str
    tolerance: str  # the TolerancesSpec field it is gated by
    scope: Literal["subgraph", "build"]
    needs: tuple[Literal["complete", "all_exported", "whole_model"], ...]
    run: Callable[[Any, Tolerance], StepResult]


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).splitlines())[:500]}"


def _gate(
    ctx: Context,
    step: str,
    case: str,
    base: str,
    produce: Callable[[], dict[str, np.ndarray]],
    tol: Tolerance,
) -> ParityReport:
    """`produce()`'s final outputs vs the reference of golden case `base`; a crash is a failed report."""
    try:
        got = produce()
        return compare_outputs(
            step, "pipeline", case, got, ctx.ref(base), tol, kinds_by_name(ctx.final_names)
        )
    except Exception as err:  # a runner or chain failure is a failed gate, not a crash
        return ParityReport(step, "pipeline", case, tol.model_dump(mode="json"), (), _describe(err))


# ------------------------------------------------------------------------------- subgraph scope


def run_onnx(s: SubgraphSessions, tol: Tolerance) -> StepResult:
    """b: the subgraph in ONNX Runtime on each golden feed; a failing case is localised layer by layer."""
    kinds = kinds_by_name(s.plan.output_names)
    reports = []
    for case, feed in s.feeds.items():
        try:
            rep = compare_outputs("onnx", s.plan.name, case, s.ort().infer(feed), s.eager[case], tol, kinds)
            if rep.failed:
                rep = localise(rep, s.debug().infer(feed), s.intermediates[case], tol)
        except Exception as err:
            rep = ParityReport("onnx", s.plan.name, case, tol.model_dump(mode="json"), (), f"ORT: {err}")
        reports.append(rep)
    return StepResult(reports)


def run_routing(s: SubgraphSessions, tol: Tolerance) -> StepResult:
    """b: each MoE layer's expert choice in the parity copy vs the eager router, per golden feed."""
    reports = []
    for case, feed in s.feeds.items():
        want = s.intermediates[case]
        if not any(n.endswith(".experts") for n in want):
            continue
        try:
            rep = routing_report("routing", s.plan.name, case, s.debug().infer(feed), want, tol)
        except Exception as err:
            rep = ParityReport("routing", s.plan.name, case, tol.model_dump(mode="json"), (), f"ORT: {err}")
        reports.append(rep)
    return StepResult(reports)


# ------------------------------------------------------------------------------- build scope


def run_split(ctx: Context, tol: Tolerance) -> StepResult:
    """a: the stage wrappers run the full model's own modules, so the chain must be bit-identical to it."""
    return StepResult(
        [
            _gate(ctx, "split", s.case.name, s.case.name, functools.partial(s.outputs, ctx.final_names), tol)
            for s in ctx.eager
        ]
    )


def run_end_to_end(ctx: Context, tol: Tolerance) -> StepResult:
    """c: the ONNX Runtime subgraphs chained on each case vs the reference."""
    return StepResult(
        [
            _gate(
                ctx,
                "end_to_end",
                s.case.name,
                s.case.name,
                functools.partial(s.outputs, ctx.final_names),
                tol,
            )
            for s in ctx.ort
        ]
    )


def run_decode(ctx: Context, tol: Tolerance) -> StepResult:
    """d: chunked prefill + one-token steps through the cache, eager stages and chained ORT."""
    reports = []
    for backend, streams in (("torch", ctx.eager), ("ort", ctx.ort if ctx.all_exported else [])):
        for s in streams:
            produce = functools.partial(s.chunked_outputs, ctx.final_names)
            reports.append(_gate(ctx, "decode", labelled(s.case.name, backend), s.case.name, produce, tol))
    return StepResult(reports)


def run_generate(ctx: Context, tol: Tolerance) -> StepResult:
    """e: GENERATE_TOKENS greedy tokens per batch-1 prompt, ORT vs eager torch vs transformers'
    generate (skipped without transformers) and MTP speculative vs plain decoding (ORT)."""
    from m3export.parity.hf_oracle import hf_greedy

    whole = ctx.whole
    assert whole is not None and whole.run_ort is not None
    prompts = {s.case.name: _prompt(s) for s in ctx.eager if s.case.batch == 1}

    def tokens(run: Any, mtp: bool = False) -> dict[str, list[int]] | str:
        try:
            return {
                n: generate_tokens(ctx.spec, ctx.plans, run, p, GENERATE_TOKENS, mtp=mtp).tokens
                for n, p in prompts.items()
            }
        except Exception as err:  # a decoding failure is a failed gate, not a crash
            return f"FAILED: {_describe(err)}"

    ort = tokens(whole.run_ort)
    others: dict[str, dict[str, list[int]] | str] = {"torch": tokens(whole.run_torch)}
    if ctx.spec.text.num_mtp_modules:
        others["mtp"] = tokens(whole.run_ort, mtp=True)
    try:
        hf = hf_greedy(ctx.spec, whole.model, list(prompts.values()), GENERATE_TOKENS)
        others["transformers"] = dict(zip(prompts, hf, strict=True))
    except ImportError as err:
        others["transformers"] = f"transformers is not installed ({err}); pip install 'm3export[dev]'"
    reports = [_token_report(name, ref, ort, got, tol) for ref, got in others.items() for name in prompts]
    golden: dict[str, dict[str, list[int]]] = {}
    if not isinstance(ort, str):
        mtp = others.get("mtp")
        for name in prompts:
            golden[name] = {"plain": ort[name], **({"mtp": mtp[name]} if isinstance(mtp, dict) else {})}
    return StepResult(reports, golden)


def run_precision(ctx: Context, tol: Tolerance) -> StepResult:
    """f: a reduced-precision build's pipeline (eager in that precision, and chained ONNX Runtime when
    every subgraph exported) vs the fp32 eager model on the same weights, every golden case."""
    assert ctx.ref32 is not None
    fp32 = {s.case.name: s.outputs(ctx.final_names) for s in ctx.ref32}
    reports = []
    for backend, streams in (("torch", ctx.eager), ("ort", ctx.ort if ctx.all_exported else [])):
        for s in streams:
            case = labelled(s.case.name, backend)
            try:
                got = s.outputs(ctx.final_names)
                rep = compare_outputs(
                    "precision", "pipeline", case, got, fp32[s.case.name], tol, kinds_by_name(ctx.final_names)
                )
            except Exception as err:
                rep = ParityReport(
                    "precision", "pipeline", case, tol.model_dump(mode="json"), (), _describe(err)
                )
            reports.append(rep)
    return StepResult(reports)


def _prompt(stream: CaseStream) -> dict[str, np.ndarray]:
    """A golden case's own inputs (ids, positions, pixels): what a prompt hands the chain."""
    return dict(stream.inputs)


def _token_report(
    name: str, ref: str, ort: dict[str, list[int]] | str, got: dict[str, list[int]] | str, tol: Tolerance
) -> ParityReport:
    case = f"{name}:ort-vs-{ref}"
    bad = ort if isinstance(ort, str) else got if isinstance(got, str) and got.startswith("FAILED") else None
    if bad is not None:
        return ParityReport("generate", "pipeline", case, tol.model_dump(mode="json"), (), bad)
    if isinstance(got, str):
        return ParityReport("generate", "pipeline", case, tol.model_dump(mode="json"), skipped=got)
    assert not isinstance(ort, str)
    return compare_outputs(
        "generate", "pipeline", case, {"tokens": np.array(ort[name])}, {"tokens": np.array(got[name])}, tol
    )


STEPS: tuple[StepDef, ...] = (
    StepDef("split", "a", "split", "build", ("complete", "whole_model"), run_split),
    StepDef("onnx", "b", "onnx", "subgraph", (), run_onnx),
    StepDef("routing", "b", "onnx", "subgraph", (), run_routing),
    StepDef("end_to_end", "c", "end_to_end", "build", ("all_exported",), run_end_to_end),
    StepDef("decode", "d", "decode", "build", ("complete",), run_decode),
    StepDef("generate", "e", "generate", "build", ("all_exported", "whole_model"), run_generate),
    StepDef("precision", "f", "precision", "build", ("complete",), run_precision),
)


def _say(say: Progress, step: StepDef, reports: list[ParityReport]) -> None:
    for rep in reports:
        verdict = rep.status.upper() if rep.status != "pass" else "pass"
        say(f"[{step.letter} {rep.step}] {rep.subject} {rep.case}: {verdict}")


def run_subgraph_steps(sessions: SubgraphSessions, tolerances: Any, say: Progress) -> list[ParityReport]:
    """Every subgraph-scoped step on one subgraph (called from its pass)."""
    reports: list[ParityReport] = []
    for step in (s for s in STEPS if s.scope == "subgraph"):
        result = step.run(sessions, getattr(tolerances, step.tolerance))
        _say(say, step, result.reports)
        reports += result.reports
    return reports


def run_build_steps(
    ctx: Context, tolerances: Any
) -> tuple[list[ParityReport], dict[str, dict[str, list[int]]]]:
    """Every build-scoped step whose needs are met, in table order; the reports and step e's tokens.
    A step whose needs are not met is reported as skipped with the reason (never as passed)."""
    unmet = {
        "complete": None if ctx.complete else "the build is partial (--only)",
        "all_exported": None if ctx.all_exported else _why_not_exported(ctx),
        "whole_model": None
        if ctx.whole is not None
        else "the whole model does not fit the build's memory budget",
    }
    reports: list[ParityReport] = []
    tokens: dict[str, dict[str, list[int]]] = {}
    for step in (s for s in STEPS if s.scope == "build"):
        if getattr(tolerances, step.tolerance) is None:  # `precision` of a float32 build: nothing to compare
            continue
        reason = next((r for need in step.needs if (r := unmet[need]) is not None), None)
        if reason is not None:
            rep = ParityReport(step.name, "pipeline", "-", {}, skipped=reason)
            _say(ctx.say, step, [rep])
            reports.append(rep)
            continue
        result = step.run(ctx, getattr(tolerances, step.tolerance))
        _say(ctx.say, step, result.reports)
        reports += result.reports
        tokens |= result.golden_tokens
    return reports, tokens


def _why_not_exported(ctx: Context) -> str:
    if not ctx.complete:
        return "the build is partial (--only)"
    if ctx.ort_broken:
        return f"a subgraph failed to run in ONNX Runtime ({ctx.ort_broken})"
    failed = [p.name for p in ctx.plans if not ctx.exports[p.name].onnx_path]
    return f"export failed for {', '.join(failed)}"
