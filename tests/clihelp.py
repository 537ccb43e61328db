"""Run the real console entry point in-process and capture exit code, stdout and stderr."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest

from m3export.cli import main


def _invoke(args: list[str]) -> int:
    old = sys.argv
    sys.argv = ["m3export", *args]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = _invoke(args)
    out, err = capsys.readouterr()
    return code, out, err


def run_cli_uncaptured(args: list[str]) -> tuple[int, str, str]:
    """`run_cli` for module- and session-scoped fixtures (no capsys there): redirects stdout /
    stderr itself."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _invoke(args)
    return code, out.getvalue(), err.getvalue()
