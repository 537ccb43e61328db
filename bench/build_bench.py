"""Build cost and exported prefill latency, in one run.

1. m3-tiny full build (`pipeline.build`, every subgraph, every parity step) in a child process:
   wall time (target <= 60 s on 2 cores) and the child's peak RSS (`ru_maxrss` of RUSAGE_CHILDREN);
   then a no-op rebuild (target <= 10% of the full build) and a rebuild after an MTP-only change.
2. Prefill latency of the text-only subgraphs of a spec (default specs/m3-small.yaml without vision,
   multimodal and MTP), built with the `ort` and the `portable` MoE lowerings, vs the eager torch
   stage wrappers of the same model, chained the same way; batch 1, seq 256, timed round-robin,
   printed as ratios ort / eager.

    .venv/bin/python bench/build_bench.py [--latency-spec specs/m3-small.yaml] [--seq 256] [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from m3export.spec import M3Spec, load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from m3export.build.driver import build
from m3export.spec import load_spec
t1 = time.perf_counter()
spec = load_spec(sys.argv[1])
r = build(spec, sys.argv[2])
noop = build(spec, sys.argv[2])  # nothing changed: up to date
data = spec.model_dump(mode="json")
data["text"]["num_mtp_modules"] += 1  # only the MTP section changes: only mtp is re-exported
mtp = build(type(spec).model_validate(data), sys.argv[2])
reused = sorted(n for n, s in mtp.manifest["subgraphs"].items() if s["reused"])
print(json.dumps({"passed": r.passed, "build_s": r.seconds, "import_s": t1 - t0, "noop_s": noop.seconds,
                  "noop_up_to_date": noop.up_to_date, "mtp_s": mtp.seconds, "mtp_passed": mtp.passed,
                  "mtp_reused": reused}))
"""


def bench_tiny_build(spec_path: Path, threads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(spec_path), str(Path(tmp) / "out")],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"tiny build child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    print(f"{spec_path.stem} full build ({threads} threads, child process)")
    print(f"  parity gate: {'pass' if info['passed'] else 'FAIL'}")
    print(f"  build() {info['build_s']:.1f} s, imports {info['import_s']:.1f} s, process wall {wall:.1f} s")
    print(f"  ratio build / 60 s target: {info['build_s'] / 60:.2f}  (target <= 1.0)")
    print(f"  peak RSS {rss_mib:.0f} MiB")
    print(
        f"  no-op rebuild {info['noop_s']:.2f} s (up to date: {info['noop_up_to_date']}); "
        f"ratio no-op / full build: {info['noop_s'] / info['build_s']:.3f}  (target <= 0.10)"
    )
    print(
        f"  rebuild after an MTP-only change {info['mtp_s']:.1f} s ({'pass' if info['mtp_passed'] else 'FAIL'}), "
        f"reused {info['mtp_reused']}; ratio / full build: {info['mtp_s'] / info['build_s']:.2f}"
    )


def text_only(spec: M3Spec) -> M3Spec:
    data = spec.model_dump(mode="json")
    data.pop("vision", None)
    data.pop("multimodal", None)
    data["text"]["num_mtp_modules"] = 0
    data["name"] = spec.name + "-text"
    return M3Spec.model_validate(data)


def _median_ms(fns: Mapping[str, Callable[[], object]], warmup: int, runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + runs):
        for k, fn in fns.items():  # round-robin: machine noise hits every backend alike
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_latency(spec_path: Path, seq: int, threads: int, warmup: int, runs: int) -> None:
    from m3export.build.driver import build
    from m3export.model.factory import load_model
    from m3export.runners.chain import run_chain
    from m3export.runners.ort_runner import OrtRunner
    from m3export.runners.torch_runner import TorchRunner
    from m3export.split.plan import plan_subgraphs
    from m3export.split.subgraphs import build_stage

    spec = text_only(load_spec(spec_path))
    plans = plan_subgraphs(spec)
    g = torch.Generator().manual_seed(0)
    h = spec.text.hidden_size
    inp = {
        "input_ids": torch.randint(3, spec.text.vocab_size, (1, seq), generator=g).numpy(),
        "position_ids": torch.arange(seq)[None, :].numpy(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        fns: dict[str, Callable[[], dict[str, np.ndarray]]] = {}
        outs: dict[str, np.ndarray] = {}
        for lowering in ("ort", "portable"):
            t0 = time.perf_counter()
            variant = spec.model_dump(mode="json")
            variant["export"]["moe"] = lowering
            res = build(M3Spec.model_validate(variant), Path(tmp) / lowering)
            print(
                f"{spec.name}: build with lowering {lowering}: {time.perf_counter() - t0:.1f} s "
                f"({'pass' if res.passed else 'FAIL'})"
            )
            runners = {
                p.name: OrtRunner(res.out_dir / p.name / f"{p.name}.onnx", num_threads=threads) for p in plans
            }

            def run_ort(r: dict[str, OrtRunner] = runners) -> dict[str, np.ndarray]:
                return run_chain(
                    plans, inp, lambda plan, feed: r[plan.name].infer(feed), hidden_size=h
                ).values

            fns[f"ort-{lowering}"] = run_ort
        torch.set_num_threads(threads)
        model = load_model(spec).eval()
        stages = {p.name: TorchRunner.for_plan(build_stage(model, p), p) for p in plans}

        def run_eager() -> dict[str, np.ndarray]:
            with torch.inference_mode():
                return run_chain(
                    plans, inp, lambda plan, feed: stages[plan.name].infer(feed), hidden_size=h
                ).values

        fns["eager"] = run_eager
        for k, fn in fns.items():
            outs[k] = fn()["logits"]
        med = _median_ms(fns, warmup, runs)
    print(
        f"{spec.name} prefill (text stages {[p.name for p in plans]}), batch 1, seq {seq}, {threads} threads"
    )
    for k in fns:
        diff = "" if k == "eager" else f"   max |logits - eager| {np.abs(outs[k] - outs['eager']).max():.2g}"
        print(f"  {k:<13} median {med[k]:9.2f} ms{diff}")
    for k in ("ort-ort", "ort-portable"):
        print(f"  ratio {k} / eager: {med[k] / med['eager']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-spec", type=Path, default=SPECS / "m3-tiny.yaml")
    ap.add_argument("--latency-spec", type=Path, default=SPECS / "m3-small.yaml")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--skip-build", action="store_true", help="only the latency part")
    ap.add_argument("--skip-latency", action="store_true", help="only the build part")
    args = ap.parse_args()
    if not args.skip_build:
        bench_tiny_build(args.build_spec, args.threads)
    if not args.skip_latency:
        bench_latency(args.latency_spec, args.seq, args.threads, args.warmup, args.runs)


if __name__ == "__main__":
    main()
