"""MSA prefill and decode cost of the exported graphs: dense keep mask vs gathered blocks (issue #15).

The text_1 subgraph of text-only m3-tiny (layers 2-3: MSA + MoE, the final norm and lm_head; blocks of
8, top-2, so MSA drops blocks past 16 tokens) is exported twice from the same weights: with the
model's MSA (`gathered_block_attention`: the selected blocks gathered slot by slot) and with the
dense formulation it replaced (`masked_msa_attention`: a boolean keep mask over every key, then
SDPA). Each measurement runs in a child process (ONNX Runtime CPU, 2 threads, m3export's session
options), so its peak RSS (`ru_maxrss`) is its own:

- prefill of S tokens (batch 1, empty cache), in one call and as chunked prefill: median seconds
  and peak RSS;
- decode of one token at past P (batch 1, a random cache of P positions): median ms per token.

Both graphs are checked to agree on the measured inputs (max |logits diff| printed). The
`max_position_embeddings` of the spec is raised to cover the longest length; nothing else changes.

    .venv/bin/python bench/msa_bench.py [--prefill 1024,4096,16384,65536] [--decode 1024,16384,65536,262144]

One-call prefills are measured up to --dense-max / --whole-max tokens (the dense graph needed 3.5 GB
at 4k); every length also runs as chunked prefill (--chunk tokens per call, through the cache).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SPECS = Path(__file__).resolve().parents[1] / "specs"

CHILD = r"""
import json, resource, statistics, sys, time
from pathlib import Path
import numpy as np
from m3export.runners.ort_runner import OrtRunner
path, mode, n, hidden, groups, dim, index_dim, runs = sys.argv[1:9]
n, hidden, groups, dim, index_dim, runs = int(n), int(hidden), int(groups), int(dim), int(index_dim), int(runs)
runner = OrtRunner(Path(path), num_threads=2)
rng = np.random.default_rng(0)
names = runner.input_names
seq, past = (n, 0) if mode == "prefill" else (1, n)
feed = {}
for name in names:
    if name == "position_ids":
        feed[name] = np.arange(past, past + seq, dtype=np.int64)[None]
    elif name.endswith(".index_key"):
        feed[name] = rng.standard_normal((1, past, index_dim)).astype(np.float32)
    elif name.startswith("past."):
        feed[name] = rng.standard_normal((1, groups, past, dim)).astype(np.float32)
    else:
        feed[name] = rng.standard_normal((1, seq, hidden)).astype(np.float32)
chunk = int(sys.argv[10])


def call():
    if mode != "prefill" or not chunk:
        return runner.infer(feed)
    # Chunked prefill through the cache: each chunk's presents are the next chunk's pasts.
    state = {k: v[:, :, :0] if k.startswith("past.") and not k.endswith("index_key") else v
             for k, v in feed.items()}
    state = {k: (v[:, :0] if k.endswith("index_key") else v) for k, v in state.items()}
    for a in range(0, seq, chunk):
        step = dict(state)
        name = next(k for k in feed if k not in ("position_ids",) and not k.startswith("past."))
        step[name] = feed[name][:, a : a + chunk]
        step["position_ids"] = feed["position_ids"][:, a : a + chunk]
        out = runner.infer(step)
        state.update({k.replace("present.", "past.", 1): v for k, v in out.items() if k.startswith("present.")})
    return out


out = call()  # warm-up
times = []
for _ in range(runs):
    t0 = time.perf_counter()
    out = call()
    times.append(time.perf_counter() - t0)
np.save(sys.argv[9], out["logits"][:, -4:])
print(json.dumps({"s": statistics.median(times), "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def export_text_1(spec, out: Path, dense: bool) -> Path:  # type: ignore[no-untyped-def]
    from unittest import mock

    from m3export.build.export_step import export_plan
    from m3export.model.attention import M3Attention, masked_msa_attention
    from m3export.model.factory import load_model
    from m3export.ops.lowering import lowering_for
    from m3export.split.plan import plan_subgraphs
    from m3export.split.subgraphs import build_stage

    plan = next(p for p in plan_subgraphs(spec) if p.name == "text_1")
    model = load_model(spec).eval()
    path = out / ("dense" if dense else "gathered") / "text_1.onnx"
    path.parent.mkdir(parents=True)
    patch = (
        mock.patch.object(M3Attention, "msa_attention", masked_msa_attention) if dense else mock.MagicMock()
    )
    with patch:
        export_plan(build_stage(model, plan), plan, spec, lowering_for(spec), path)
    return path


def measure(
    path: Path, mode: str, n: int, spec, runs: int, tmp: Path, chunk: int = 0
) -> tuple[float, int, Path]:  # type: ignore[no-untyped-def]
    t = spec.text
    sa = t.sparse_attention_config
    logits = tmp / f"{path.parent.name}-{mode}-{n}-{chunk}.npy"
    args = [str(path), mode, str(n), str(t.hidden_size), str(t.num_key_value_heads), str(t.head_dim)]
    args += [str(sa.sparse_index_dim), str(runs), str(logits), str(chunk)]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{path.parent.name} {mode} {n}: child failed: {proc.stderr[-2000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return got["s"], got["rss"], logits


def main() -> None:
    import numpy as np

    from m3export.spec import M3Spec, load_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill", default="1024,4096,16384,65536")
    ap.add_argument("--decode", default="1024,16384,65536,262144")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1024, help="chunked-prefill chunk (tokens per call)")
    ap.add_argument("--dense-max", type=int, default=4096, help="longest one-call prefill of the dense graph")
    ap.add_argument(
        "--whole-max", type=int, default=8192, help="longest one-call prefill of the gathered graph"
    )
    args = ap.parse_args()
    prefill = [int(x) for x in args.prefill.split(",") if x]
    decode = [int(x) for x in args.decode.split(",") if x]
    data = load_spec(SPECS / "m3-tiny.yaml").model_dump(mode="json")
    for key in ("vision", "multimodal", "tolerances"):
        data.pop(key, None)
    data["text"]["max_position_embeddings"] = max([*prefill, *decode]) + 1
    spec = M3Spec.model_validate(data)
    with tempfile.TemporaryDirectory(prefix="m3export-msa-") as tmp_name:
        tmp = Path(tmp_name)
        graphs = {kind: export_text_1(spec, tmp, kind == "dense") for kind in ("dense", "gathered")}
        print("m3-tiny text_1 (2 MSA + MoE layers, blocks of 8, top-2), ORT CPU, 2 threads, batch 1")
        print(
            f"{'prefill S':>10} {'dense (one call)':>22} {'gathered (one call)':>22} "
            f"{f'gathered, chunks of {args.chunk}':>26} {'dense/gathered time':>20} {'max |diff|':>10}"
        )

        def cell(r: tuple[float, int, Path] | None) -> str:
            return f"{'-':>22}" if r is None else f"{r[0]:9.3f} s {r[1] / 2**20:7.0f} MiB"

        for n in prefill:
            dense = (
                measure(graphs["dense"], "prefill", n, spec, args.runs, tmp) if n <= args.dense_max else None
            )
            whole = (
                measure(graphs["gathered"], "prefill", n, spec, args.runs, tmp)
                if n <= args.whole_max
                else None
            )
            chunked = measure(graphs["gathered"], "prefill", n, spec, args.runs, tmp, args.chunk)
            ref = dense or whole
            diff = (
                f"{float(np.abs(np.load(ref[2]) - np.load(chunked[2])).max()):10.2g}" if ref else f"{'-':>10}"
            )
            ratio = f"{dense[0] / whole[0]:20.2f}" if dense and whole else f"{'-':>20}"
            print(f"{n:>10} {cell(dense)} {cell(whole)} {cell(chunked):>26} {ratio} {diff}")
        print(f"{'decode P':>10} {'dense ms':>9} {'gathered ms':>12} {'time x':>7} {'max |diff|':>10}")
        base = None
        for n in decode:
            (ds, _, dl), (gs, _, gl) = (
                measure(graphs[k], "decode", n, spec, args.runs * 4, tmp) for k in graphs
            )
            diff = float(np.abs(np.load(dl) - np.load(gl)).max())
            base = base or (ds, gs)
            print(
                f"{n:>10} {ds * 1e3:9.2f} {gs * 1e3:12.2f} {ds / gs:7.2f} {diff:10.2g}   "
                f"(vs P={decode[0]}: dense {ds / base[0]:.1f}x, gathered {gs / base[1]:.1f}x)"
            )


if __name__ == "__main__":
    main()
