"""Loading specs from YAML, canonical dumps and hashes, and mapping to/from HF `config.json`."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from m3export.errors import SpecError
from m3export.spec.models import M3Spec

_MAX_SPEC_BYTES = 1 << 20


def _loc_part(p: object) -> str:
    s = str(p)
    return s if s.replace("_", "").replace("-", "").isalnum() else repr(s)


def _one_line(msg: str) -> str:
    return msg.replace("\r", "\\r").replace("\n", "\\n")


def _format_validation_error(err: ValidationError, source: str) -> str:
    errors = err.errors(include_url=False)
    # An unknown key usually explains the "missing field" errors next to it (a typo): report it first.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(_loc_part(p) for p in first["loc"]) or "<top level>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (not a field of this section)"
    elif first["type"] == "literal_error":
        msg = msg.replace("Input should be", "must be")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return _one_line(f"{source}: {loc}: {msg}{more}")


def parse_spec(data: Any, source: str = "<spec>") -> M3Spec:
    """Validate an already-parsed mapping; raise SpecError naming the offending field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return M3Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err, source)) from None
    except (TypeError, ValueError, RecursionError) as err:  # pathological YAML values
        raise SpecError(_one_line(f"{source}: invalid value: {err or type(err).__name__}")) from None


def load_spec(path: str | Path) -> M3Spec:
    """Read and validate a YAML spec file."""
    p = Path(path)
    try:
        if not p.exists():
            raise SpecError(f"{p}: spec file not found")
        if not p.is_file():  # a directory, FIFO or device: reading it could hang or never end
            raise SpecError(f"{p}: not a regular file")
        if p.stat().st_size > _MAX_SPEC_BYTES:  # before reading: a sparse 8 GiB file is cheap to stat
            raise SpecError(f"{p}: spec file is larger than {_MAX_SPEC_BYTES} bytes")
        with p.open("rb") as f:
            raw = f.read(_MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(f"{p}: cannot read the spec file ({err.strerror})") from None
    if len(raw) > _MAX_SPEC_BYTES:
        raise SpecError(f"{p}: spec file is larger than {_MAX_SPEC_BYTES} bytes")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SpecError(f"{p}: spec file is not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "malformed YAML"
        raise SpecError(f"{p}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise SpecError(f"{p}: YAML nests too deeply") from None
    return parse_spec(data, str(p))


def dump_spec(spec: M3Spec) -> dict[str, Any]:
    """Canonical JSON-able form (defaults filled in, paths as strings)."""
    return spec.model_dump(mode="json")


def spec_hash(spec: M3Spec | dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a spec (or of any JSON-able slice of one)."""
    data = dump_spec(spec) if isinstance(spec, M3Spec) else spec
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------
# HF config.json mapping (m3-architecture.md §1)

_TEXT_KEYS = [
    "hidden_size",
    "intermediate_size",
    "dense_intermediate_size",
    "shared_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "use_gemma_norm",
    "attention_output_gate",
    "rope_theta",
    "rotary_dim",
    "hidden_act",
    "use_qk_norm",
    "qk_norm_type",
    "tie_word_embeddings",
    "num_local_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "scoring_func",
    "use_routing_bias",
    "routed_scaling_factor",
    "moe_layer_freq",
    "swiglu_alpha",
    "swiglu_beta",
    "swiglu_limit",
    "sparse_attention_config",
    "num_mtp_modules",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
]
_VISION_KEYS = [
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "patch_size",
    "num_channels",
    "temporal_patch_size",
    "spatial_merge_size",
    "rope_theta",
    "hidden_act",
    "layer_norm_eps",
    "vision_segment_max_frames",
    "image_size",
]
_MM_KEYS = [
    "image_token_index",
    "video_token_index",
    "projector_hidden_size",
    "projector_hidden_act",
    "multimodal_projector_bias",
    "patch_merge_bias",
    "vision_feature_layer",
    "vision_feature_select_strategy",
]


_MAX_LAYERS = 4096


def _typed(cfg: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    """cfg[key] when absent/None or of `types` (bool never counts as a number); SpecError otherwise."""
    value = cfg.get(key)
    if value is None:
        return None
    numeric = types in (int, float, (int, float))
    if (isinstance(value, bool) and numeric) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise SpecError(f"{where}: {key} must be {names}, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _str_list(cfg: dict[str, Any], key: str, where: str) -> list[str] | None:
    value = _typed(cfg, key, list, where)
    if value is not None and not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}: {key} must be a list of strings")
    return value


def _text_from_hf(tc: dict[str, Any], where: str) -> dict[str, Any]:
    out = {k: tc[k] for k in _TEXT_KEYS if k in tc and tc[k] is not None}
    n = _typed(tc, "num_hidden_layers", int, where) or 0
    if not 0 < n <= _MAX_LAYERS:
        raise SpecError(f"{where}: num_hidden_layers must be an integer in [1, {_MAX_LAYERS}], got {n}")
    rope = _typed(tc, "rope_parameters", dict, where) or {}
    if "rope_theta" not in out and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if "rotary_dim" not in out:
        factor = tc.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
        head_dim = _typed(tc, "head_dim", int, where)
        if factor is not None and head_dim is not None:
            if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 1:
                raise SpecError(f"{where}: partial_rotary_factor must be a number in (0, 1], got {factor!r}")
            out["rotary_dim"] = round(head_dim * factor)
    eos = tc.get("eos_token_id")
    if isinstance(eos, list):
        if not eos or not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
            raise SpecError(f"{where}: eos_token_id must be an integer or a non-empty list of integers")
        out["eos_token_id"] = eos[0]
    if out.get("hidden_act") == "silu":  # newer HF port rewrites swigluoai to silu (§1.2)
        out["hidden_act"] = "swigluoai"
    if "moe_layer_freq" not in out:
        mlp_types = _str_list(tc, "mlp_layer_types", where)
        out["moe_layer_freq"] = [1 if t == "sparse" else 0 for t in mlp_types] if mlp_types else [1] * n
    sa = _typed(out, "sparse_attention_config", dict, where)
    layer_types = _str_list(tc, "layer_types", where)
    if sa is None and "index_block_size" in tc and layer_types is not None:
        # The newer HF port (what transformers' save_pretrained writes) flattens the MSA config (§1.3).
        freq = [1 if t == "minimax_m3_sparse" else 0 for t in layer_types]
        sa = out["sparse_attention_config"] = {
            "use_sparse_attention": any(freq),
            "sparse_block_size": tc["index_block_size"],
            "sparse_topk_blocks": tc.get("index_topk_blocks"),
            "sparse_num_index_heads": tc.get("index_n_heads"),
            "sparse_index_dim": tc.get("index_head_dim"),
            "sparse_local_block": tc.get("index_local_blocks", 1),
            "sparse_attention_freq": freq,
            "sparse_disable_index_value": freq,
        }
    if isinstance(sa, dict):
        sa = dict(sa)
        sa.setdefault("sparse_attention_freq", [1] * n)  # Automodel: missing list = all sparse (§1.1)
        freq = _typed(sa, "sparse_attention_freq", list, f"{where} sparse_attention_config")
        sa.setdefault("sparse_disable_index_value", list(freq or []))
        sa.pop("sparse_attention_type", None)
        out["sparse_attention_config"] = sa
    # The BF16 release declares 7 MTP modules but ships none; a spec counts physical depths (§3.4).
    out.pop("num_mtp_modules", None)
    return out


def from_hf_config(config_dir: str | Path, name: str | None = None) -> M3Spec:
    """Build a spec from an HF checkpoint directory's `config.json` (weights: checkpoint DIR).

    MTP depth is taken from the tensors actually present (`*.mtp.layers.{d}.*`), not from the
    declared `num_mtp_modules`, because the BF16 release declares 7 and ships none (§3.4, §10.1).
    """
    d = Path(config_dir)
    cfg_path = d / "config.json"
    cfg = _read_json(cfg_path, "config.json", _MAX_SPEC_BYTES)
    if not isinstance(cfg, dict):
        raise SpecError(f"{cfg_path}: top level must be a JSON object")
    text_cfg = cfg.get("text_config", cfg)
    if not isinstance(text_cfg, dict):
        raise SpecError(f"{cfg_path}: text_config must be a JSON object")
    where = str(cfg_path)
    data: dict[str, Any] = {
        "name": name or (d.resolve().name or "m3"),
        "dtype": "bfloat16"
        if text_cfg.get("torch_dtype", cfg.get("torch_dtype")) == "bfloat16"
        else "float32",
        "text": _text_from_hf(text_cfg, where),
        "weights": {"checkpoint": str(d)},
    }
    data["text"]["num_mtp_modules"] = _count_mtp_depths(d)
    vc = _typed(cfg, "vision_config", dict, where)
    if isinstance(vc, dict):
        vision = {k: vc[k] for k in _VISION_KEYS if k in vc and vc[k] is not None}
        comp = _typed(vc, "img_token_compression_config", dict, f"{where} vision_config") or {}
        for k in ("spatial_merge_size", "temporal_patch_size"):
            if k not in vision and k in comp:
                vision[k] = comp[k]
        rope = _typed(vc, "rope_parameters", dict, f"{where} vision_config") or {}
        if "rope_theta" not in vision and "rope_theta" in rope:
            vision["rope_theta"] = rope["rope_theta"]
        data["vision"] = vision
        mm = {k: cfg[k] for k in _MM_KEYS if k in cfg and cfg[k] is not None}
        mm.setdefault("image_token_index", cfg.get("image_token_id"))
        mm.setdefault("video_token_index", cfg.get("video_token_id"))
        data["multimodal"] = mm
    return parse_spec(data, str(cfg_path))


def _read_json(path: Path, what: str, limit: int) -> Any:
    """A JSON file of at most `limit` bytes; SpecError for a missing, oversized, non-UTF-8, malformed
    or too deeply nested one (never a traceback)."""
    try:
        if not path.is_file():
            raise SpecError(f"{path}: not found (expected an HF checkpoint directory with {what})")
        if path.stat().st_size > limit:
            raise SpecError(f"{path}: larger than {limit} bytes: not a {what}")
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: not valid JSON: {err}") from None
    except RecursionError:
        raise SpecError(f"{path}: JSON nests too deeply") from None
    except OSError as err:
        raise SpecError(f"{path}: unreadable ({err.strerror})") from None


def _count_mtp_depths(d: Path) -> int:

    keys: list[str] = []
    index = d / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index, "model.safetensors.index.json", 256 << 20)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise SpecError(f"{index}: not a valid index (expected JSON with a 'weight_map' object)")
        keys = [k for k in weight_map if isinstance(k, str)]
    else:
        from safetensors import safe_open

        for f in sorted(d.glob("*.safetensors")):
            try:
                with safe_open(f, "np") as fh:
                    keys.extend(fh.keys())
            except Exception:  # unreadable shards are reported by the checkpoint loader
                continue
    depths = {int(m.group(1)) for k in keys if (m := re.search(r"\.mtp\.layers\.(\d+)\.", k))}
    return max(depths) + 1 if depths else 0


def to_hf_config(spec: M3Spec) -> dict[str, Any]:
    """The `config.json` for a checkpoint of this spec, readable by transformers and by `from_hf_config`."""
    t = spec.text
    text = {k: getattr(t, k) for k in _TEXT_KEYS if k != "sparse_attention_config"}
    text.update(
        model_type="minimax_m3_vl_text",
        partial_rotary_factor=t.partial_rotary_factor,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": t.rope_theta,
            "partial_rotary_factor": t.partial_rotary_factor,
        },
        torch_dtype=spec.dtype,
        mlp_layer_types=["sparse" if f else "dense" for f in t.moe_layer_freq],
    )
    sa = t.sparse_attention_config
    if sa is not None:
        text["sparse_attention_config"] = sa.model_dump(mode="json")
        text["layer_types"] = [
            "minimax_m3_sparse" if t.is_sparse_layer(i) else "full_attention"
            for i in range(t.num_hidden_layers)
        ]
        # Flattened names used by the newer HF port (m3-architecture.md §1.3).
        text.update(
            index_n_heads=sa.sparse_num_index_heads,
            index_head_dim=sa.sparse_index_dim,
            index_block_size=sa.sparse_block_size,
            index_topk_blocks=sa.sparse_topk_blocks,
            index_local_blocks=sa.sparse_local_block,
        )
    if not spec.is_vl:
        return {"architectures": ["MiniMaxM3VLForCausalLM"], **text}
    assert spec.vision is not None and spec.multimodal is not None
    v = spec.vision
    vision = {k: getattr(v, k) for k in _VISION_KEYS}
    vision.update(
        model_type="minimax_m3_vl_vision",
        rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
        img_token_compression_config={
            "method": "patch_merge",
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
        },
    )
    mm = spec.multimodal.model_dump(mode="json")
    return {
        "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
        "model_type": "minimax_m3_vl",
        "torch_dtype": spec.dtype,
        **mm,
        "text_config": text,
        "vision_config": vision,
    }


def spec_yaml(spec: M3Spec) -> str:
    """The canonical YAML text of a spec (what `spec from-hf` prints); a step without a tolerance
    (`precision` of a float32 spec) is left out rather than written as null."""
    data = dump_spec(spec)
    data["tolerances"] = {k: v for k, v in data["tolerances"].items() if v is not None}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)
