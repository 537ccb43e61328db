"""Shared fixtures: the tiny spec (VL and text-only variants) and small helpers to derive variants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from m3export.spec import M3Spec, load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"


def spec_variant(spec: M3Spec, *, text_only: bool = False, **text_updates: Any) -> M3Spec:
    """A validated copy of `spec` with `text.<field>` overrides; `text_only` drops vision/multimodal."""
    data = spec.model_dump(mode="json")
    if text_only:
        data.pop("vision", None)
        data.pop("multimodal", None)
    data["text"].update(text_updates)
    return M3Spec.model_validate(data)


@pytest.fixture(scope="session")
def tiny_spec() -> M3Spec:
    """specs/m3-tiny.yaml as shipped (VL, one MTP depth)."""
    return load_spec(SPECS / "m3-tiny.yaml")


@pytest.fixture(scope="session")
def tiny_text_spec(tiny_spec: M3Spec) -> M3Spec:
    """m3-tiny without vision/multimodal: the text-only checkpoint layout (`model.*`, `lm_head.*`)."""
    return spec_variant(tiny_spec, text_only=True)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory, tiny_spec: M3Spec) -> Path:
    """One passing `build` of specs/m3-tiny.yaml per test session (≈50 s), shared read-only."""
    from m3export.build.driver import build

    result = build(tiny_spec, tmp_path_factory.mktemp("tiny-build") / "m3-tiny")
    assert result.passed, result.failed_subjects()
    return result.out_dir
