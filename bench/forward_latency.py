"""Eager CPU forward latency: m3export's text model vs transformers' `MiniMaxM3VLForCausalLM`.

For each variant (text-only, no MTP: transformers has none) one random model is saved as an HF
checkpoint and loaded by both sides, so the weights are the same. All models are timed in one
process, round-robin (one forward each per round) so that machine noise hits them alike; the
median over the rounds after warm-up is reported, with the ratio ours / theirs (target <= 1.0).

    .venv/bin/python bench/forward_latency.py [--variants m3-tiny m3-small] [--runs 20] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from m3export.model.checkpoint import save_checkpoint
from m3export.model.text import M3ForCausalLM
from m3export.spec import M3Spec, load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
HF_ATTN = ("sdpa", "eager")


def text_only_spec(path: Path) -> M3Spec:
    """The shipped spec without vision/multimodal and without MTP depths."""
    data = load_spec(path).model_dump(mode="json")
    data.pop("vision", None)
    data.pop("multimodal", None)
    data["text"]["num_mtp_modules"] = 0
    return M3Spec.model_validate(data)


def load_models(spec: M3Spec, ckpt: Path) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> forward(ids) -> logits, for ours and transformers under each attention implementation."""
    from transformers import MiniMaxM3VLForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    save_checkpoint(M3ForCausalLM.from_config(spec), spec, ckpt)
    ours = M3ForCausalLM.from_pretrained(ckpt, spec=spec)
    models: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"m3export": lambda ids: ours(ids).logits}
    for attn in HF_ATTN:
        hf = MiniMaxM3VLForCausalLM.from_pretrained(
            ckpt, attn_implementation=attn, dtype=torch.float32
        ).eval()
        models[f"hf-{attn}"] = lambda ids, hf=hf: hf(input_ids=ids).logits
    return models


@torch.inference_mode()
def time_models(
    models: dict[str, Callable[[torch.Tensor], torch.Tensor]], ids: torch.Tensor, warmup: int, runs: int
) -> dict[str, list[float]]:
    """Seconds per forward, round-robin over the models; warm-up rounds are dropped."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + runs):
        for name, fwd in models.items():
            start = time.perf_counter()
            fwd(ids)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def max_logit_diff(models: dict[str, Callable[[torch.Tensor], torch.Tensor]], ids: torch.Tensor) -> str:
    ref = models["m3export"](ids)
    return ", ".join(
        f"{n} {(models[n](ids) - ref).abs().max().item():.1e}" for n in models if n != "m3export"
    )


@torch.inference_mode()
def profile(models: dict[str, Callable[[torch.Tensor], torch.Tensor]], ids: torch.Tensor, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name in ("m3export", "hf-sdpa"):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                models[name](ids)
        print(f"\n--- {name}: top ops by self CPU time (3 forwards)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def run_variant(spec_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    spec = text_only_spec(spec_path)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        models = load_models(spec, Path(d))
    diff = max_logit_diff(models, ids)
    times = time_models(models, ids, args.warmup, args.runs)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(
        f"\n{spec.name} (text-only, no MTP), batch {args.batch}, seq {args.seq}, {args.runs} runs after {args.warmup} warm-up"
    )
    print(f"  max |logits - m3export|: {diff}")
    for name, t in times.items():
        q1, _, q3 = statistics.quantiles(t, n=4)
        print(f"  {name:10s} median {med[name] * 1e3:8.2f} ms   (IQR {q1 * 1e3:.2f}-{q3 * 1e3:.2f})")
    for attn in HF_ATTN:
        print(f"  ratio m3export / hf-{attn}: {med['m3export'] / med[f'hf-{attn}']:.3f}  (target <= 1.0)")
    if args.profile:
        profile(models, ids, args.profile_rows)
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", nargs="+", default=["m3-tiny", "m3-small"], help="spec names under specs/"
    )
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables")
    parser.add_argument("--profile-rows", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    from m3export.parity.hf_oracle import register_text_only_conversion

    register_text_only_conversion()
    for name in args.variants:
        run_variant(SPECS / f"{name}.yaml", args)


if __name__ == "__main__":
    main()
