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
        return lambda sub: sub.ort_runner()
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
    from m3export.parity.intermediates import localise

    rel = f"{sub.name}/golden_intermediates.npz"
    if rel not in arts.files:  # a build from before intermediates were stored
        return rep
    with np.load(arts.root / rel) as data:
        want = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(case + "/")}
    got = sub.debug_runner().infer(sub.golden_inputs[case])
    return localise(rep, got, want, tol)


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


def _routing(
    arts: VerifiedArtifacts, sub: SubgraphArtifact, tol: Tolerance, backend: str
) -> tuple[list[CheckEntry], list[str]]:
    """Routing agreement per MoE layer: the exposed graph's expert indices vs the build's eager ones."""
    from m3export.parity.intermediates import routing_report

    rel = f"{sub.name}/golden_intermediates.npz"
    if rel not in arts.files:
        return [], []
    with np.load(arts.root / rel) as data:
        wanted = {k for k in data.files if k.endswith(".experts")}
        if not wanted:
            return [], []
        want = {c: {k.split("/", 1)[1]: data[k] for k in wanted if k.startswith(c + "/")} for c in arts.cases}
    if backend != "ort":
        return [], [f"routing {sub.name} (the {backend} graph routes inside its MoE plugin node)"]
    runner = sub.debug_runner()
    entries = []
    for case in arts.cases:
        if case not in sub.golden_inputs or not want.get(case):
            continue
        got, err, secs = _infer(runner, sub.golden_inputs[case])
        if got is None:
            rep = ParityReport(
                "routing", sub.name, case, tol.model_dump(mode="json"), (), f"run failed: {err}"
            )
        else:
            rep = routing_report("routing", sub.name, case, got, want[case], tol)
        entries.append(CheckEntry(rep, secs))
    return entries, []


def _chain(arts: VerifiedArtifacts, runners: dict[str, Any], direct: Any, tol: Tolerance) -> list[CheckEntry]:
    """Per case, the subgraphs chained in plan order: each fed what earlier ones produced (and its
    stored golden input otherwise); a subgraph that does not produce exactly its declared outputs fails."""
    chain: list[CheckEntry] = []
    for case in arts.cases:
        values: dict[str, np.ndarray] = {}
        for sub in arts.subgraphs:
            if case not in sub.golden_inputs:
                continue
            feed = {n: values.get(n, sub.golden_inputs[case][n]) for n in sub.inputs}
            if any(n in values for n in sub.inputs):
                got, err, secs = _infer(runners[sub.name], feed)
            else:  # the same feed as the onnx step: reuse its outputs
                (got, err), secs = direct[(sub.name, case)], 0.0
            if got is not None and set(got) != set(sub.outputs):
                err = f"produced {sorted(got)}, the manifest declares {list(sub.outputs)}"
                got = None
            chain.append(CheckEntry(_compare("end_to_end", sub, case, got, err, tol), secs))
            values.update(got or {})
            video = f"{case}.video"  # the vision subgraph on the case's video feeds `video_features`
            if video in sub.golden_inputs and got is not None:
                out, _, _ = _infer(runners[sub.name], sub.golden_inputs[video])
                if out is not None:
                    values["video_features"] = out["image_features"]
    # Group the chain by subgraph (chain order) so a report reads stage by stage, as the onnx step does.
    order = {s.name: i for i, s in enumerate(arts.subgraphs)}
    chain.sort(key=lambda e: order[e.report.subject])
    return chain


def _prompt(arts: VerifiedArtifacts, case: str) -> dict[str, np.ndarray]:
    """The batch-1 prompt of a golden case, rebuilt from the stored goldens (ids, positions, pixels)."""
    from m3export.runners.chain import VIDEO_INPUTS

    by_name = {s.name: s for s in arts.subgraphs}
    text0 = by_name["text_0"].golden_inputs[case]
    prompt = {"input_ids": text0["input_ids"], "position_ids": text0["position_ids"]}
    vision = by_name.get("vision")
    if vision is not None:
        prompt.update(vision.golden_inputs.get(case, {}))
        prompt.update({VIDEO_INPUTS[k]: v for k, v in vision.golden_inputs.get(f"{case}.video", {}).items()})
    return prompt


def _generate(arts: VerifiedArtifacts, runners: dict[str, Any], tol: Tolerance) -> list[CheckEntry]:
    """Greedy decoding (and MTP speculative decoding) of the golden prompts vs the build's tokens."""
    import time

    from m3export.generate import generate_tokens
    from m3export.split.plan import plan_subgraphs

    plans = plan_subgraphs(arts.spec)
    run = lambda plan, feed: runners[plan.name].infer(feed)  # noqa: E731
    entries = []
    for case, modes in arts.golden_tokens.items():
        prompt = _prompt(arts, case)
        for mode, want in modes.items():
            t0 = time.perf_counter()
            label = f"{case}:{mode}"
            try:
                got = generate_tokens(arts.spec, plans, run, prompt, len(want), mtp=mode == "mtp").tokens
                rep = compare_outputs(
                    "generate", "pipeline", label, {"tokens": np.array(got)}, {"tokens": np.array(want)}, tol
                )
            except Exception as err:  # a runtime failure on a verified artifact is a failed check
                msg = f"{type(err).__name__}: {' '.join(str(err).splitlines())[:300]}"
                rep = ParityReport("generate", "pipeline", label, tol.model_dump(mode="json"), (), msg)
            entries.append(CheckEntry(rep, time.perf_counter() - t0))
    return entries


def run_parity(
    arts: VerifiedArtifacts, make_runner: MakeRunner, say: Progress, backend: str = "ort"
) -> tuple[list[CheckEntry], list[str]]:
    """The build's verdict, the `onnx` and `routing` steps per subgraph, the `end_to_end` chain per
    case and greedy `generate` on the golden prompts (see the module docstring)."""
    tols = arts.spec.tolerances
    skipped = ["split (needs the eager PyTorch model; the build ran it)"]
    runners = {s.name: make_runner(s) for s in arts.subgraphs}
    entries: list[CheckEntry] = _build_verdict(arts)
    direct: dict[tuple[str, str], tuple[dict[str, np.ndarray] | None, str | None]] = {}
    for sub in arts.subgraphs:  # onnx: each subgraph alone on its golden inputs
        mine: list[CheckEntry] = []
        for case in arts.cases:
            if case not in sub.golden_inputs:  # e.g. vision on a case without images
                continue
            got, err, secs = _infer(runners[sub.name], sub.golden_inputs[case])
            direct[(sub.name, case)] = (got, err)
            rep = _compare("onnx", sub, case, got, err, tols.onnx)
            if rep.failed and got is not None:
                rep = _localise(arts, sub, case, rep, tols.onnx)
            mine.append(CheckEntry(rep, secs, _layer_errors(rep)))
        routing, skips = _routing(arts, sub, tols.onnx, backend)
        mine += routing
        skipped += skips
        bad = sum(not e.report.passed for e in mine)
        say(f"[onnx] {sub.name}: {'pass' if not bad else f'FAIL ({bad} case(s))'}")
        entries += mine
    chain = _chain(arts, runners, direct, tols.end_to_end)
    bad_chain = [e for e in chain if not e.report.passed]
    say(f"[end_to_end] {len(arts.cases)} case(s): {'pass' if not bad_chain else f'FAIL ({len(bad_chain)})'}")
    gen = _generate(arts, runners, tols.generate)
    if gen:
        bad_gen = [e for e in gen if not e.report.passed]
        say(f"[generate] {len(gen)} prompt(s): {'pass' if not bad_gen else f'FAIL ({len(bad_gen)})'}")
    return entries + chain + gen, skipped


def check_artifacts(
    root: str | os.PathLike[str],
    backend: str = "ort",
    report: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    key: bytes | None = None,
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
        arts = verify_artifacts(root, say, key=key)
        if backend == "ort":
            from m3export.runners.ort_runner import require_onnxruntime

            require_onnxruntime(arts.runtime["onnxruntime"], arts.moe_lowering)
        entries, skipped = run_parity(arts, make_runner, say, backend)
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
