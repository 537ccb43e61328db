"""`m3export check`: verify a built artifact directory, then re-run what its goldens can reproduce.

Integrity first (m3export/artifacts/verify.py, then the header of every TensorRT-RTX engine through
`Runtime.get_engine_validity` in a child process, no GPU needed; a failure raises `ArtifactError`,
exit 3, before anything is run), and the backend's availability and runtime range (exit 2). Then, with the chosen
backend (a failure is exit 1):

- `build`:      the build's own verdict: a build that recorded a failure never passes;
- `onnx`:       each subgraph on its stored golden inputs vs its golden outputs (tolerances.onnx);
- `routing`:    per MoE layer, the graph's expert choice vs the eager one (golden intermediates);
- `end_to_end`: per case the subgraphs chained by the one chain mechanism (m3export/runners/chain.py)
                from the case's stored inputs; every subgraph's outputs vs its golden outputs;
- `generate`:   greedy (and MTP speculative) decoding of the golden prompts vs the build's tokens.

`split` needs the eager PyTorch model and `precision` (a reduced-precision build) the fp32 one; they
are listed as not re-run, never counted as passed. A check
that compared nothing has not passed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from m3export.artifacts.io import atomic_write
from m3export.artifacts.verify import Progress, SubgraphArtifact, VerifiedArtifacts, verify_artifacts
from m3export.errors import ArtifactError, InputError
from m3export.export.trt.rtx import engine_headers, rtx_unavailable
from m3export.parity.compare import ParityReport, compare_outputs
from m3export.parity.intermediates import localise, routing_report
from m3export.parity.report import REPORT_VERSION, CheckEntry, LayerError, render_reports, report_paths
from m3export.runners.base import Runner
from m3export.runners.chain import VIDEO_INPUTS, run_chain
from m3export.runners.decode import generate_tokens
from m3export.runners.registry import get_backend, open_runners
from m3export.spec.base import Tolerance
from m3export.split.inputs import VIDEO_SUFFIX, video_case

BACKENDS: tuple[str, ...] = ("ort", "trt")
EXIT_CODES = {"pass": 0, "parity_failure": 1, "integrity_failure": 3}
MakeRunner = Callable[[SubgraphArtifact], Any]  # -> a runner with infer(feed) -> outputs


@dataclass(frozen=True)
class CheckResult:
    """What `check` found: the verified files, one entry per step/subgraph/case, and the verdict."""

    root: Path
    backend: str
    files: dict[str, str]
    entries: tuple[CheckEntry, ...]
    seconds: float
    cases: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    engines: tuple[dict[str, Any], ...] = ()  # TensorRT-RTX engine headers checked (`rtx_engine_headers`)
    integrity_error: str | None = None
    report_files: tuple[Path, ...] = field(default=())

    @property
    def status(self) -> str:
        if self.integrity_error is not None:
            return "integrity_failure"
        # A gate that compared nothing has not passed.
        ok = bool(self.entries) and all(e.report.passed for e in self.entries)
        return "pass" if ok else "parity_failure"

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def failures(self) -> list[str]:
        """One line per failing entry: `step subgraph case: what failed`."""
        if self.integrity_error is not None:
            return [self.integrity_error]
        if not self.entries:
            return ["nothing was compared (no golden cases): a gate that compared nothing has not passed"]
        return [
            f"{e.report.step} {e.report.subject} {e.report.case}: {'; '.join(e.report.failures())}"
            for e in self.entries
            if not e.report.passed
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "report_version": REPORT_VERSION,
            "command": "m3export check",
            "artifacts": str(self.root),
            "backend": self.backend,
            "status": self.status,
            "exit_code": self.exit_code,
            "seconds": self.seconds,
            "integrity": {
                "passed": self.integrity_error is None,
                "error": self.integrity_error,
                "files": self.files,
            },
            "cases": list(self.cases),
            "skipped": list(self.skipped),
            "engines": list(self.engines),
            "results": [e.to_json() for e in self.entries],
        }


# ------------------------------------------------------------------------------------- parity


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).splitlines())[:300]}"


def _infer(
    runner: Any, feed: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray] | None, str | None, float]:
    t0 = time.perf_counter()
    try:
        return runner.infer(feed), None, time.perf_counter() - t0
    except Exception as err:  # a runtime failure on a verified artifact is a failed check, not a crash
        return None, _describe(err), time.perf_counter() - t0


def _compare(
    step: str,
    sub: SubgraphArtifact,
    case: str,
    got: dict[str, np.ndarray] | None,
    err: str | None,
    tol: Tolerance,
) -> ParityReport:
    if got is None:
        return ParityReport(
            step, sub.name, case, tol.model_dump(mode="json"), (), f"{step} run failed: {err}"
        )
    return compare_outputs(step, sub.name, case, got, sub.golden_outputs[case], tol, sub.kinds)


def _layer_errors(rep: ParityReport) -> tuple[LayerError, ...]:
    layers = (rep.localisation or {}).get("layers", [])
    return tuple(LayerError(lay["layer"], float(lay["max_abs"])) for lay in layers)


def _build_verdict(arts: VerifiedArtifacts) -> list[CheckEntry]:
    """A failing entry when the build itself recorded a failure: check never passes a failed build."""
    status, failed = arts.build_status
    if status == "pass":
        return []
    what = f"the build recorded status {status!r}" + (f" (failed: {', '.join(failed)})" if failed else "")
    return [CheckEntry(ParityReport("build", "pipeline", "-", {}, (), f"{what}; rebuild it"))]


def _onnx(arts: VerifiedArtifacts, sub: SubgraphArtifact, runner: Runner, tol: Tolerance) -> list[CheckEntry]:
    """Each subgraph alone on its golden inputs; a failure is localised to its first divergent layer."""
    entries = []
    for case in arts.cases:
        if case not in sub.golden_inputs:  # e.g. vision on a case without images
            continue
        got, err, secs = _infer(runner, sub.golden_inputs[case])
        rep = _compare("onnx", sub, case, got, err, tol)
        if rep.failed and got is not None and sub.goldens.intermediates.get(case):
            dbg, _, _ = _infer(sub.debug_runner(), sub.golden_inputs[case])
            rep = localise(rep, dbg or {}, sub.goldens.intermediates[case], tol)
        entries.append(CheckEntry(rep, secs, _layer_errors(rep)))
    return entries


def _routing(
    arts: VerifiedArtifacts, sub: SubgraphArtifact, tol: Tolerance, backend: str
) -> tuple[list[CheckEntry], list[str]]:
    """Routing agreement per MoE layer: the exposed graph's expert indices vs the build's eager ones."""
    want = {
        c: {k: v for k, v in dbg.items() if k.endswith(".experts")}
        for c, dbg in sub.goldens.intermediates.items()
    }
    want = {c: w for c, w in want.items() if w}
    if not want:
        return [], []
    if backend != "ort":
        return [], [f"routing {sub.name} (the {backend} graph routes inside its MoE plugin node)"]
    runner = sub.debug_runner()
    entries = []
    for case in arts.cases:
        if case not in want:
            continue
        got, err, secs = _infer(runner, sub.golden_inputs[case])
        rep = (
            ParityReport("routing", sub.name, case, tol.model_dump(mode="json"), (), f"run failed: {err}")
            if got is None
            else routing_report("routing", sub.name, case, got, want[case], tol)
        )
        entries.append(CheckEntry(rep, secs))
    return entries, []


def _case_inputs(arts: VerifiedArtifacts, case: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A case's chain inputs and cache, from the stored golden inputs of every subgraph: what the
    chain does not produce itself (ids, positions, pixels, MTP ids, the past caches) is taken from them;
    the vision subgraph's `.video` goldens are the case's video inputs."""
    inputs: dict[str, np.ndarray] = {}
    cache: dict[str, np.ndarray] = {}
    for sub in arts.subgraphs:
        for name, value in sub.golden_inputs.get(case, {}).items():
            (cache if name.startswith("past.") else inputs)[name] = value
        for name, value in sub.golden_inputs.get(video_case(case), {}).items():
            inputs[VIDEO_INPUTS[name]] = value
    return inputs, cache


class _Timed:
    """Runs subgraphs with `runners`, adding up the seconds each one took."""

    def __init__(self, runners: dict[str, Runner]) -> None:
        self.runners = runners
        self.seconds: dict[str, float] = {}

    def __call__(self, plan: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        try:
            return self.runners[plan.name].infer(feed)
        finally:
            self.seconds[plan.name] = self.seconds.get(plan.name, 0.0) + time.perf_counter() - t0


def _chain(arts: VerifiedArtifacts, runners: dict[str, Runner], tol: Tolerance) -> list[CheckEntry]:
    """Per case the subgraphs chained in plan order (runners.chain.run_chain): each fed what earlier
    ones produced; every subgraph's outputs (the vision subgraph's on images and on videos) vs its
    golden outputs. A subgraph that does not produce exactly its planned outputs fails the chain."""
    chain: list[CheckEntry] = []
    for case in (c for c in arts.cases if not c.endswith(VIDEO_SUFFIX)):
        timed = _Timed(runners)
        inputs, cache = _case_inputs(arts, case)
        values: dict[str, np.ndarray] | None = None
        err = None
        try:
            values = run_chain(
                arts.plans, inputs, timed, cache, hidden_size=arts.spec.text.hidden_size
            ).values
        except Exception as exc:  # a runner failure or a graph that breaks the plan: a failed check
            err = _describe(exc)
        for sub in arts.subgraphs:
            for label, names in _produced(sub, case):
                got = None if values is None else {n: values[v] for n, v in names.items()}
                rep = _compare("end_to_end", sub, label, got, err, tol)
                chain.append(CheckEntry(rep, timed.seconds.get(sub.name, 0.0)))
    order = {s.name: i for i, s in enumerate(arts.subgraphs)}  # grouped per subgraph, in chain order
    chain.sort(key=lambda e: order[e.report.subject])
    return chain


def _produced(sub: SubgraphArtifact, case: str) -> list[tuple[str, dict[str, str]]]:
    """(golden case, output -> chain value) of what `sub` produced in the chain of `case`: the vision
    subgraph's image run feeds `image_features`, its video run `video_features`."""
    out = []
    if case in sub.golden_outputs:
        out.append((case, {n: n for n in sub.outputs}))
    if sub.plan.kind == "vision" and video_case(case) in sub.golden_outputs:
        out.append((video_case(case), {n: "video_features" for n in sub.outputs}))
    return out


def _prompt(arts: VerifiedArtifacts, case: str) -> dict[str, np.ndarray]:
    """The batch-1 prompt of a golden case, rebuilt from the stored goldens (ids, positions, pixels)."""
    inputs, _ = _case_inputs(arts, case)
    keep = {"input_ids", "position_ids", *VIDEO_INPUTS, *VIDEO_INPUTS.values()}
    return {k: v for k, v in inputs.items() if k in keep}


def _generate(arts: VerifiedArtifacts, runners: dict[str, Runner], tol: Tolerance) -> list[CheckEntry]:
    """Greedy decoding (and MTP speculative decoding) of the golden prompts vs the build's tokens."""
    run = lambda plan, feed: runners[plan.name].infer(feed)  # noqa: E731
    entries = []
    for case, modes in arts.golden_tokens.items():
        prompt = _prompt(arts, case)
        for mode, want in modes.items():
            t0 = time.perf_counter()
            label = f"{case}:{mode}"
            try:
                got = generate_tokens(arts.spec, arts.plans, run, prompt, len(want), mtp=mode == "mtp").tokens
                rep = compare_outputs(
                    "generate", "pipeline", label, {"tokens": np.array(got)}, {"tokens": np.array(want)}, tol
                )
            except Exception as err:  # a runtime failure on a verified artifact is a failed check
                rep = ParityReport(
                    "generate", "pipeline", label, tol.model_dump(mode="json"), (), _describe(err)
                )
            entries.append(CheckEntry(rep, time.perf_counter() - t0))
    return entries


def run_parity(
    arts: VerifiedArtifacts, make_runner: MakeRunner, say: Progress, backend: str = "ort"
) -> tuple[list[CheckEntry], list[str]]:
    """The build's verdict, the `onnx` and `routing` steps per subgraph, the `end_to_end` chain per
    case and greedy `generate` on the golden prompts (see the module docstring)."""
    tols = arts.spec.tolerances
    skipped = ["split (needs the eager PyTorch model; the build ran it)"]
    if tols.precision is not None:
        skipped.append("precision (needs the fp32 eager model; the build ran it)")
    runners = {s.name: make_runner(s) for s in arts.subgraphs}
    entries: list[CheckEntry] = _build_verdict(arts)
    for sub in arts.subgraphs:
        mine = _onnx(arts, sub, runners[sub.name], tols.onnx)
        routing, skips = _routing(arts, sub, tols.onnx, backend)
        mine += routing
        skipped += skips
        bad = sum(not e.report.passed for e in mine)
        say(f"[onnx] {sub.name}: {'pass' if not bad else f'FAIL ({bad} case(s))'}")
        entries += mine
    chain = _chain(arts, runners, tols.end_to_end)
    bad_chain = [e for e in chain if not e.report.passed]
    cases = sum(1 for c in arts.cases if not c.endswith(VIDEO_SUFFIX))
    say(f"[end_to_end] {cases} case(s): {'pass' if not bad_chain else f'FAIL ({len(bad_chain)})'}")
    gen = _generate(arts, runners, tols.generate)
    if gen:
        bad_gen = [e for e in gen if not e.report.passed]
        say(f"[generate] {len(gen)} prompt(s): {'pass' if not bad_gen else f'FAIL ({len(bad_gen)})'}")
    return entries + chain + gen, skipped


def rtx_engine_headers(arts: VerifiedArtifacts, say: Progress) -> tuple[list[dict[str, Any]], list[str]]:
    """Header validity of every built TensorRT-RTX engine (`Runtime.get_engine_validity`, no GPU
    needed) and the skipped lines: their execution needs an RTX GPU. A header TensorRT-RTX calls
    malformed or of another version is an integrity failure (ArtifactError)."""
    built = {
        sub.name: arts.root / sub.name / str(rtx["path"])
        for sub in arts.subgraphs
        if (rtx := (sub.trt_entry or {}).get("rtx_engine") or {}).get("status") == "built"
    }
    if not built:
        return [], []
    reason = rtx_unavailable()
    if reason is not None:
        return [], [f"trt_rtx engine headers of {', '.join(built)} ({reason})"]
    headers = engine_headers(list(built.values()))
    for name, head in zip(built, headers, strict=True):
        if head.file_problems:
            raise ArtifactError(
                f"{head.path.relative_to(arts.root)}: TensorRT-RTX reads the engine of {name} as "
                f"{'/'.join(head.file_problems)} (diagnostics {head.diagnostics}); rebuild it"
            )
    say(f"[trt_rtx] engine headers well-formed: {', '.join(built)}")
    engines = [
        {
            "subgraph": name,
            "file": head.path.relative_to(arts.root).as_posix(),
            "header": "well-formed",
            "validity_here": head.validity,
            "diagnostics": head.diagnostics,
        }
        for name, head in zip(built, headers, strict=True)
    ]
    return engines, [f"trt_rtx execution of {', '.join(built)} (needs an RTX GPU; none here)"]


def write_reports(doc: dict[str, Any], path: str | os.PathLike[str]) -> tuple[Path, ...]:
    """Write the JSON report and its JUnit, Markdown and PNG renderings (atomically); the four paths."""
    paths = report_paths(path)
    try:
        paths.json.parent.mkdir(parents=True, exist_ok=True)
        for target, data in render_reports(doc, paths).items():
            atomic_write(target, data)
    except OSError as err:
        raise InputError(f"--report {paths.json}: cannot write the report ({err})") from None
    return paths.all()


def check_artifacts(
    root: str | os.PathLike[str],
    backend: str = "ort",
    report: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    key: bytes | None = None,
) -> CheckResult:
    """Verify `root`, re-run its goldens with `backend`, optionally write the report files.

    Usage errors (unknown or unavailable backend, bad --report path, an onnxruntime outside the build's
    range) raise before any work; integrity failures raise ArtifactError (after writing the report,
    when one is asked for).
    """
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    root = Path(root)
    if report is not None:
        report_paths(report)  # validate before the work
    get_backend(backend, BACKENDS)
    try:
        arts = verify_artifacts(root, say, key=key)
        engines, engine_skips = rtx_engine_headers(arts, say)  # part of integrity: before any run
        runners = open_runners(backend, arts.subgraphs, arts.build_info(), BACKENDS)
        entries, skipped = run_parity(arts, lambda sub: runners[sub.name], say, backend)
    except ArtifactError as err:
        if report is not None:
            failed = CheckResult(root, backend, {}, (), time.perf_counter() - start, integrity_error=str(err))
            write_reports(failed.to_json(), report)
        raise
    seconds = time.perf_counter() - start
    result = CheckResult(
        root,
        backend,
        arts.files,
        tuple(entries),
        seconds,
        arts.cases,
        (*skipped, *engine_skips),
        tuple(engines),
    )
    if report is not None:
        result = replace(result, report_files=write_reports(result.to_json(), report))
    return result
