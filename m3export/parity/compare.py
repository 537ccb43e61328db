"""Compare two sets of named outputs against a spec `Tolerance` and produce a `ParityReport`.

Metrics (computed in float64): max abs error, the scale-free max abs error / max |reference|, max
relative error (|a-b| / max(|b|, tiny)), cosine
similarity of the flattened tensors, top-1 agreement along the last axis (for logits), and routing
agreement (fraction of rows whose selected expert SET matches, for int [T, k] selections).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from m3export.spec.base import Tolerance

Kind = Literal["tensor", "logits", "routing"]


@dataclass(frozen=True)
class OutputParity:
    """Metrics and verdict for one output of one comparison."""

    name: str
    kind: Kind
    max_abs: float
    max_rel: float
    cosine: float
    top1_agreement: float | None
    routing_agreement: float | None
    failures: tuple[str, ...]
    ref_peak: float = 0.0  # max |reference|: max_abs / ref_peak is the scale-free error
    max_abs_scaled: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class ParityReport:
    """One parity check (a step, a subgraph, a case) with per-output results."""

    step: str
    subject: str
    case: str
    tolerance: dict[str, Any]
    outputs: tuple[OutputParity, ...] = field(default_factory=tuple)
    error: str | None = None
    skipped: str | None = None  # why the check could not run here (e.g. a backend is not installed)
    # A step that made an artifact without comparing numbers (a TensorRT-RTX engine built on CPU):
    # what was built. Shown as BUILT; like a skip, never counted as a passed comparison.
    built: str | None = None
    # On a failure: where the error first exceeds the tolerance (`summary`, `first_divergent_layer`)
    # and the per-layer errors (`layers`), from m3export.parity.intermediates.
    localisation: dict[str, Any] | None = None

    @property
    def status(self) -> Literal["pass", "fail", "skip", "built"]:
        """A skipped check is neither passed nor failed: it never counts as evidence (nor does a
        built artifact whose numbers nothing compared)."""
        if self.error is not None:
            return "fail"
        if self.skipped is not None:
            return "skip"
        if self.built is not None:
            return "built"
        return "pass" if self.error is None and all(o.passed for o in self.outputs) else "fail"

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["status"] = self.status
        return d

    def failures(self) -> list[str]:
        if self.error:
            return [self.error]
        return [f"{o.name}: {f}" for o in self.outputs for f in o.failures]


def _routing_agreement(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = np.sort(a.reshape(-1, a.shape[-1]), axis=-1), np.sort(b.reshape(-1, b.shape[-1]), axis=-1)
    return float(np.mean(np.all(sa == sb, axis=-1))) if sa.size else 1.0


@dataclass
class _Stats:
    max_abs: float = 0.0
    peak: float = 0.0
    max_rel: float = 0.0
    dot: float = 0.0
    sum_aa: float = 0.0
    sum_ee: float = 0.0
    nonfinite: bool = False
    both_exceeded: bool = False  # some element exceeds max_abs and max_rel x |ref| (with max_rel set)


_CHUNK = 1 << 18  # elements per float64 pass: temporaries stay in cache (a 200k-vocab logits tensor
# is tens of millions of elements; whole-array float64 temporaries made comparing the slowest step)


def _stats(actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> _Stats:
    """The error statistics of `actual` vs `expected` in float64, a chunk at a time (whole arrays at
    once when a value is not finite, so NaN / inf propagate exactly as numpy's reductions do)."""
    st = _Stats()
    fa, fe = actual.reshape(-1), expected.reshape(-1)
    for lo in range(0, fa.size, _CHUNK):
        a = fa[lo : lo + _CHUNK].astype(np.float64)
        e = fe[lo : lo + _CHUNK].astype(np.float64)
        if not (np.isfinite(a).all() and np.isfinite(e).all()):
            return _whole_stats(fa.astype(np.float64), fe.astype(np.float64), tol)
        _accumulate(st, a, e, tol)
    return st


def _whole_stats(a: np.ndarray, e: np.ndarray, tol: Tolerance) -> _Stats:
    st = _Stats(nonfinite=True)
    _accumulate(st, a, e, tol)
    st.max_abs = float(np.abs(a - e).max())  # NaN if any: Python's max() would drop it
    st.peak = float(np.abs(e).max())
    return st


def _accumulate(st: _Stats, a: np.ndarray, e: np.ndarray, tol: Tolerance) -> None:
    diff = np.abs(a - e)
    abs_e = np.abs(e)
    st.max_abs = max(st.max_abs, float(diff.max()))
    st.peak = max(st.peak, float(abs_e.max()))
    st.max_rel = max(st.max_rel, float((diff / np.maximum(abs_e, 1e-12)).max()))
    st.dot += float(np.dot(a, e))
    st.sum_aa += float(np.dot(a, a))
    st.sum_ee += float(np.dot(e, e))
    if tol.max_abs is not None and tol.max_rel is not None and not st.both_exceeded:
        st.both_exceeded = bool(np.any((diff > tol.max_abs) & (diff > tol.max_rel * abs_e)))


def compare_output(
    name: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance, kind: Kind
) -> OutputParity:
    """Compare one output; `expected` is the reference."""
    failures: list[str] = []
    if actual.shape != expected.shape:
        return OutputParity(
            name,
            kind,
            np.inf,
            np.inf,
            -1.0,
            None,
            None,
            (f"shape {actual.shape} != {expected.shape}",),
            0.0,
            np.inf,
        )
    if kind == "routing":
        agree = _routing_agreement(actual, expected)
        need = 1.0 if tol.min_routing_agreement is None else tol.min_routing_agreement
        if agree < need:
            failures.append(f"routing agreement {agree:.4f} < {need}")
        return OutputParity(name, kind, 0.0, 0.0, 1.0, None, agree, tuple(failures))
    st = _stats(actual, expected, tol)
    if st.nonfinite:
        failures.append("non-finite values")
    max_abs, peak, max_rel = st.max_abs, st.peak, st.max_rel
    scaled = max_abs / peak if peak > 0 else (0.0 if max_abs == 0 else np.inf)
    na, ne = np.sqrt(st.sum_aa), np.sqrt(st.sum_ee)
    cosine = float(st.dot / np.sqrt(st.sum_aa * st.sum_ee)) if na > 0 and ne > 0 else float(na == ne)
    top1 = None
    if kind == "logits" and actual.size:  # float32 -> float64 is exact: argmax on the stored dtype
        top1 = float(np.mean(np.argmax(actual, axis=-1) == np.argmax(expected, axis=-1)))
    # An element fails only if it exceeds both atol and rtol (Polygraphy semantics) when max_rel is set.
    if tol.max_abs is not None:
        if tol.max_rel is None:
            if max_abs > tol.max_abs:
                failures.append(f"max abs {max_abs:.3g} > {tol.max_abs:.3g}")
        elif st.both_exceeded:
            failures.append(
                f"max abs {max_abs:.3g} > {tol.max_abs:.3g} and max rel {max_rel:.3g} > {tol.max_rel:.3g}"
            )
    if tol.max_abs_scaled is not None and not scaled <= tol.max_abs_scaled:
        failures.append(
            f"max abs / max |ref| {scaled:.3g} > {tol.max_abs_scaled:.3g} (max abs {max_abs:.3g})"
        )
    if tol.min_cosine is not None and cosine < tol.min_cosine:
        failures.append(f"cosine {cosine:.6f} < {tol.min_cosine}")
    if top1 is not None and tol.min_top1_agreement is not None and top1 < tol.min_top1_agreement:
        failures.append(f"top-1 agreement {top1:.4f} < {tol.min_top1_agreement}")
    return OutputParity(name, kind, max_abs, max_rel, cosine, top1, None, tuple(failures), peak, scaled)


def describe_bound(tol: Tolerance) -> str:
    """The error bound of a tolerance in words, e.g. `max_abs 1e-05` or `max_abs_scaled 2e-05`."""
    parts = [f"max_abs {tol.max_abs:g}"] if tol.max_abs is not None else []
    if tol.max_abs_scaled is not None:
        parts.append(f"max_abs_scaled {tol.max_abs_scaled:g}")
    return " and ".join(parts)


def kinds_by_name(names: Sequence[str]) -> dict[str, Kind]:
    """How to compare each named output by default: `*logits*` as logits (top-1), the rest as tensors."""
    return {n: ("logits" if "logits" in n else "tensor") for n in names}


def compare_outputs(
    step: str,
    subject: str,
    case: str,
    actual: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    tol: Tolerance,
    kinds: dict[str, Kind] | None = None,
) -> ParityReport:
    """Compare every expected output; a missing output is a failure, never a skip."""
    kinds = kinds or {}
    results = []
    for name, exp in expected.items():
        if name not in actual:
            results.append(
                OutputParity(
                    name,
                    kinds.get(name, "tensor"),
                    np.inf,
                    np.inf,
                    -1.0,
                    None,
                    None,
                    ("missing",),
                    0.0,
                    np.inf,
                )
            )
            continue
        results.append(
            compare_output(name, np.asarray(actual[name]), np.asarray(exp), tol, kinds.get(name, "tensor"))
        )
    return ParityReport(step, subject, case, tol.model_dump(mode="json"), tuple(results))


def jsonable(x: Any) -> Any:
    """Non-finite floats (the inf metrics of a missing output) become strings, so the JSON is strict."""

    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x
