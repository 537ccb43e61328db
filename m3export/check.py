"""`m3export check`: verify a built artifact directory, then re-run its goldens and compare.

Integrity first (m3export/integrity.py; a failure raises `ArtifactError`, exit 3, before anything is
run). Then, with the chosen backend (a failure is exit 1):

- `onnx`:       each subgraph on its stored golden inputs vs its golden outputs (tolerances.onnx);
- `end_to_end`: per case the built subgraphs chained in plan order, each fed the values produced
                earlier in the chain and otherwise its stored golden input; every produced value vs
                the golden output of the subgraph that produced it (tolerances.end_to_end).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from m3export.errors import ArtifactError, InputError
from m3export.integrity import Progress, SubgraphArtifact, VerifiedArtifacts, verify_artifacts
from m3export.parity.compare import ParityReport, compare_outputs
from m3export.parity.report import REPORT_VERSION, CheckEntry, LayerError, write_reports
from m3export.spec.models import Tolerance

BACKENDS: tuple[str, ...] = ("ort", "trt")
EXIT_CODES = {"pass": 0, "parity_failure": 1, "integrity_failure": 3}
MakeRunner = Callable[[SubgraphArtifact], Any]  # -> a runner with infer(feed) -> outputs


# ------------------------------------------------------------------------------------- runners


def _tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot run here (None when it can): the TensorRT module's own probe when present."""
    import importlib.util

    try:
        from m3export.trt.engine import tensorrt_unavailable
    except ImportError:
        return None if importlib.util.find_spec("tensorrt") else "the tensorrt package is not installed"
    return tensorrt_unavailable()


def _trt_runner_factory() -> MakeRunner:
    """The TensorRT hook: `m3export.runners.trt_runner.TrtRunner` on each subgraph's listed
    `<name>/<name>.engine`; a one-line usage error when TensorRT or the runner is missing."""
    import importlib

    try:
        module = importlib.import_module("m3export.runners.trt_runner")
        reason = None if hasattr(module, "TrtRunner") else "m3export.runners.trt_runner has no TrtRunner"
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name not in (
            "m3export.runners.trt_runner",
            "tensorrt",
        ):
            raise  # a bug in the runner module, not a missing backend
        reason = str(err)
    reason = reason or _tensorrt_unavailable()
    if reason is not None:
        raise InputError(f"--backend trt: TensorRT is not available ({reason}); use --backend ort")

    def make(sub: SubgraphArtifact) -> Any:
        from m3export.trt.plugin import plugin_record

        if sub.engine is None:
            raise ArtifactError(
                f"{sub.onnx.parent}: no {sub.name}.engine listed (build with export.targets [onnx, trt] on a GPU)"
            )
        return module.TrtRunner(sub.engine, [plugin_record()])

    return make


def runner_factory(backend: str) -> MakeRunner:
    """Resolve the backend before any work, so an unusable one is a usage error (exit 2)."""
    if backend == "ort":
        from m3export.runners.ort_runner import OrtRunner

        return lambda sub: OrtRunner(sub.onnx)
    if backend == "trt":
        return _trt_runner_factory()
    raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


# ------------------------------------------------------------------------------------- result


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
    integrity_error: str | None = None
    report_files: tuple[Path, ...] = field(default=())

    @property
    def status(self) -> str:
        if self.integrity_error is not None:
            return "integrity_failure"
        return "pass" if all(e.report.passed for e in self.entries) else "parity_failure"

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
            "results": [e.to_json() for e in self.entries],
        }


# ------------------------------------------------------------------------------------- parity


def _infer(
    runner: Any, feed: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray] | None, str | None, float]:
    t0 = time.perf_counter()
    try:
        return runner.infer(feed), None, time.perf_counter() - t0
    except Exception as err:  # a runtime failure on a verified artifact is a failed check, not a crash
        return (
            None,
            f"{type(err).__name__}: {' '.join(str(err).splitlines())[:300]}",
            time.perf_counter() - t0,
        )


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


def _localise(
    arts: VerifiedArtifacts, sub: SubgraphArtifact, case: str, rep: ParityReport, tol: Tolerance
) -> ParityReport:
    """Re-run the failing case on a copy of the ONNX graph exposing every layer's output and compare
    with the build's eager layer outputs (golden_intermediates.npz): where divergence starts."""
    from m3export.parity.intermediates import expose_intermediates, localise

    rel = f"{sub.name}/golden_intermediates.npz"
    if rel not in arts.files:  # a build from before intermediates were stored
        return rep
    with np.load(arts.root / rel) as data:
        want = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(case + "/")}
    got = expose_intermediates(sub.onnx).runner().infer(sub.golden_inputs[case])
    return localise(rep, got, want, tol)


def _layer_errors(rep: ParityReport) -> tuple[LayerError, ...]:
    layers = (rep.localisation or {}).get("layers", [])
    return tuple(LayerError(lay["layer"], float(lay["max_abs"])) for lay in layers)


def run_parity(
    arts: VerifiedArtifacts, make_runner: MakeRunner, say: Progress
) -> tuple[list[CheckEntry], list[str]]:
    """The `onnx` step per subgraph, then the `end_to_end` chain per case (see the module docstring)."""
    tols = arts.spec.tolerances
    skipped = [
        f"{s} (no tolerances.{s} in the spec)" for s in ("onnx", "end_to_end") if getattr(tols, s) is None
    ]
    runners = {s.name: make_runner(s) for s in arts.subgraphs}
    entries: list[CheckEntry] = []
    direct: dict[tuple[str, str], tuple[dict[str, np.ndarray] | None, str | None]] = {}
    for sub in arts.subgraphs:  # onnx: each subgraph alone on its golden inputs
        for case in arts.cases:
            if case not in sub.golden_inputs:  # e.g. vision on a case without images
                continue
            got, err, secs = _infer(runners[sub.name], sub.golden_inputs[case])
            direct[(sub.name, case)] = (got, err)
            if tols.onnx is not None:
                rep = _compare("onnx", sub, case, got, err, tols.onnx)
                if rep.failed and got is not None:
                    rep = _localise(arts, sub, case, rep, tols.onnx)
                entries.append(CheckEntry(rep, secs, _layer_errors(rep)))
        if tols.onnx is not None:
            bad = sum(not e.report.passed for e in entries if e.report.subject == sub.name)
            say(f"[onnx] {sub.name}: {'pass' if not bad else f'FAIL ({bad} case(s))'}")
    if tols.end_to_end is None:
        return entries, skipped
    chain: list[CheckEntry] = []
    for case in arts.cases:  # end_to_end: chained, earlier outputs replacing stored inputs
        values: dict[str, np.ndarray] = {}
        for sub in arts.subgraphs:
            if case not in sub.golden_inputs:
                continue
            feed = {n: values.get(n, sub.golden_inputs[case][n]) for n in sub.inputs}
            if any(n in values for n in sub.inputs):
                got, err, secs = _infer(runners[sub.name], feed)
            else:  # the same feed as the onnx step: reuse its outputs
                (got, err), secs = direct[(sub.name, case)], 0.0
            chain.append(CheckEntry(_compare("end_to_end", sub, case, got, err, tols.end_to_end), secs))
            values.update(got or {})
            video = f"{case}.video"  # the vision subgraph on the case's video feeds `video_features`
            if video in sub.golden_inputs and got is not None:
                out, _, _ = _infer(runners[sub.name], sub.golden_inputs[video])
                if out is not None:
                    values["video_features"] = out["image_features"]
    # Group the chain by subgraph (chain order) so a report reads stage by stage, as the onnx step does.
    order = {s.name: i for i, s in enumerate(arts.subgraphs)}
    chain.sort(key=lambda e: order[e.report.subject])
    bad_chain = [e for e in chain if not e.report.passed]
    say(f"[end_to_end] {len(arts.cases)} case(s): {'pass' if not bad_chain else f'FAIL ({len(bad_chain)})'}")
    return entries + chain, skipped


def check_artifacts(
    root: str | os.PathLike[str],
    backend: str = "ort",
    report: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> CheckResult:
    """Verify `root`, re-run its goldens with `backend`, optionally write the report files.

    Usage errors (unknown or unavailable backend, bad --report path) raise InputError before any work;
    integrity failures raise ArtifactError (after writing the report, when one is asked for).
    """
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    root = Path(root)
    if report is not None:
        from m3export.parity.report import report_paths

        report_paths(report)  # validate before the work
    make_runner = runner_factory(backend)
    try:
        arts = verify_artifacts(root, say)
        entries, skipped = run_parity(arts, make_runner, say)
    except ArtifactError as err:
        if report is not None:
            failed = CheckResult(root, backend, {}, (), time.perf_counter() - start, integrity_error=str(err))
            write_reports(failed.to_json(), report)
        raise
    seconds = time.perf_counter() - start
    result = CheckResult(root, backend, arts.files, tuple(entries), seconds, arts.cases, tuple(skipped))
    if report is not None:
        result = replace(result, report_files=write_reports(result.to_json(), report))
    return result
