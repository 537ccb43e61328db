"""Default parity tolerances per dtype: what a spec without a `tolerances` step gets (`spec from-hf`
writes them out), so every step of every build is gated.

Bounds are scale-free (`max_abs_scaled` = max |error| / max |reference|, cosine, top-1 and routing
agreement) because activations grow with the hidden size and the weight scale of a checkpoint, and an
absolute bound calibrated on one checkpoint fails a correct build of another (issue #11 item 2). Only
the exact steps keep absolute bounds: `split` (the same modules, bit-identical) and `generate`
(token ids compared as integers). The numbers were measured with `bench/calibrate_tolerances.py` on
four checkpoints (random m3-tiny, a transformers-written tiny, a hidden-512 8-layer 16-expert
4-stage checkpoint with weight scale 0.05, random m3-small with its 200k vocabulary); bench/README.md
has the table. The absolute errors differ 4x across them (2.2e-6 to 8.2e-6 for `onnx`), the scaled
ones less (5.8e-7 to 1.7e-6); each scaled bound keeps >= 6x headroom over the worst value measured.
"""

from __future__ import annotations

from typing import Any

_MEASURED_FP32 = (
    "measured on 4 checkpoints with bench/calibrate_tolerances.py (bench/README.md, 'Tolerance "
    "calibration'): worst scaled error {worst}, so the bound keeps >= 6x headroom"
)

FLOAT32: dict[str, dict[str, Any]] = {
    "reference": {
        "max_abs_scaled": 1e-5,
        "min_cosine": 0.99999,
        "min_top1_agreement": 0.99,
        "reason": "fp32 CPU vs transformers' independent implementation: only summation order differs "
        "(export-notes §2). Top-1 allows a flip of a near-tie among a large vocabulary.",
    },
    "split": {
        "max_abs": 0.0,
        "min_top1_agreement": 1.0,
        "reason": "the chained stage wrappers run the full model's own modules in the same order: "
        "bit-identical by construction.",
    },
    "onnx": {
        "max_abs_scaled": 1e-5,
        "min_cosine": 0.99999,
        "min_top1_agreement": 0.99,
        "min_routing_agreement": 0.99,
        "reason": "each subgraph, ONNX Runtime CPU vs the eager wrapper in fp32: only kernel summation "
        f"order differs; {_MEASURED_FP32.format(worst='1.5e-6')}. Top-1 and routing agreement were 1.0 "
        "everywhere; 0.99 allows a flip of a near-tie (a wrong layout fails the scaled bound by 1000x).",
    },
    "end_to_end": {
        "max_abs_scaled": 1e-5,
        "min_cosine": 0.99999,
        "min_top1_agreement": 0.99,
        "reason": "chained ONNX Runtime subgraphs vs the full eager model in fp32: the per-subgraph "
        f"rounding of `onnx` accumulates over the stages; {_MEASURED_FP32.format(worst='1.7e-6')}.",
    },
    "decode": {
        "max_abs_scaled": 1e-5,
        "min_cosine": 0.99999,
        "min_top1_agreement": 0.99,
        "reason": "chunked prefill + one-token steps through the KV cache vs the full recompute in fp32: "
        "the same keys and values, other summation orders, plus end_to_end's rounding; "
        f"{_MEASURED_FP32.format(worst='1.7e-6')}.",
    },
    "generate": {
        "max_abs": 0.0,
        "reason": "greedy token ids compared as integers: ORT, eager torch and transformers on the same "
        "weights, and MTP speculative vs plain decoding, must emit the same tokens.",
    },
}

DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {"float32": FLOAT32}


def default_tolerances(dtype: str) -> dict[str, dict[str, Any]]:
    """Every step's default tolerance for `dtype` (float32's for a dtype without its own table)."""
    return {step: dict(tol) for step, tol in DEFAULTS.get(dtype, FLOAT32).items()}
