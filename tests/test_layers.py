"""The layering of docs/design.md is enforced by import-linter (pyproject.toml `[tool.importlinter]`,
run by `make lint`): the package as it is keeps the contract, and an upward import breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(package_parent: Path, config: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("lint-imports is not installed (pip install 'm3export[dev]')")
    env = {"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [str(lint), "--config", str(config)], cwd=package_parent, env=env, capture_output=True, text=True
    )


def test_the_package_keeps_the_layers_contract() -> None:
    proc = _lint(ROOT, ROOT / "pyproject.toml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "m3export layers KEPT" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """A spec-layer module importing the build (the top of the stack) must fail the lint."""
    shutil.copytree(ROOT / "m3export", tmp_path / "m3export", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "m3export" / "spec" / "upward.py").write_text("import m3export.build.driver  # noqa: F401\n")
    proc = _lint(tmp_path, tmp_path / "pyproject.toml")
    assert proc.returncode != 0, proc.stdout
    assert "m3export layers BROKEN" in proc.stdout
    assert "m3export.spec.upward -> m3export.build.driver" in proc.stdout
