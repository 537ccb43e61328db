"""Greedy generation speed of the exported graphs (issue #5), as ratios measured in one run.

On a text-only variant of a spec (default specs/m3-small.yaml without vision and multimodal, one
MTP depth, no tolerances so that `build` only exports), fp32 CPU, batch 1:

1. ORT decode vs transformers' `generate`: one random model is saved as an HF checkpoint; the
   graphs are built from that checkpoint and `MiniMaxM3VLForCausalLM` (default attention) loads
   it too. Same prompt, greedy, EOS disabled on both sides so both produce exactly --new-tokens
   tokens. Prints tokens/s of each (the whole call, and decode only: the prefill, timed as a
   1-token call, subtracted), the ratios (target >= 1.5) and whether the token ids are identical.
2. `--mtp` vs plain ORT decoding on the same random build (a random MTP head rarely agrees).
3. The same on a build whose MTP head always agrees with the main model (`make_mtp_agree`):
   acceptance ~1.0, ~2 tokens per main forward; the tokens must equal plain decoding's.

Every timing is the median of --runs calls after one warm-up call, taken round-robin so that
background load hits each side alike. Threads are left at the torch / ONNX Runtime defaults.

    .venv/bin/python bench/generate_bench.py [--spec specs/m3-small.yaml] [--prompt-len 128]
        [--new-tokens 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3export.runners.decode import GenerateResult, generate_tokens
from m3export.spec import M3Spec, load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
Timed = Callable[[], Any]


def bench_spec(path: Path, checkpoint: Path | None = None, eos: bool = True) -> M3Spec:
    """Text-only, one MTP depth, no tolerances (build only exports); weights from `checkpoint`."""
    data = load_spec(path).model_dump(mode="json")
    data.pop("vision", None)
    data.pop("multimodal", None)
    data["name"] += "-text"
    data["text"]["num_mtp_modules"] = 1
    if not eos:
        data["text"]["eos_token_id"] = None
    data["tolerances"] = {}
    if checkpoint is not None:
        data["weights"] = {"checkpoint": str(checkpoint)}
    return M3Spec.model_validate(data)


def register_text_only_conversion() -> None:
    """transformers registers the §6.1 key conversion for the VL model type only; the text-only class
    gets the same renames minus the VL prefix moves (as tests/test_parity_transformers.py)."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    vl = get_checkpoint_conversion_mapping("minimax_m3_vl")
    text = [t for t in vl if not any(p.startswith("^") for p in t.source_patterns)]
    register_checkpoint_conversion_mapping("MiniMaxM3VLForCausalLM", text, overwrite=True)


def build_ort(spec: M3Spec, out: Path) -> tuple[Any, Callable[..., Any]]:
    """Build the spec's subgraphs (export only) and return (plans, run) over ORT sessions."""
    from m3export.artifacts.verify import verify_artifacts
    from m3export.build.driver import build
    from m3export.runners.registry import open_runners

    t0 = time.perf_counter()
    res = build(spec, out)
    print(
        f"  build {spec.name} ({'checkpoint' if spec.weights.checkpoint else 'random'}): "
        f"{time.perf_counter() - t0:.1f} s ({res.status})"
    )
    if not res.passed:
        raise SystemExit(f"build failed: {res.failed_subjects()}")
    arts = verify_artifacts(res.out_dir)
    runners = open_runners("ort", arts.subgraphs, arts.build_info())
    print(f"  subgraphs {[p.name for p in arts.plans]}")
    return arts.plans, lambda plan, feed: runners[plan.name].infer(feed)


def timed_medians(fns: dict[str, Timed], runs: int) -> tuple[dict[str, float], dict[str, Any]]:
    """One warm-up call each, then `runs` round-robin rounds; median seconds and the last results."""
    last = {k: fn() for k, fn in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            last[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, last


def ort_fn(spec: M3Spec, plans: Any, run: Any, prompt: dict[str, np.ndarray], n: int, mtp: bool) -> Timed:
    return lambda: generate_tokens(spec, plans, run, prompt, n, mtp=mtp)


def rates(med: dict[str, float], n: int, prefill_key: str, key: str) -> tuple[float, float]:
    """(tokens/s over the whole call, decode tokens/s with the 1-token call's time subtracted)."""
    return n / med[key], (n - 1) / max(med[key] - med[prefill_key], 1e-9)


def section_vs_transformers(
    spec: M3Spec, ckpt: Path, plans: Any, run: Any, ids: np.ndarray, n: int, runs: int
) -> dict[str, float]:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    register_text_only_conversion()
    hf = transformers.MiniMaxM3VLForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    attn = hf.config._attn_implementation
    hf_ids = torch.from_numpy(ids)

    def hf_gen(k: int) -> Timed:
        def call() -> list[int]:
            with torch.inference_mode():
                seq = hf.generate(
                    hf_ids,
                    max_new_tokens=k,
                    min_new_tokens=k,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            return seq[0, ids.shape[1] :].tolist()

        return call

    prompt = {"input_ids": ids, "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :]}
    fns = {
        "ort": ort_fn(spec, plans, run, prompt, n, False),
        "hf": hf_gen(n),
        "ort-prefill": ort_fn(spec, plans, run, prompt, 1, False),
        "hf-prefill": hf_gen(1),
    }
    med, last = timed_medians(fns, runs)
    ort_tokens: list[int] = last["ort"].tokens
    hf_tokens: list[int] = last["hf"]
    ort_all, ort_dec = rates(med, n, "ort-prefill", "ort")
    hf_all, hf_dec = rates(med, n, "hf-prefill", "hf")
    print(f"1. ORT vs transformers generate (attn_implementation={attn!r}), {n} new tokens")
    print(f"  ort           {med['ort']:7.3f} s   {ort_all:7.2f} tok/s   decode only {ort_dec:7.2f} tok/s")
    print(f"  transformers  {med['hf']:7.3f} s   {hf_all:7.2f} tok/s   decode only {hf_dec:7.2f} tok/s")
    print(f"  prefill (1-token call): ort {med['ort-prefill']:.3f} s, transformers {med['hf-prefill']:.3f} s")
    same = ort_tokens == hf_tokens
    print(f"  tokens identical: {same}  (ort {len(ort_tokens)}, transformers {len(hf_tokens)} tokens)")
    if not same:
        first = next((i for i, (a, b) in enumerate(zip(ort_tokens, hf_tokens, strict=False)) if a != b), None)
        print(f"  first difference at new token {first}")
    ratio_all, ratio_dec = ort_all / hf_all, ort_dec / hf_dec
    print(
        f"  ratio ort / transformers tok/s: {ratio_all:.2f} whole call, {ratio_dec:.2f} decode only"
        "  (target >= 1.5)"
    )
    return {"whole": ratio_all, "decode": ratio_dec, "identical": float(same)}


def section_mtp(
    title: str, spec: M3Spec, plans: Any, run: Any, ids: np.ndarray, n: int, runs: int
) -> dict[str, float]:
    prompt = {"input_ids": ids, "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :]}
    fns = {
        "plain": ort_fn(spec, plans, run, prompt, n, False),
        "mtp": ort_fn(spec, plans, run, prompt, n, True),
        "prefill": ort_fn(spec, plans, run, prompt, 1, False),
    }
    med, last = timed_medians(fns, runs)
    plain: GenerateResult = last["plain"]
    mtp: GenerateResult = last["mtp"]
    print(f"{title}, {n} new tokens (ORT)")
    for k, r in (("plain", plain), ("mtp", mtp)):
        whole, dec = rates(med, n, "prefill", k)
        acc = "-" if r.acceptance_rate is None else f"{r.acceptance_rate:.3f} ({r.accepted}/{r.drafted})"
        print(
            f"  {k:<6} {med[k]:7.3f} s   {whole:7.2f} tok/s   decode only {dec:7.2f} tok/s   "
            f"main forwards {r.main_forwards}, tokens/forward {r.tokens_per_forward:.2f}, acceptance {acc}"
        )
    same = plain.tokens == mtp.tokens
    print(f"  tokens identical to plain: {same}")
    ratio_all = med["plain"] / med["mtp"]
    ratio_dec = (med["plain"] - med["prefill"]) / max(med["mtp"] - med["prefill"], 1e-9)
    print(f"  ratio mtp / plain tok/s: {ratio_all:.2f} whole call, {ratio_dec:.2f} decode only")
    return {
        "whole": ratio_all,
        "decode": ratio_dec,
        "acceptance": mtp.acceptance_rate or 0.0,
        "tpf": mtp.tokens_per_forward,
        "identical": float(same),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=SPECS / "m3-small.yaml")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="timed calls per side after one warm-up")
    args = ap.parse_args()

    import onnxruntime as ort

    from m3export.model.checkpoint import save_checkpoint
    from m3export.model.factory import load_model
    from m3export.model.init import make_mtp_agree

    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__} "
        f"(intra-op threads: default = one per physical core), os.cpu_count() {os.cpu_count()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    base = bench_spec(args.spec)
    ids = torch.randint(3, 1000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0)).numpy()
    n = args.new_tokens
    print(
        f"{base.name}: prompt {args.prompt_len} tokens, {n} new tokens, greedy, EOS disabled, "
        f"{args.runs} timed runs after 1 warm-up, round-robin"
    )
    with tempfile.TemporaryDirectory(prefix="m3-generate-bench-") as tmp:
        root = Path(tmp)
        random_ckpt = save_checkpoint(load_model(base).eval(), base, root / "random-ckpt")
        agree_model = load_model(base).eval()
        make_mtp_agree(agree_model)
        agree_ckpt = save_checkpoint(agree_model, base, root / "agree-ckpt")
        del agree_model

        plans, run = build_ort(bench_spec(args.spec, random_ckpt), root / "random-build")
        gen_spec = bench_spec(args.spec, random_ckpt, eos=False)
        r1 = section_vs_transformers(gen_spec, random_ckpt, plans, run, ids, n, args.runs)
        r2 = section_mtp("2. --mtp vs plain, random weights", gen_spec, plans, run, ids, n, args.runs)
        del plans, run

        plans, run = build_ort(bench_spec(args.spec, agree_ckpt), root / "agree-build")
        agree_spec = bench_spec(args.spec, agree_ckpt, eos=False)
        r3 = section_mtp(
            "3. --mtp vs plain, MTP head agreeing with the model", agree_spec, plans, run, ids, n, args.runs
        )

    print(f"summary (load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    print(
        f"  ORT / transformers tok/s: {r1['whole']:.2f} whole call, {r1['decode']:.2f} decode only "
        f"(target >= 1.5); tokens identical: {bool(r1['identical'])}"
    )
    print(
        f"  mtp / plain, random MTP: {r2['whole']:.2f} whole call, {r2['decode']:.2f} decode only; "
        f"acceptance {r2['acceptance']:.3f}, {r2['tpf']:.2f} tokens/forward"
    )
    print(
        f"  mtp / plain, agreeing MTP: {r3['whole']:.2f} whole call, {r3['decode']:.2f} decode only; "
        f"acceptance {r3['acceptance']:.3f}, {r3['tpf']:.2f} tokens/forward; tokens identical: "
        f"{bool(r3['identical'])}"
    )


if __name__ == "__main__":
    main()
