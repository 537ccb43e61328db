"""`m3export plan`: figures from the spec alone, checked against counts written out from
m3-architecture.md §6.1's key table (m3-full) and against the built model's tensors (m3-tiny)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clihelp import run_cli

from m3export.build.export_step import owned_modules
from m3export.model.vl import M3ForConditionalGeneration
from m3export.spec import M3Spec, load_spec
from m3export.split.plan import plan_subgraphs

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "specs" / "m3-full.yaml"
GB256 = 256 * 10**9  # a 256 GB host


def _full_count_from_key_table() -> tuple[int, int]:
    """(text parameters, total parameters) of the released checkpoint: §6.1's shapes, summed by hand."""
    h, v = 6144, 200064
    attn = 8192 * h + 2 * 512 * h + h * 8192 + 2 * 128  # q, k, v, o, q_norm, k_norm
    index = 512 * h + 128 * h + 2 * 128  # index_q, index_k, their norms
    dense_mlp = 2 * 12288 * h + h * 12288
    experts = 128 * (2 * 3072 * h + h * 3072)
    moe = 128 * h + 128 + experts + 2 * 3072 * h + h * 3072  # router, bias, experts, shared expert
    norms = 2 * h
    layers = 3 * (norms + attn + dense_mlp) + 57 * (norms + attn + index + moe)
    text = 2 * v * h + h + layers  # embed_tokens, lm_head, final norm
    vh = 1280
    vit = vh * 3 * 2 * 14 * 14 + 2 * vh  # patch embedding (no bias), pre_layrnorm
    vit += 32 * (4 * vh + 4 * (vh * vh + vh) + (5120 * vh + 5120) + (vh * 5120 + vh))
    projector = (h * vh + h) + (h * h + h)
    merger = (h * 24576 + h) + (h * h + h)
    return text, text + vit + projector + merger


def test_full_plan_counts_the_released_checkpoint(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["plan", str(FULL), "--json"], capsys)
    assert code == 0, err
    figures = json.loads(out)
    text, total = _full_count_from_key_table()
    assert figures["total_parameters"] == total
    assert round(total / 1e9, 1) == 427.0 and round(text / 1e9, 1) == 426.2  # §8's figures
    subs = {s["name"]: s for s in figures["subgraphs"]}
    assert list(subs) == ["vision", *(f"text_{i}" for i in range(6))]
    # Every weight once on disk: the subgraphs' own bytes add up to the model's (bf16, router fp32).
    assert sum(s["disk_bytes"] for s in subs.values()) == figures["weight_bytes"]
    router_fp32 = 57 * (128 * 6144 + 128) * 2  # 2 extra bytes per fp32 parameter
    assert figures["weight_bytes"] == 2 * total + router_fp32
    # One stage at a time fits a 256 GB host; the whole model (~854 GB) would not.
    assert figures["peak_memory_bytes"] == max(s["peak_memory_bytes"] for s in subs.values())
    assert figures["peak_memory_bytes"] <= GB256 < figures["weight_bytes"]
    assert figures["whole_model_steps"] is False


def test_full_plan_runs_in_seconds_and_prints_the_table() -> None:
    import time

    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "m3export", "plan", str(FULL)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - start < 60
    lines = done.stdout.splitlines()
    assert any(line.startswith("text_5 ") and "layers 50-59" in line for line in lines)
    assert "427.04B parameters" in done.stdout and "peak memory" in done.stdout


def test_tiny_plan_matches_the_built_model(tiny_spec: M3Spec, capsys: pytest.CaptureFixture[str]) -> None:
    """Per subgraph, the plan's parameter count and bytes equal the tensors of the modules the
    subgraph uses in the model itself (built on the meta device)."""
    model = M3ForConditionalGeneration.from_config(tiny_spec, device="meta")
    code, out, err = run_cli(["plan", str(ROOT / "specs" / "m3-tiny.yaml"), "--json"], capsys)
    assert code == 0, err
    figures = {s["name"]: s for s in json.loads(out)["subgraphs"]}
    for plan in plan_subgraphs(tiny_spec):
        tensors = [
            t
            for m in owned_modules(plan)
            for t in [*model.get_submodule(m).parameters(), *model.get_submodule(m).buffers()]
            if t.is_floating_point() and t.dtype == torch.float32 and t.ndim > 0
        ]
        persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
        tensors = [t for t in tensors if id(t) in persistent]
        assert figures[plan.name]["parameters"] == sum(t.numel() for t in tensors), plan.name
        assert figures[plan.name]["weight_bytes"] == sum(t.numel() * 4 for t in tensors), plan.name


def test_plan_of_a_bad_spec_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(FULL.read_text().replace("num_text_stages: 6", "num_text_stages: 0"))
    code, _, err = run_cli(["plan", str(bad)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert load_spec(FULL).pipeline.num_text_stages == 6
