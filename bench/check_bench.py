"""`m3export check` time on a tiny build vs its 15 s target, in one run.

Builds specs/m3-tiny.yaml into a temporary directory (or takes `--artifacts DIR`), then times
`m3export check DIR` once as a child process (what a user waits for: interpreter start, imports,
integrity, inference, comparison) and once in-process split into its integrity and parity parts.

    .venv/bin/python bench/check_bench.py [--spec specs/m3-tiny.yaml] [--artifacts DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 15.0
SPECS = Path(__file__).resolve().parents[1] / "specs"
CLI = "from m3export.cli import main; main()"


def _build(spec_path: Path, out: Path) -> Path:
    from m3export.build.driver import build
    from m3export.spec import load_spec

    t0 = time.perf_counter()
    result = build(load_spec(spec_path), out)
    print(f"built {spec_path.name} in {time.perf_counter() - t0:.1f} s ({result.status}) -> {result.out_dir}")
    return result.out_dir


def bench_check(root: Path) -> None:
    from m3export.artifacts.verify import verify_artifacts
    from m3export.runners.registry import open_runners
    from m3export.runtime.check import run_parity

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CLI, "check", str(root)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"m3export check exited {proc.returncode}: {proc.stderr.strip()}")
    t1 = time.perf_counter()
    arts = verify_artifacts(root)
    t2 = time.perf_counter()
    runners = open_runners("ort", arts.subgraphs, arts.build_info())
    entries, _ = run_parity(arts, lambda sub: runners[sub.name], lambda _m: None)
    t3 = time.perf_counter()
    print(f"m3export check {root} ({len(arts.files)} files, {len(entries)} comparisons, backend ort)")
    print(f"  exit code {proc.returncode} ({'pass' if proc.returncode == 0 else 'PARITY FAILURE'})")
    print(f"  process wall {wall:.2f} s (interpreter, imports, integrity, inference, comparison)")
    print(f"  in-process: integrity {t2 - t1:.2f} s, runners + inference + compare {t3 - t2:.2f} s")
    print(f"  ratio check / {TARGET_S:.0f} s target: {wall / TARGET_S:.2f}  (target <= 1.0)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=SPECS / "m3-tiny.yaml", help="spec to build and check")
    ap.add_argument("--artifacts", type=Path, help="check this existing build instead of building one")
    args = ap.parse_args()
    if args.artifacts is not None:
        bench_check(args.artifacts)
        return
    with tempfile.TemporaryDirectory() as tmp:
        bench_check(_build(args.spec, Path(tmp) / args.spec.stem))


if __name__ == "__main__":
    main()
