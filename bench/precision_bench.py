"""Deployable precisions side by side (issue #14, deliverable 5), measured in one run.

For each `export.precision.dtype` (float32, float16) a text-only variant of a spec (default
specs/m3-small.yaml, one MTP depth, random weights, the same seed) is built with every parity step.
Then, with ONNX Runtime CPU and batch 1, the bench reports:

- the artifact's weight bytes on disk (every `.onnx.data` file, shared ones once);
- greedy decode tokens/s: --new-tokens tokens after a --prompt-len prompt, median of --runs calls,
  the prefill (a 1-token call) subtracted;
- against the fp32 build on the same prompt: top-1 agreement of the prefill logits over every
  position, and the share of greedy tokens identical to fp32's.

int8 / int4 experts (ONNX Runtime QMoE) are not built yet, so they are not in the table.

    .venv/bin/python bench/precision_bench.py [--spec specs/m3-small.yaml] [--prompt-len 128]
        [--new-tokens 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_bench import SPECS, bench_spec, build_ort, ort_fn, rates, timed_medians

from m3export.runners.chain import run_chain
from m3export.spec import M3Spec


def with_precision(spec: M3Spec, dtype: str) -> M3Spec:
    data = spec.model_dump(mode="json")
    data["name"] += f"-{dtype}"
    data["export"]["precision"]["dtype"] = dtype
    data.pop("tolerances")
    return M3Spec.model_validate(data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", type=Path, default=SPECS / "m3-small.yaml")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    base = bench_spec(args.spec)
    ids = np.random.default_rng(0).integers(3, base.text.vocab_size, (1, args.prompt_len), dtype=np.int64)
    prompt = {"input_ids": ids, "position_ids": np.arange(args.prompt_len, dtype=np.int64)[None, :]}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="m3export-precision-") as tmp:
        for dtype in ("float32", "float16"):
            spec = with_precision(base, dtype)
            out = Path(tmp) / dtype
            plans, run = build_ort(spec, out)
            weight_bytes = sum(f.stat().st_size for f in out.rglob("*.onnx.data"))
            logits = run_chain(plans, prompt, run, hidden_size=spec.text.hidden_size).values["logits"]
            fns = {
                "gen": ort_fn(spec, plans, run, prompt, args.new_tokens, False),
                "prefill": ort_fn(spec, plans, run, prompt, 1, False),
            }
            med, last = timed_medians(fns, args.runs)
            _, decode = rates(med, args.new_tokens, "prefill", "gen")
            rows[dtype] = (weight_bytes, decode, logits.argmax(-1), last["gen"].tokens)
            del run, plans
    ref = rows["float32"]
    print(f"\n{args.spec.name} text-only, prompt {args.prompt_len}, {args.new_tokens} new tokens, ORT CPU")
    print(
        f"{'precision':<10} {'weights on disk':>16} {'vs fp32':>8} {'decode tok/s':>13} {'vs fp32':>8} "
        f"{'top-1 vs fp32':>14} {'tokens = fp32':>14}"
    )
    for dtype, (nbytes, decode, top1, tokens) in rows.items():
        agree = float(np.mean(top1 == ref[2]))
        same = float(np.mean([a == b for a, b in zip(tokens, ref[3], strict=True)]))
        print(
            f"{dtype:<10} {nbytes / 2**20:13.1f} MiB {nbytes / ref[0]:8.3f} {decode:13.2f} "
            f"{decode / ref[1]:8.3f} {agree:14.4f} {same:14.4f}"
        )


if __name__ == "__main__":
    main()
