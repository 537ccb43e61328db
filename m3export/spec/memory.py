"""Estimate the memory a command needs from the spec before allocating anything, and refuse with one
line when the machine does not have it (issue #11 item 14): an allocation the kernel cannot satisfy
ends in the OOM killer or an allocator traceback, never in a useful message.

The estimates are upper-bound style formulas of the current implementation (weights from
`spec.size`, activations of the largest per-layer temporaries); bench/README.md compares them with
measured peaks. "Available" is the smaller of the kernel's MemAvailable and the cgroup's headroom.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from m3export.errors import ResourceError
from m3export.spec.models import M3Spec
from m3export.spec.size import DTYPE_BYTES, weight_bytes

GiB = 1 << 30
RUNTIME_OVERHEAD = 1 * GiB  # torch + onnxruntime + Python, measured ~0.6 GiB on the tiny build


def available_memory() -> int:
    """Bytes this process can still allocate: min(MemAvailable, cgroup memory.max - memory.current,
    the M3EXPORT_MAX_MEMORY budget when set)."""
    budget = memory_budget()
    avail = math.inf if budget is None else float(budget)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = min(avail, int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cg = Path("/sys/fs/cgroup")
    try:
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int((cg / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return int(avail) if math.isfinite(avail) else 1 << 62


def activation_bytes(spec: M3Spec, seq: int, batch: int = 1, past: int = 0) -> int:
    """Peak temporaries of one forward over `seq` new tokens after `past` cached ones: the dense
    attention of one layer ([B, H, S, P+S] scores and keep mask, [B, G, S, P+S] index scores, repeated
    K/V), the MoE of one layer, the residual stream and the logits (eager and runtime copies)."""
    t = spec.text
    keys = past + seq
    b = DTYPE_BYTES[spec.graph_dtype]
    heads, groups = t.num_attention_heads, t.num_key_value_heads
    attention = (
        batch * seq * keys * (heads * (4 + 1) + groups * 8) + batch * heads * keys * t.head_dim * 2 * b
    )
    tokens = batch * seq
    moe = tokens * t.num_experts_per_tok * 2 * t.intermediate_size * 4 * 2 + tokens * t.hidden_size * 16
    stream = tokens * t.hidden_size * 4 * 10
    logits = tokens * t.vocab_size * 4 * 2
    return attention + moe + stream + logits


def cache_bytes(spec: M3Spec, length: int, batch: int = 1) -> int:
    """The KV cache (keys, values, index keys) of every text layer and MTP depth for `length` positions."""
    t = spec.text
    per = 2 * t.num_key_value_heads * t.head_dim
    if t.sparse_attention_config is not None:
        per += t.sparse_attention_config.sparse_index_dim
    layers = t.num_hidden_layers + t.num_mtp_modules
    return batch * length * per * layers * DTYPE_BYTES[spec.graph_dtype]


def resident_memory_bytes(spec: M3Spec, seq: int, batch: int = 1) -> int:
    """`model forward`, `run`, `generate`, `check`: the weights resident once (the eager model, or every
    subgraph's session) plus one prompt's activations and its cache."""
    return (
        weight_bytes(spec)
        + activation_bytes(spec, seq, batch)
        + cache_bytes(spec, seq, batch)
        + RUNTIME_OVERHEAD
    )


# A subgraph's pass holds its weights once in torch (the exporter folds lowering transforms lazily,
# one tensor at a time), then once in ONNX Runtime (memory-mapped) after they are released: measured
# peak 1.28x of the largest subgraph's weight bytes on the real-width bench (bench/README.md,
# stream_bench.py), so 1.35x with headroom.
STAGE_FACTOR = 1.35
# The whole-model steps hold the eager model, every ORT session and transformers' copy at once.
WHOLE_MODEL_FACTOR = 3.0


def stage_memory_bytes(spec: M3Spec, modules: Sequence[str]) -> int:
    """One subgraph's pass of `build`: its weights (owned + shared ones it uses) and the golden cases'
    activations (batch 2, seq 40), plus the runtime's own footprint."""
    return int(STAGE_FACTOR * weight_bytes(spec, modules)) + activation_bytes(spec, 40, 2) + RUNTIME_OVERHEAD


def whole_model_bytes(spec: M3Spec) -> int:
    """The whole-model steps of `build` (split vs the full model, generate, the transformers oracle)."""
    total = weight_bytes(spec)
    return (
        int(WHOLE_MODEL_FACTOR * total)
        + activation_bytes(spec, 40, 2)
        + cache_bytes(spec, 40, 2)
        + RUNTIME_OVERHEAD
    )


def budget_bytes(spec: M3Spec) -> int:
    """The memory a build may use: the spec's `pipeline.memory_budget_gib`, else what is available."""
    given = spec.pipeline.memory_budget_gib
    have = available_memory()
    return have if given is None else min(have, int(given * GiB))


def require_memory(need: int, what: str, have: int | None = None) -> None:
    """ResourceError (one line, exit 2) when `need` bytes exceed what this machine has available (or
    `have`, a smaller budget)."""
    have = available_memory() if have is None else have
    if need > have:
        raise ResourceError(
            f"{what} needs about {need / GiB:.1f} GiB of memory; {have / GiB:.1f} GiB are available "
            "(estimated from the spec before allocating; use a smaller spec or prompt, or a larger machine)"
        )


def memory_budget() -> int | None:
    """M3EXPORT_MAX_MEMORY (bytes, or e.g. '8GiB'): a budget below the machine's, for CI and shared hosts."""
    raw = os.environ.get("M3EXPORT_MAX_MEMORY")
    if not raw:
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = raw.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise ResourceError(f"M3EXPORT_MAX_MEMORY={raw!r}: give bytes or a size like '8GiB'") from None
