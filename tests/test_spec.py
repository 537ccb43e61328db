"""Spec loading and validation: shipped specs, malformed specs, HF config round trip, CLI exit codes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from clihelp import run_cli

from m3export.errors import SpecError
from m3export.spec import M3Spec, dump_spec, from_hf_config, load_spec, parse_spec, spec_hash, to_hf_config

SPECS = Path(__file__).resolve().parents[1] / "specs"


def tiny() -> dict[str, Any]:
    return yaml.safe_load((SPECS / "m3-tiny.yaml").read_text())


@pytest.mark.parametrize("name", ["m3-tiny", "m3-small", "m3-full"])
def test_shipped_specs_validate(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["spec", "validate", str(SPECS / f"{name}.yaml")], capsys)
    assert code == 0, err
    assert "ok" in out


def test_full_spec_has_real_dims() -> None:
    s = load_spec(SPECS / "m3-full.yaml")
    t = s.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (
        6144,
        60,
        64,
        4,
    )
    assert (t.vocab_size, t.num_local_experts, t.num_experts_per_tok) == (200064, 128, 4)
    assert [t.is_moe_layer(i) for i in range(4)] == [False, False, False, True]
    assert [t.is_sparse_layer(i) for i in range(4)] == [False, False, False, True]
    assert t.sparse_attention_config is not None and t.sparse_attention_config.sparse_topk_blocks == 16
    assert s.vision is not None and s.vision.head_dim == 80 and s.vision.patch_dim == 1176


def _set(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    *parents, leaf = path.split(".")
    cur = d
    for p in parents:
        cur = cur[p]
    if value is _DELETE:
        del cur[leaf]
    else:
        cur[leaf] = value
    return d


class _Deleted:
    def __repr__(self) -> str:  # a stable test id (pytest-xdist workers must collect the same ids)
        return "<deleted>"


_DELETE = _Deleted()

# (mutation path, value, text that must appear in the one-line error)
MALFORMED = [
    ("text.num_experts_per_tok", 9, "num_experts_per_tok"),
    ("text.num_key_value_heads", 3, "num_key_value_heads"),
    ("text.rotary_dim", 15, "rotary_dim"),
    ("text.rotary_dim", 64, "rotary_dim"),
    ("text.moe_layer_freq", [0, 1, 1], "moe_layer_freq"),
    ("text.moe_layer_freq", [0, 1, 2, 1], "moe_layer_freq"),
    ("text.sparse_attention_config.sparse_num_index_heads", 4, "sparse_num_index_heads"),
    ("text.sparse_attention_config.sparse_attention_freq", [0, 1, 1], "sparse_attention_freq"),
    ("text.sparse_attention_config.sparse_disable_index_value", [0, 0, 1, 1], "sparse_disable_index_value"),
    ("text.sparse_attention_config.sparse_score_type", "lse", "sparse_score_type"),
    ("text.eos_token_id", 5000, "eos_token_id"),
    ("multimodal.image_token_index", 1024, "image_token_index"),
    ("text.hidden_size", -1, "hidden_size"),
    ("text.hidden_size", "big", "hidden_size"),
    ("text.num_hidden_layerz", 4, "num_hidden_layerz"),
    ("dtype", "float8", "dtype"),
    ("weights", {"random": {"seed": 0}, "checkpoint": "model/x"}, "exactly one"),
    ("weights", {}, "exactly one"),
    ("text.hidden_act", "gelu", "hidden_act"),
    ("vision.num_attention_heads", 3, "num_attention_heads"),
    ("pipeline.layer_ranges", [[0, 2], [3, 4]], "layer_ranges"),
    ("pipeline.num_text_stages", 5, "num_text_stages"),
    ("text.vocab_size", _DELETE, "vocab_size"),
    ("name", "bad name/with slash", "name"),
]


@pytest.mark.parametrize(
    ("path", "value", "needle"), MALFORMED, ids=[f"{p}={v!r}"[:60] for p, v, _ in MALFORMED]
)
def test_malformed_spec_exits_2_naming_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str, value: Any, needle: str
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(_set(tiny(), path, value)))
    code, _out, err = run_cli(["spec", "validate", str(f)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("text: [unclosed", "malformed YAML"),
        ("- just\n- a list\n", "mapping"),
        ("", "mapping"),
        ("name: x\ntext: {hidden_size: 1}\n  bad indent: [", "malformed YAML"),
    ],
)
def test_malformed_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, needle: str
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    code, _, err = run_cli(["spec", "validate", str(f)], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_missing_and_binary_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["spec", "validate", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "not found" in err
    f = tmp_path / "bin.yaml"
    f.write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run_cli(["spec", "validate", str(f)], capsys)
    assert code == 2 and "UTF-8" in err


def test_spec_is_frozen_and_hash_is_stable() -> None:
    s = parse_spec(tiny())
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen assignment
        s.name = "other"  # type: ignore[misc]
    assert spec_hash(s) == spec_hash(parse_spec(dump_spec(s)))
    assert spec_hash(s) != spec_hash(parse_spec(_set(tiny(), "text.rope_theta", 5e6)))


def test_schema_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["spec", "schema"], capsys)
    assert code == 0
    schema = json.loads(out)
    assert "text" in schema["properties"] and "TextSpec" in schema["$defs"]


def test_hf_config_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = parse_spec(tiny())
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(s)))
    back = from_hf_config(tmp_path, name="m3-tiny")
    assert back.text == s.text.model_copy(update={"num_mtp_modules": 0})  # no mtp tensors on disk
    assert back.vision == s.vision and back.multimodal == s.multimodal
    out = tmp_path / "spec.yaml"
    code, _, err = run_cli(["spec", "from-hf", str(tmp_path), "-o", str(out), "--name", "m3-tiny"], capsys)
    assert code == 0, err
    assert load_spec(out).text == back.text


def test_from_hf_reads_release_style_config(tmp_path: Path) -> None:
    """The released config: legacy nested sparse config, swigluoai, 7 declared MTP modules, no mtp tensors."""
    full = load_spec(SPECS / "m3-full.yaml")
    cfg = to_hf_config(full)
    tc = cfg["text_config"]
    for k in ("rope_parameters", "layer_types", "mlp_layer_types", "partial_rotary_factor"):
        tc.pop(k)
    tc["num_mtp_modules"] = 7
    cfg["vision_config"]["model_type"] = "clip_vision_model"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = from_hf_config(tmp_path)
    assert s.text.num_mtp_modules == 0
    assert s.text == full.text
    assert isinstance(s, M3Spec)


def test_from_hf_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["spec", "from-hf", str(tmp_path)], capsys)
    assert code == 2 and "config.json" in err
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        from_hf_config(tmp_path)


def test_from_hf_reads_transformers_saved_config(tmp_path: Path) -> None:
    """transformers' save_pretrained writes the flattened index_* fields and layer_types, not
    sparse_attention_config: MSA must survive the round trip (else the model silently runs dense)."""
    from transformers.models.minimax_m3_vl import MiniMaxM3VLConfig

    s = parse_spec(tiny())
    MiniMaxM3VLConfig(**to_hf_config(s)).save_pretrained(tmp_path)
    back = from_hf_config(tmp_path, name="m3-tiny")
    assert back.text.sparse_attention_config == s.text.sparse_attention_config
    assert back.text == s.text.model_copy(update={"num_mtp_modules": 0})
