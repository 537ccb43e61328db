"""Calibrate the default parity tolerances (m3export/spec/defaults.py) on several checkpoints.

Each checkpoint is built with permissive measuring tolerances (so every step runs and records its
numbers), then the worst value of each metric per step is printed next to the default bound, with
the headroom (bound / worst for upper bounds). Checkpoints:

  tiny          specs/m3-tiny.yaml, m3export's random init
  tiny-hf       the tiny dims, saved by transformers with every tensor re-randomised (§7 scales)
  wide-hf       hidden 512, 8 layers, 16 experts, 4 text stages, every weight N(0, 0.05²), saved
                by transformers (the red-team checkpoint of issue #11: larger activations)
  small         specs/m3-small.yaml (200k vocabulary), random init (--with-small: ~3 min)

    python bench/calibrate_tolerances.py [--with-small] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m3export.build.driver import build  # noqa: E402
from m3export.parity.hf_oracle import randomise_hf_weights  # noqa: E402
from m3export.spec import M3Spec, dump_spec, from_hf_config, load_spec, parse_spec, to_hf_config  # noqa: E402
from m3export.spec.defaults import default_tolerances  # noqa: E402

MEASURE = {
    "max_abs_scaled": 1.0,
    "min_cosine": -1.0,
    "reason": "measuring: permissive so that every step runs and records its numbers",
}
STEPS = ("split", "onnx", "end_to_end", "decode")


def _measuring(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["tolerances"] = {
        **{s: dict(MEASURE) for s in STEPS},
        "generate": {"max_abs": 1e9, "reason": "measuring"},
    }
    data["tolerances"]["onnx"]["min_routing_agreement"] = 0.0
    return data


def _hf_checkpoint(spec: M3Spec, out: Path, scale: float | None, seed: int) -> Path:
    """A checkpoint written by transformers: §7-like scales (scale None) or every tensor N(0, scale²)."""
    import transformers

    cfg = {k: v for k, v in to_hf_config(spec).items() if k != "architectures"}
    if spec.is_vl:
        model = transformers.MiniMaxM3SparseForConditionalGeneration(transformers.MiniMaxM3VLConfig(**cfg))
    else:
        from m3export.parity.hf_oracle import register_text_only_conversion

        register_text_only_conversion()  # so that save_pretrained writes the §6.1 checkpoint keys
        text = {k: v for k, v in cfg.items() if k not in ("model_type",)}
        model = transformers.MiniMaxM3VLForCausalLM(transformers.MiniMaxM3VLTextConfig(**text))
    randomise_hf_weights(model, seed, scale)
    model.save_pretrained(out)
    return out


def _variants(tmp: Path, with_small: bool) -> dict[str, M3Spec]:
    tiny = load_spec(ROOT / "specs" / "m3-tiny.yaml")
    out = {"tiny": parse_spec(_measuring(dump_spec(tiny)))}
    hf_tiny = _hf_checkpoint(
        parse_spec({**dump_spec(tiny), "text": {**dump_spec(tiny)["text"], "num_mtp_modules": 0}}),
        tmp / "tiny-hf",
        None,
        1,
    )
    data = dump_spec(from_hf_config(hf_tiny, name="tiny-hf"))
    data["pipeline"] = {"num_text_stages": 2}
    out["tiny-hf"] = parse_spec(_measuring(data))
    wide = dump_spec(tiny)
    wide.pop("vision")
    wide.pop("multimodal")
    t = wide["text"]
    t.update(
        hidden_size=512,
        num_hidden_layers=8,
        num_local_experts=16,
        num_mtp_modules=0,
        moe_layer_freq=[0] + [1] * 7,
    )
    sa = t["sparse_attention_config"]
    sa.update(sparse_attention_freq=[0] + [1] * 7, sparse_disable_index_value=[0] + [1] * 7)
    hf_wide = _hf_checkpoint(parse_spec(wide), tmp / "wide-hf", 0.05, 2)
    data = dump_spec(from_hf_config(hf_wide, name="wide-hf"))
    data["pipeline"] = {"num_text_stages": 4}
    out["wide-hf"] = parse_spec(_measuring(data))
    if with_small:
        out["small"] = parse_spec(_measuring(dump_spec(load_spec(ROOT / "specs" / "m3-small.yaml"))))
    return out


def _worst(manifest: dict[str, Any]) -> dict[str, dict[str, float]]:
    records = [r for s in manifest["subgraphs"].values() for r in s["parity"]] + manifest["parity"]
    worst: dict[str, dict[str, float]] = {}
    for r in records:
        step = "onnx" if r["step"] == "routing" else r["step"]
        w = worst.setdefault(
            step,
            {"max_abs": 0.0, "max_abs_scaled": 0.0, "min_cosine": 1.0, "min_top1": 1.0, "min_routing": 1.0},
        )
        for o in r["outputs"]:
            if o["kind"] == "routing":
                w["min_routing"] = min(w["min_routing"], float(o["routing_agreement"]))
                continue
            w["max_abs"] = max(w["max_abs"], float(o["max_abs"]))
            w["max_abs_scaled"] = max(w["max_abs_scaled"], float(o["max_abs_scaled"]))
            w["min_cosine"] = min(w["min_cosine"], float(o["cosine"]))
            if o["top1_agreement"] is not None:
                w["min_top1"] = min(w["min_top1"], float(o["top1_agreement"]))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--with-small", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    defaults = default_tolerances("float32")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="m3x-calib-") as tmp:
        for name, spec in _variants(Path(tmp), args.with_small).items():
            print(f"building {name} ...", flush=True)
            res = build(spec, Path(tmp) / "out" / name)
            results[name] = _worst(res.manifest)
    print(
        f"\n{'step':<11} {'checkpoint':<9} {'max_abs':>10} {'scaled':>10} {'cosine':>11} {'top1':>7} {'routing':>8}"
    )
    for step in STEPS:
        for name, worst in results.items():
            w = worst.get(step)
            if w is None:
                continue
            print(
                f"{step:<11} {name:<9} {w['max_abs']:>10.3g} {w['max_abs_scaled']:>10.3g} "
                f"{w['min_cosine']:>11.8f} {w['min_top1']:>7.4f} {w['min_routing']:>8.4f}"
            )
        bound = defaults[step].get("max_abs_scaled")
        if bound:
            top = max(r[step]["max_abs_scaled"] for r in results.values() if step in r)
            ratio = bound / top if top > 0 else math.inf
            print(
                f"{'':<11} default max_abs_scaled {bound:g}: headroom {ratio:.1f}x over the worst {top:.3g}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
