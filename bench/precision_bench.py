"""Deployable precisions side by side (issue #14, deliverable 5), measured in one run.

For each `export.precision` (float32; float16; float16 graphs with int8 and with int4 experts; float32
graphs with int4 experts) a text-only variant of a spec (default specs/m3-small.yaml, one MTP depth,
random weights, the same seed) is built with every parity step.
Then, with ONNX Runtime CPU and batch 1, the bench reports:

- the artifact's weight bytes on disk (every `.onnx.data` file, shared ones once), and the routed
  experts' bytes alone (the MoE / QMoE nodes' weight and scale initializers) against bf16 experts;
- greedy decode tokens/s: --new-tokens tokens after a --prompt-len prompt, median of --runs calls,
  the prefill (a 1-token call) subtracted;
- against the fp32 build on the same prompt: top-1 agreement of the prefill logits over every
  position, the share of greedy tokens identical to fp32's, and routing agreement (the share of
  (MoE layer, token) rows of the prompt whose expert set equals the fp32 eager model's).

    .venv/bin/python bench/precision_bench.py [--spec specs/m3-small.yaml] [--prompt-len 128]
        [--new-tokens 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_bench import SPECS, bench_spec, build_ort, ort_fn, rates, timed_medians

from m3export.runners.chain import run_chain
from m3export.spec import M3Spec

VARIANTS = (
    ("float32", "same"),
    ("float16", "same"),
    ("float16", "int8"),
    ("float16", "int4"),
    ("float32", "int4"),
)


def with_precision(spec: M3Spec, dtype: str, experts: str = "same") -> M3Spec:
    data = spec.model_dump(mode="json")
    data["name"] += f"-{dtype}" + ("" if experts == "same" else f"-{experts}")
    data["export"]["precision"].update(dtype=dtype, experts=experts)
    data.pop("tolerances")
    return M3Spec.model_validate(data)


def expert_bytes(onnx_dir: Path) -> int:
    """Bytes of the routed-expert initializers (weights and scales) the MoE / QMoE nodes read."""
    import onnx

    total = 0
    for path in sorted(onnx_dir.glob("*.onnx")):
        model = onnx.load(path, load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type in ("MoE", "QMoE"):
                for name in node.input[2:7]:
                    if name in inits:
                        t = inits[name]
                        item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                        total += int(np.prod(t.dims)) * item
    return total


def eager_routing(spec: M3Spec, prompt: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The sorted expert set of every token in every MoE layer (MTP included) of the eager model on
    the prompt; the graphs route exactly as it does (the build's `routing` step)."""
    import torch

    import m3export.ops.moe as moe_ops
    from m3export.model.factory import load_model

    sets: list[np.ndarray] = []
    route = moe_ops.route

    def recording(*args: Any) -> Any:
        weights, idx = route(*args)
        sets.append(np.sort(idx.numpy(), axis=-1))
        return weights, idx

    setattr(moe_ops, "route", recording)  # noqa: B010  (a hook on the module attribute the op calls)
    try:
        model = load_model(spec).eval()
        with torch.no_grad():
            model(
                torch.from_numpy(prompt["input_ids"]), position_ids=torch.from_numpy(prompt["position_ids"])
            )
        del model
    finally:
        setattr(moe_ops, "route", route)  # noqa: B010
    return sets


def routing_agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Share of (layer, token) rows whose expert set is the same."""
    return float(np.mean(np.concatenate([np.all(x == y, axis=-1) for x, y in zip(a, b, strict=True)])))


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
        for dtype, experts in VARIANTS:
            spec = with_precision(base, dtype, experts)
            out = Path(tmp) / f"{dtype}-{experts}"
            plans, run = build_ort(spec, out)
            weight_bytes = sum(f.stat().st_size for f in out.rglob("*.onnx.data"))
            logits = run_chain(plans, prompt, run, hidden_size=spec.text.hidden_size).values["logits"]
            fns = {
                "gen": ort_fn(spec, plans, run, prompt, args.new_tokens, False),
                "prefill": ort_fn(spec, plans, run, prompt, 1, False),
            }
            med, last = timed_medians(fns, args.runs)
            _, decode = rates(med, args.new_tokens, "prefill", "gen")
            name = dtype if experts == "same" else f"{dtype}+{experts}"
            rows[name] = (
                weight_bytes,
                expert_bytes(out / "onnx"),
                decode,
                logits.argmax(-1),
                last["gen"].tokens,
                eager_routing(spec, prompt),
            )
            del run, plans
    ref = rows["float32"]
    bf16_experts = rows["float16"][1]  # 2 bytes per weight: what bf16 experts take
    print(f"\n{args.spec.name} text-only, prompt {args.prompt_len}, {args.new_tokens} new tokens, ORT CPU")
    print(
        f"{'precision':<16} {'weights on disk':>16} {'vs fp32':>8} {'experts':>11} {'vs bf16':>8} "
        f"{'decode tok/s':>13} {'vs fp32':>8} {'top-1 vs fp32':>14} {'tokens = fp32':>14} {'routing = fp32':>15}"
    )
    for name, (nbytes, ebytes, decode, top1, tokens, routing) in rows.items():
        agree = float(np.mean(top1 == ref[3]))
        same = float(np.mean([a == b for a, b in zip(tokens, ref[4], strict=True)]))
        print(
            f"{name:<16} {nbytes / 2**20:12.1f} MiB {nbytes / ref[0]:8.3f} {ebytes / 2**20:7.1f} MiB "
            f"{ebytes / bf16_experts:8.3f} {decode:13.2f} {decode / ref[2]:8.3f} {agree:14.4f} {same:14.4f} "
            f"{routing_agreement(routing, ref[5]):15.4f}"
        )


if __name__ == "__main__":
    main()
