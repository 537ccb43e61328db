"""The stage plan: placement, coverage, I/O metadata."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from m3export.spec import load_spec, parse_spec
from m3export.split import get_pipeline_stage_metas, plan_subgraphs, stage_layer_ranges

SPECS = Path(__file__).resolve().parents[1] / "specs"


def test_tiny_plan() -> None:
    spec = load_spec(SPECS / "m3-tiny.yaml")
    plans = plan_subgraphs(spec)
    assert [p.name for p in plans] == ["vision", "text_0", "text_1", "mtp"]
    v, t0, t1, mtp = plans
    assert t0.layers == (0, 1) and t1.layers == (2, 3)
    assert t0.modules[0] == "language_model.model.embed_tokens"
    # Layer 0 is full attention (key/value cache), layers 1-3 MSA (plus the index-key cache, §2.3).
    cache0 = ["past.0.key", "past.0.value", "past.1.key", "past.1.value", "past.1.index_key"]
    assert t0.input_names == ["input_ids", "image_features", "video_features", "position_ids", *cache0]
    assert t0.output_names == ["hidden_states.2", *(n.replace("past", "present") for n in cache0)]
    cache1 = [
        "past.2.key",
        "past.2.value",
        "past.2.index_key",
        "past.3.key",
        "past.3.value",
        "past.3.index_key",
    ]
    assert t1.input_names == ["hidden_states.2", "position_ids", *cache1]
    assert t1.output_names == [
        "logits",
        "final_hidden_states",
        *(n.replace("past", "present") for n in cache1),
    ]
    assert t1.modules[-2:] == ("language_model.model.norm", "language_model.lm_head")
    mtp_cache = ["past.mtp.0.key", "past.mtp.0.value", "past.mtp.0.index_key"]
    assert mtp.input_names == ["final_hidden_states", "mtp_input_ids", "position_ids", *mtp_cache]
    assert mtp.output_names == ["mtp_logits.0", *(n.replace("past", "present") for n in mtp_cache)]
    key, index_key = t1.inputs[2], t1.inputs[4]
    assert key.dims == ("batch", 2, "past_seq", 32) and index_key.dims == ("batch", "past_seq", 32)
    assert t1.outputs[2].dims == ("batch", 2, "past_seq+seq", 32)
    assert dict(mtp.shared_uses) == {
        "language_model.model.embed_tokens": "text_0",
        "language_model.lm_head": "text_1",
    }
    assert v.outputs[0].dims == ("image_tokens", 128)


@pytest.mark.parametrize(
    ("layers", "stages", "expect"),
    [(4, 3, [(0, 2), (2, 3), (3, 4)]), (60, 4, [(0, 15), (15, 30), (30, 45), (45, 60)]), (5, 1, [(0, 5)])],
)
def test_even_split_remainder_first(layers: int, stages: int, expect: list[tuple[int, int]]) -> None:
    data = yaml.safe_load((SPECS / "m3-full.yaml").read_text())
    data["text"]["num_hidden_layers"] = layers
    for key in ("moe_layer_freq",):
        data["text"][key] = data["text"][key][:layers]
    sa = data["text"]["sparse_attention_config"]
    for key in ("sparse_attention_freq", "sparse_disable_index_value"):
        sa[key] = sa[key][:layers]
    data["pipeline"] = {"num_text_stages": stages}
    assert stage_layer_ranges(parse_spec(data)) == expect


def test_explicit_ranges_and_text_only() -> None:
    data = yaml.safe_load((SPECS / "m3-tiny.yaml").read_text())
    del data["vision"], data["multimodal"]
    data["pipeline"] = {"layer_ranges": [[0, 1], [1, 4]]}
    data["text"]["num_mtp_modules"] = 0
    plans = plan_subgraphs(parse_spec(data))
    assert [p.name for p in plans] == ["text_0", "text_1"]
    assert plans[0].modules == ("model.embed_tokens", "model.layers.0")
    assert plans[1].output_names[0] == "logits" and "final_hidden_states" not in plans[1].output_names


def test_stage_metas() -> None:
    spec = load_spec(SPECS / "m3-tiny.yaml")
    ins, outs = get_pipeline_stage_metas(spec, is_first=True, is_last=False, microbatch_size=2, seq_len=64)
    assert [(s.name, s.dtype, s.dims) for s in ins] == [("input_ids", "int64", (2, 64))]
    assert [(s.name, s.dims) for s in outs] == [("hidden_states", (2, 64, 128))]
    ins, outs = get_pipeline_stage_metas(spec, is_first=False, is_last=True, microbatch_size=1, seq_len=8)
    assert [(s.name, s.dims) for s in ins] == [("hidden_states", (1, 8, 128))]
    assert [(s.name, s.dims) for s in outs] == [("logits", (1, 8, 1024))]


@pytest.mark.parametrize("stages", [3, 4])
def test_middle_stages_have_distinct_boundary_names(stages: int) -> None:
    """A middle stage takes and emits the residual stream: one name per boundary (`hidden_states.{layer}`,
    the stream entering that layer), so no graph holds an input and an output of the same name."""
    data = yaml.safe_load((SPECS / "m3-tiny.yaml").read_text())
    data["pipeline"] = {"num_text_stages": stages}
    plans = [p for p in plan_subgraphs(parse_spec(data)) if p.kind == "text"]
    assert len(plans) == stages
    for prev, nxt in itertools.pairwise(plans):
        boundary = f"hidden_states.{nxt.layers[0]}"
        assert prev.output_names[0] == boundary and nxt.input_names[0] == boundary
    for p in plans:
        assert not set(p.input_names) & set(p.output_names)
