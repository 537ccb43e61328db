"""The comparator's metrics against hand-computed values, and that each metric can fail."""

from __future__ import annotations

import numpy as np
import pytest

from m3export.parity import compare_output, compare_outputs
from m3export.spec import Tolerance


def tol(**kw: float) -> Tolerance:
    return Tolerance(reason="test", **{"max_abs": 1e-3, **kw})


def test_identical_passes() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    r = compare_output("y", x, x.copy(), tol(min_cosine=1.0, min_top1_agreement=1.0), "logits")
    assert r.passed and r.max_abs == 0 and r.top1_agreement == 1.0 and r.cosine == pytest.approx(1.0)


def test_max_abs_and_rel() -> None:
    e = np.array([1.0, 2.0, -4.0])
    a = np.array([1.0, 2.5, -4.0])
    r = compare_output("y", a, e, tol(), "tensor")
    assert r.max_abs == pytest.approx(0.5) and r.max_rel == pytest.approx(0.25)
    assert not r.passed and "max abs" in r.failures[0]
    # with rtol: the element exceeds atol but not rtol -> passes
    assert compare_output("y", a, e, tol(max_rel=0.3), "tensor").passed
    assert not compare_output("y", a, e, tol(max_rel=0.2), "tensor").passed


def test_top1_and_cosine_fail() -> None:
    e = np.array([[0.0, 1.0], [1.0, 0.0]])
    a = np.array([[1.0, 0.0], [1.0, 0.0]])
    r = compare_output("logits", a, e, tol(max_abs=10, min_top1_agreement=1.0, min_cosine=0.9), "logits")
    assert r.top1_agreement == 0.5 and r.cosine == pytest.approx(0.5)
    assert len(r.failures) == 2


def test_routing_agreement_is_set_based() -> None:
    e = np.array([[0, 3], [1, 2], [4, 5]])
    a = np.array([[3, 0], [1, 2], [4, 6]])
    r = compare_output("routing", a, e, tol(min_routing_agreement=0.6), "routing")
    assert r.routing_agreement == pytest.approx(2 / 3) and r.passed
    assert not compare_output("routing", a, e, tol(), "routing").passed  # default requires 1.0


def test_missing_output_and_shape_mismatch_fail() -> None:
    rep = compare_outputs("s", "g", "c", {"a": np.zeros(3)}, {"a": np.zeros(4), "b": np.zeros(1)}, tol())
    assert not rep.passed
    assert any("shape" in f for f in rep.failures()) and any("missing" in f for f in rep.failures())


def test_nan_fails() -> None:
    a = np.array([np.nan, 1.0])
    assert not compare_output("y", a, np.array([0.0, 1.0]), tol(max_abs=1e9), "tensor").passed
