"""Check reports: one JSON document, rendered as JUnit XML, a Markdown summary and a PNG plot.

The JSON document (`CheckResult.to_json()` in m3export/check.py) is the single source: every other
format is rendered from it, so a saved JSON report can be re-rendered elsewhere. Each entry of its
`results` is a `ParityReport` (one step, subgraph and case) plus `seconds` and `layers`: a list of
{"name", "max_abs"} for per-layer divergence localisation (empty until a producer fills it; the
Markdown and the plot show it when present). matplotlib is imported only to draw the plot.
"""

from __future__ import annotations

import io
import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3export.errors import InputError
from m3export.parity.compare import ParityReport, jsonable

REPORT_VERSION = 1
DERIVED_SUFFIXES = (".xml", ".md", ".png")


@dataclass(frozen=True)
class LayerError:
    """Max abs error of one layer's output (per-layer divergence localisation)."""

    name: str
    max_abs: float


@dataclass(frozen=True)
class CheckEntry:
    """One parity comparison of a check, with its inference time and optional per-layer errors."""

    report: ParityReport
    seconds: float = 0.0
    layers: tuple[LayerError, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = self.report.to_json()
        d["seconds"] = self.seconds
        d["layers"] = [{"name": lay.name, "max_abs": lay.max_abs} for lay in self.layers]
        return d


@dataclass(frozen=True)
class ReportPaths:
    """FILE (JSON) and its siblings: FILE.xml (JUnit), FILE.md (Markdown), FILE.png (plot)."""

    json: Path
    junit: Path
    markdown: Path
    plot: Path

    def all(self) -> tuple[Path, ...]:
        return (self.json, self.junit, self.markdown, self.plot)


def report_paths(path: str | os.PathLike[str]) -> ReportPaths:
    """The four report files of `--report FILE`; FILE itself must not end in a derived suffix."""
    p = Path(path)
    if p.suffix.lower() in DERIVED_SUFFIXES:
        raise InputError(
            f"--report {p}: give the JSON file (e.g. check.json); the {', '.join(DERIVED_SUFFIXES)} "
            "files are written beside it"
        )
    if p.exists() and p.is_dir():
        raise InputError(f"--report {p}: is a directory; give a file name such as {p / 'check.json'}")
    paths = ReportPaths(p, p.with_suffix(".xml"), p.with_suffix(".md"), p.with_suffix(".png"))
    for f in paths.all():  # a report replaces earlier reports, never a device, FIFO, link or directory
        if f.is_symlink() or (f.exists() and not f.is_file()):
            raise InputError(f"--report {p}: {f} exists and is not a regular file; refusing to replace it")
    parent = next((a for a in [p.parent, *p.parent.parents] if a.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise InputError(f"--report {p}: {parent} is not a writable directory")
    return paths


def render_reports(doc: dict[str, Any], paths: ReportPaths) -> dict[Path, bytes]:
    """The JSON report and its JUnit, Markdown and PNG renderings, by the path each goes to."""
    return {
        paths.json: (json.dumps(jsonable(doc), indent=2) + "\n").encode(),
        paths.junit: junit_xml(doc).encode(),
        paths.markdown: markdown(doc, paths.plot.name).encode(),
        paths.plot: plot_png(doc),
    }


# ------------------------------------------------------------------------------- summaries


def _num(x: Any) -> float:
    return float(x) if x is not None else math.nan  # "inf" strings of a re-read report parse too


def bound(entry: dict[str, Any]) -> float:
    """The absolute error bound an entry was held to: its tolerance's `max_abs`, or `max_abs_scaled`
    times the largest reference magnitude among its outputs (nan when neither applies)."""
    tol = entry.get("tolerance") or {}
    if tol.get("max_abs") is not None:
        return _num(tol["max_abs"])
    if tol.get("max_abs_scaled") is not None:
        peaks = [_num(o.get("ref_peak", 0.0)) for o in entry.get("outputs") or []]
        return _num(tol["max_abs_scaled"]) * max(peaks, default=math.nan)
    return math.nan


def worst_max_abs(entry: dict[str, Any]) -> float:
    """Largest max_abs over the entry's outputs; inf when it has no outputs (a runner error)."""
    outs = entry.get("outputs") or []
    return max((_num(o["max_abs"]) for o in outs), default=math.inf)


def entry_failures(entry: dict[str, Any]) -> list[str]:
    if entry.get("error"):
        return [str(entry["error"])]
    return [f"{o['name']}: {f}" for o in entry.get("outputs") or [] for f in o["failures"]]


def first_failure(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The first failing entry in check order (per step, subgraphs in chain order): where divergence starts."""
    return next((e for e in doc.get("results", []) if not e["passed"]), None)


def table_rows(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    """(step, subgraph, case, output, max_abs, tolerance, cosine, result) per output of every entry."""
    rows: list[tuple[str, ...]] = []
    for e in doc.get("results", []):
        tol = f"{bound(e):.3g}"
        if e.get("error") or not e.get("outputs"):
            rows.append((e["step"], e["subject"], e["case"], "-", "-", tol, "-", f"FAIL ({e.get('error')})"))
            continue
        for o in e["outputs"]:
            verdict = "FAIL: " + "; ".join(o["failures"]) if o["failures"] else "pass"
            rows.append(
                (
                    e["step"],
                    e["subject"],
                    e["case"],
                    o["name"],
                    f"{_num(o['max_abs']):.3g}",
                    tol,
                    f"{_num(o['cosine']):.7f}",
                    verdict,
                )
            )
    return rows


def format_table(doc: dict[str, Any]) -> list[str]:
    """The human table printed by `m3export check` (last column left unpadded)."""
    header = ("step", "subgraph", "case", "output", "max_abs", "tol", "cosine", "result")
    rows = [header, *table_rows(doc)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]


# ------------------------------------------------------------------------------- JUnit XML


def junit_xml(doc: dict[str, Any]) -> str:
    """One testcase per step/subgraph/case (plus `integrity`); failures carry the failing metrics."""
    results = doc.get("results", [])
    integrity = doc.get("integrity", {})
    cases: list[tuple[str, str, float, list[str]]] = [
        ("integrity", "artifacts", 0.0, [] if integrity.get("passed") else [str(integrity.get("error"))])
    ]
    for e in results:
        cases.append(
            (f"{e['step']}.{e['subject']}", e["case"], float(e.get("seconds", 0.0)), entry_failures(e))
        )
    n_fail = sum(1 for c in cases if c[3])
    total = f"{float(doc.get('seconds', 0.0)):.3f}"
    suites = ET.Element("testsuites", name="m3export check", tests=str(len(cases)), failures=str(n_fail))
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"m3export check {doc.get('artifacts', '')} (backend {doc.get('backend', '')})",
        tests=str(len(cases)),
        failures=str(n_fail),
        errors="0",
        skipped="0",
        time=total,
    )
    for classname, name, seconds, failures in cases:
        tc = ET.SubElement(suite, "testcase", classname=classname, name=name, time=f"{seconds:.3f}")
        if failures:
            fail = ET.SubElement(tc, "failure", message="; ".join(failures)[:1000], type="ParityFailure")
            fail.text = "\n".join(failures)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


# ------------------------------------------------------------------------------- Markdown

_TITLES = {"pass": "PASS", "parity_failure": "PARITY FAILURE", "integrity_failure": "INTEGRITY FAILURE"}


def markdown(doc: dict[str, Any], plot_name: str | None = None) -> str:
    """A summary a person reads first: verdict, where divergence starts, the plot, one row per entry."""
    status = doc.get("status", "?")
    integ = doc.get("integrity", {})
    lines = [
        f"# m3export check: {_TITLES.get(status, status)}",
        "",
        f"- artifacts: `{doc.get('artifacts')}`",
        f"- backend: `{doc.get('backend')}`, {float(doc.get('seconds', 0.0)):.1f} s, exit code {doc.get('exit_code')}",
    ]
    if integ.get("passed"):
        lines.append(f"- integrity: pass ({len(integ.get('files', {}))} files, sha256)")
    else:
        lines.append(f"- integrity: FAIL, nothing was run: {integ.get('error')}")
    for note in doc.get("skipped", []):
        lines.append(f"- skipped: {note}")
    first = first_failure(doc)
    if first is not None:
        lines.append(
            f"- divergence starts at: step `{first['step']}`, subgraph `{first['subject']}`, case "
            f"`{first['case']}`: {'; '.join(entry_failures(first))}"
        )
    results = doc.get("results", [])
    if plot_name and results:
        lines += ["", f"![max-abs error vs tolerance per subgraph and case]({plot_name})"]
    if results:
        lines += [
            "",
            "| step | subgraph | case | worst output | max_abs | tolerance | ratio | result |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in results:
            worst = max(e.get("outputs") or [], key=lambda o: _num(o["max_abs"]), default=None)
            tol = bound(e)
            m = worst_max_abs(e)
            ratio = f"{m / tol:.3g}" if tol > 0 and math.isfinite(m) else "-"
            verdict = "pass" if e["passed"] else "**FAIL**: " + "; ".join(entry_failures(e)).replace("|", "/")
            lines.append(
                f"| {e['step']} | {e['subject']} | {e['case']} | {worst['name'] if worst else '-'} "
                f"| {m:.3g} | {tol:.3g} | {ratio} | {verdict} |"
            )
    layered = [e for e in results if e.get("layers")]
    if layered:
        lines += ["", "## Per-layer max abs error"]
        for e in layered:
            lines += [
                "",
                f"### {e['step']} / {e['subject']} / {e['case']}",
                "",
                "| layer | max_abs |",
                "|---|---|",
            ]
            lines += [f"| {lay['name']} | {_num(lay['max_abs']):.3g} |" for lay in e["layers"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- plot


def _clip(values: Sequence[float], floor: float, ceil: float) -> list[float]:
    return [ceil if not math.isfinite(v) else max(v, floor) for v in values]


def plot_png(doc: dict[str, Any]) -> bytes:
    """Per step: max abs error of every subgraph (chain order) and case vs its tolerance, log scale.

    Zeros sit on the bottom edge and missing outputs / runner errors on the top edge (red). A
    per-layer panel is added when any entry has layer errors.
    """
    from matplotlib.figure import Figure  # heavy: only when a report is asked for

    results = doc.get("results", [])
    steps = list(dict.fromkeys(e["step"] for e in results))
    layered = [e for e in results if e.get("layers")]
    n_panels = max(1, len(steps) + (1 if layered else 0))
    fig = Figure(figsize=(9, 3.6 * n_panels), layout="constrained")
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    if not results:
        msg = (
            "integrity failure: nothing was run" if doc.get("status") == "integrity_failure" else "no results"
        )
        axes[0].text(0.5, 0.5, msg, ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
        return _png(fig)
    finite = [
        v
        for e in results
        for v in [worst_max_abs(e), bound(e)] + [_num(lay["max_abs"]) for lay in e.get("layers", [])]
        if math.isfinite(v) and v > 0
    ]
    floor = min(finite, default=1e-6) / 10
    ceil = max(finite, default=1.0) * 10
    for ax, step in zip(axes, steps, strict=False):
        _plot_step(ax, [e for e in results if e["step"] == step], step, doc.get("cases", []), floor, ceil)
    if layered:
        _plot_layers(axes[len(steps)], layered, floor, ceil)
    fig.suptitle(f"m3export check {doc.get('artifacts', '')}: {_TITLES.get(doc.get('status', ''), '')}")
    return _png(fig)


def _png(fig: Any) -> bytes:

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _plot_step(
    ax: Any, entries: list[dict[str, Any]], step: str, case_order: list[str], floor: float, ceil: float
) -> None:
    subjects = list(dict.fromkeys(e["subject"] for e in entries))
    seen = {e["case"] for e in entries}
    cases = [c for c in dict.fromkeys([*case_order, *(e["case"] for e in entries)]) if c in seen]
    width = 0.7 / max(1, len(cases))
    for j, case in enumerate(cases):
        pts = [(subjects.index(e["subject"]), e) for e in entries if e["case"] == case]
        xs = [x - 0.35 + width * (j + 0.5) for x, _ in pts]
        ys = _clip([worst_max_abs(e) for _, e in pts], floor, ceil)
        ax.plot(xs, ys, marker="o", linestyle=":", label=case)
        bad = [(x, y) for x, y, (_, e) in zip(xs, ys, pts, strict=True) if not e["passed"]]
        if bad:
            ax.scatter(*zip(*bad, strict=True), marker="x", s=80, color="red", zorder=3)
    for i, subject in enumerate(subjects):
        tols = {b for e in entries if e["subject"] == subject if math.isfinite(b := bound(e))}
        for tol in tols:
            ax.hlines(max(tol, floor), i - 0.4, i + 0.4, colors="black", linestyles="--")
    ax.plot([], [], "k--", label="tolerance (absolute bound)")
    ax.plot([], [], "rx", label="failed")
    ax.set_yscale("log")
    ax.set_ylim(floor, ceil * 1.5)
    ax.set_xticks(range(len(subjects)), subjects)
    ax.set_xlim(-0.5, len(subjects) - 0.5)
    ax.set_ylabel("max |actual - golden|")
    ax.set_title(f"{step}: per subgraph (chain order) and case")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", ncols=2)


def _plot_layers(ax: Any, entries: list[dict[str, Any]], floor: float, ceil: float) -> None:
    names = list(dict.fromkeys(lay["name"] for e in entries for lay in e["layers"]))
    for e in entries:
        xs = [names.index(lay["name"]) for lay in e["layers"]]
        ys = _clip([_num(lay["max_abs"]) for lay in e["layers"]], floor, ceil)
        ax.plot(xs, ys, marker=".", label=f"{e['step']}/{e['subject']}/{e['case']}")
    ax.set_yscale("log")
    ax.set_ylim(floor, ceil * 1.5)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="small")
    ax.set_ylabel("max |actual - golden|")
    ax.set_title("per layer")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")


def parity_rows(reports: Sequence[ParityReport]) -> list[tuple[str, ...]]:
    """(subgraph, step, case, output, max_abs, cosine, top1, verdict) per output of every report."""
    rows: list[tuple[str, ...]] = []
    for r in reports:
        if r.status == "skip":
            rows.append((r.subject, r.step, r.case, "-", "-", "-", "-", f"SKIP ({r.skipped})"))
            continue
        if r.status == "built":
            rows.append((r.subject, r.step, r.case, "-", "-", "-", "-", f"BUILT ({r.built})"))
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
