"""Peak memory of a build against the largest subgraph's weights (issue #13), measured in one run.

Two checkpoints are generated (in a child process, so that their generation does not count) and each
is built in its own child process whose peak RSS (`ru_maxrss`) is read back:

  multi     8 layers, 4 text stages, hidden 1024, vocabulary 32k, 16 experts of width 1024 (bf16 on
            disk, fp32 in the build): total weights >= 3x the largest subgraph;
  realwidth the real m3-full widths (hidden 6144, 64 heads / 4 KV heads of 128, expert width 3072,
            vocabulary 200064) with 2 layers (1 dense, 1 MoE with 4 experts), 2 text stages, no vision
            (--with-realwidth; about 25 GB of disk for the checkpoint and the artifacts).

Printed per checkpoint: unique weight bytes, the largest subgraph's bytes, peak RSS, the ratio
peak / largest, the target 1.5 x largest + 1 GiB, build seconds and artifact bytes / unique bytes.

    python bench/stream_bench.py [--with-realwidth [--skip-multi]] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m3export.spec import dump_spec, load_spec, parse_spec  # noqa: E402
from m3export.spec.size import weight_bytes  # noqa: E402
from m3export.split.plan import plan_subgraphs  # noqa: E402

GiB = 1 << 30


def _spec(kind: str, ckpt: Path) -> dict:
    base = dump_spec(load_spec(ROOT / "specs" / "m3-tiny.yaml"))
    base.pop("vision")
    base.pop("multimodal")
    t = base["text"]
    sa = t["sparse_attention_config"]
    if kind == "multi":
        layers = 8
        t.update(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128, rotary_dim=64)
        t.update(vocab_size=32768, num_local_experts=16, num_experts_per_tok=2, intermediate_size=1024)
        t.update(shared_intermediate_size=1024, dense_intermediate_size=2048, num_mtp_modules=1)
        sa.update(sparse_index_dim=128, sparse_num_index_heads=2)
        stages = 4
    else:
        layers = 2
        t.update(hidden_size=6144, num_attention_heads=64, num_key_value_heads=4, head_dim=128, rotary_dim=64)
        t.update(vocab_size=200064, num_local_experts=4, num_experts_per_tok=2, intermediate_size=3072)
        t.update(shared_intermediate_size=3072, dense_intermediate_size=12288, num_mtp_modules=0)
        sa.update(sparse_index_dim=128, sparse_num_index_heads=4)
        stages = 2
    t.update(num_hidden_layers=layers, moe_layer_freq=[0] + [1] * (layers - 1))
    sa.update(
        sparse_attention_freq=[0] + [1] * (layers - 1), sparse_disable_index_value=[0] + [1] * (layers - 1)
    )
    # The budget admits one subgraph at a time, not the whole model: what a real-scale build gets.
    budget = 4.0 if kind == "multi" else 20.0
    base.update(name=f"stream-{kind}", pipeline={"num_text_stages": stages, "memory_budget_gib": budget})
    base["weights"] = {"checkpoint": str(ckpt)}
    base.pop("tolerances")  # the dtype defaults
    return base


GENERATE = """
# A bf16 HF-layout checkpoint written shard by shard from random tensors: never the whole model in
# memory (the real-width model in fp32 is ~12 GB, and save_checkpoint holds it whole).
import sys, json, torch
from safetensors.torch import save_file
from m3export.spec import parse_spec, to_hf_config
from m3export.model.text import M3ForCausalLM
from m3export.model.hf_keys import native_to_hf, keeps_fp32
data = json.loads(sys.argv[1]); data["weights"] = {"random": {"seed": 0}}
spec = parse_spec(data)
meta = M3ForCausalLM.from_config(spec, device="meta")
hf = native_to_hf(dict(meta.state_dict()))
g = torch.Generator().manual_seed(0)
out = __import__("pathlib").Path(sys.argv[2]); out.mkdir(parents=True)
shards, cur, size = [], {}, 0
def flush():
    global cur, size
    if cur:
        name = f"part-{len(shards)}"
        save_file(cur, out / name, metadata={"format": "pt"}); shards.append((name, list(cur))); cur, size = {}, 0
for key, t in hf.items():
    v = torch.randn(tuple(t.shape), generator=g) * 0.02
    cur[key] = v if keeps_fp32(key) else v.to(torch.bfloat16)
    size += cur[key].numel() * cur[key].element_size()
    del v
    if size > 2 << 30: flush()
flush()
weight_map = {}
for i, (name, keys) in enumerate(shards):
    final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    (out / name).rename(out / final); weight_map.update({k: final for k in keys})
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
cfg = to_hf_config(spec); cfg["torch_dtype"] = "bfloat16"
(out / "config.json").write_text(json.dumps(cfg))
"""

BUILD = """
import sys, json, resource, time
from m3export.build import build
from m3export.spec import parse_spec
t0 = time.perf_counter()
res = build(parse_spec(json.loads(sys.argv[1])), sys.argv[2], progress=lambda m: print(m, flush=True))
print(json.dumps({"passed": res.passed, "seconds": time.perf_counter() - t0,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(kind: str, tmp: Path) -> None:
    ckpt = tmp / f"{kind}-ckpt"
    data = _spec(kind, ckpt)
    spec = parse_spec(data)
    subprocess.run([sys.executable, "-c", GENERATE, json.dumps(data), str(ckpt)], check=True, cwd=ROOT)
    total = weight_bytes(spec)
    largest = max(
        weight_bytes(spec, [*p.modules, *(m for m, _ in p.shared_uses)]) for p in plan_subgraphs(spec)
    )
    out = tmp / f"{kind}-out"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", BUILD, json.dumps(data), str(out)], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    target = 1.5 * largest + GiB
    print(
        f"{kind}: {spec.text.num_hidden_layers} layers, {len(plan_subgraphs(spec))} subgraphs, build {'pass' if res['passed'] else 'FAIL'}"
    )
    print(
        f"  unique weights {total / GiB:.2f} GiB (fp32 in memory), largest subgraph {largest / GiB:.2f} GiB ({total / largest:.1f}x)"
    )
    print(
        f"  peak RSS {res['maxrss'] / GiB:.2f} GiB = {res['maxrss'] / largest:.2f} x largest subgraph; target 1.5 x + 1 GiB = {target / GiB:.2f} GiB -> ratio {res['maxrss'] / target:.2f} (<= 1.0)"
    )
    print(
        f"  build {res['seconds']:.1f} s (wall {time.perf_counter() - t0:.1f} s); artifacts {_du(out) / GiB:.2f} GiB = {_du(out) / total:.2f} x unique weights (target <= 1.05)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--with-realwidth", action="store_true")
    ap.add_argument("--skip-multi", action="store_true", help="only the real-width checkpoint")
    ap.add_argument("--keep", type=Path, help="keep checkpoints and artifacts here")
    args = ap.parse_args()
    kinds = ([] if args.skip_multi else ["multi"]) + (["realwidth"] if args.with_realwidth else [])
    with tempfile.TemporaryDirectory(prefix="m3x-stream-", dir=args.keep) as tmp:
        for kind in kinds:
            bench(kind, Path(tmp))
    print(f"bench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
