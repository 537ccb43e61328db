"""HF-layout checkpoint I/O (m3-architecture.md §6): round trips in fp32 / bf16 / shards / MXFP8,
text-only and VL layouts, every error case, exact `from_pretrained` logits, and peak RSS on load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import spec_variant
from safetensors.torch import load_file, save_file
from torch import nn

from m3export.errors import CheckpointError
from m3export.model.checkpoint import load_checkpoint, native_to_hf, save_checkpoint
from m3export.model.mxfp8 import dequantize_mxfp8, mxfp8_error_bound, quantize_mxfp8
from m3export.model.text import M3ForCausalLM
from m3export.model.vl import M3ForConditionalGeneration
from m3export.spec import M3Spec

ROOT = Path(__file__).resolve().parents[1]
KEEP_FP32 = ("block_sparse_moe.gate.weight", "e_score_correction_bias")


def _fresh(spec: M3Spec) -> M3ForCausalLM:
    return M3ForCausalLM.from_config(spec, device="meta")


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def model(tiny_text_spec: M3Spec) -> M3ForCausalLM:
    return M3ForCausalLM.from_config(tiny_text_spec)


def _ids(seq: int = 40) -> torch.Tensor:
    return torch.randint(0, 1000, (2, seq), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------ round trips


def test_fp32_round_trip_streams_into_meta(
    model: M3ForCausalLM, tiny_text_spec: M3Spec, tmp_path: Path
) -> None:
    save_checkpoint(model, tiny_text_spec, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    target = _fresh(tiny_text_spec)
    report = load_checkpoint(target, tmp_path)
    assert not report.skipped and not report.dequantized and report.files == [tmp_path / "model.safetensors"]
    assert not any(t.is_meta for t in target.state_dict().values())
    _assert_same_state(model, target)
    # Filling a materialised model in place gives the same.
    target = M3ForCausalLM.from_config(tiny_text_spec, seed=123)
    load_checkpoint(target, tmp_path / "model.safetensors")
    _assert_same_state(model, target)


def test_from_pretrained_logits_exact(model: M3ForCausalLM, tiny_text_spec: M3Spec, tmp_path: Path) -> None:
    save_checkpoint(model, tiny_text_spec, tmp_path, max_shard_size="300KB")
    loaded = M3ForCausalLM.from_pretrained(tmp_path)  # architecture from config.json
    ids = _ids()
    with torch.no_grad():
        want, got = model(ids), loaded(ids)
    assert torch.equal(want.logits, got.logits)
    assert want.mtp_per_depth_logits is not None and got.mtp_per_depth_logits is not None
    assert torch.equal(want.mtp_per_depth_logits[0], got.mtp_per_depth_logits[0])


def test_bf16_on_disk(model: M3ForCausalLM, tiny_text_spec: M3Spec, tmp_path: Path) -> None:
    save_checkpoint(model, tiny_text_spec, tmp_path, dtype=torch.bfloat16)
    disk = load_file(tmp_path / "model.safetensors")
    for k, v in disk.items():
        assert v.dtype == (torch.float32 if k.endswith(KEEP_FP32) else torch.bfloat16), k
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # Into an fp32 model: each value is the bf16 rounding of the original, router and bias exact.
    fp32 = _fresh(tiny_text_spec)
    load_checkpoint(fp32, tmp_path)
    for k, v in model.state_dict().items():
        want = v if k.endswith(KEEP_FP32) else v.to(torch.bfloat16).float()
        assert fp32.state_dict()[k].dtype == torch.float32 and torch.equal(fp32.state_dict()[k], want), k
    # config.json's torch_dtype is the storage dtype: the spec read from it computes in float32 unless
    # its export.precision says otherwise; the values are those bf16 roundings either way.
    read = M3ForCausalLM.from_pretrained(tmp_path)
    for k, v in read.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, fp32.state_dict()[k]), k
    # Into a bf16 model (graphs in bf16): bf16, except the fp32 router and bias.
    data = tiny_text_spec.model_dump(mode="json")
    data["export"]["precision"]["dtype"] = "bfloat16"
    data.pop("tolerances")
    bf16 = M3ForCausalLM.from_pretrained(tmp_path, spec=M3Spec.model_validate(data))
    for k, v in bf16.state_dict().items():
        assert v.dtype == (torch.float32 if k.endswith(KEEP_FP32) else torch.bfloat16), k
        assert torch.equal(v.float(), fp32.state_dict()[k]), k


def test_sharded_round_trip(model: M3ForCausalLM, tiny_text_spec: M3Spec, tmp_path: Path) -> None:
    save_checkpoint(model, tiny_text_spec, tmp_path / "one")  # stale files of another save are replaced
    save_checkpoint(model, tiny_text_spec, tmp_path, max_shard_size=400_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) >= 3 and shards == sorted(set(index["weight_map"].values()))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    on_disk = {}
    for s in shards:
        tensors = load_file(tmp_path / s)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 400_000 or len(tensors) == 1
        on_disk.update({k: s for k in tensors})
    assert on_disk == index["weight_map"]
    assert index["metadata"]["total_size"] == sum((tmp_path / s).stat().st_size for s in shards) - sum(
        8 + int.from_bytes((tmp_path / s).read_bytes()[:8], "little") for s in shards
    )
    target = _fresh(tiny_text_spec)
    assert len(load_checkpoint(target, tmp_path).files) == len(shards)
    _assert_same_state(model, target)


# ---------------------------------------------------------------------------------------- VL layout


def test_vl_layout_round_trips(tiny_spec: M3Spec, model: M3ForCausalLM, tmp_path: Path) -> None:
    vl = M3ForConditionalGeneration.from_config(tiny_spec)
    save_checkpoint(vl, tiny_spec, tmp_path / "vl", max_shard_size="500KB")
    keys = json.loads((tmp_path / "vl" / "model.safetensors.index.json").read_text())["weight_map"]
    roots = {k.split(".")[0] for k in keys}
    assert roots == {"language_model", "vision_tower", "multi_modal_projector", "patch_merge_mlp"}
    assert "language_model.model.layers.1.block_sparse_moe.experts.7.w2.weight" in keys
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    target = M3ForConditionalGeneration.from_config(tiny_spec, device="meta")
    load_checkpoint(target, tmp_path / "vl")
    _assert_same_state(vl, target)
    loaded = M3ForConditionalGeneration.from_pretrained(tmp_path / "vl")
    with torch.no_grad():
        assert torch.equal(vl(_ids()).logits, loaded(_ids()).logits)
    # A text model reads the VL checkpoint's `language_model.` part and passes over the rest.
    text = _fresh(tiny_spec)
    report = load_checkpoint(text, tmp_path / "vl")
    assert report.skipped and all(not k.startswith("language_model.") for k in report.skipped)
    _assert_same_state(vl.language_model, text)
    # A text model under a VL spec is written under `language_model.` and reads back.
    save_checkpoint(model, tiny_spec, tmp_path / "text")
    assert all(k.startswith("language_model.") for k in load_file(tmp_path / "text" / "model.safetensors"))
    text = _fresh(tiny_spec)
    load_checkpoint(text, tmp_path / "text")
    _assert_same_state(model, text)


def test_transformers_5_18_and_5_24_key_spellings_load_the_same(tiny_spec: M3Spec, tmp_path: Path) -> None:
    """transformers 5.24 writes the dense-layer and vision MLPs as `mlp.*` (§6.1); 5.18's
    save_pretrained ran its load-time rename `.block_sparse_moe.` -> `.mlp.` backwards over every key,
    writing them as `block_sparse_moe.*`. A checkpoint written by transformers, respelled the 5.18 way,
    loads to the same tensors; a key spelled both ways is refused."""
    import transformers
    from test_vl_parity import _randomise_hf

    from m3export.spec import from_hf_config, to_hf_config

    cfg = {k: v for k, v in to_hf_config(tiny_spec).items() if k != "architectures"}
    hf = transformers.MiniMaxM3SparseForConditionalGeneration(transformers.MiniMaxM3VLConfig(**cfg)).eval()
    _randomise_hf(hf, seed=7)
    hf.save_pretrained(tmp_path / "v524")
    (file,) = (tmp_path / "v524").glob("*.safetensors")
    tensors = load_file(file)
    respelled = {k.replace(".mlp.", ".block_sparse_moe."): t for k, t in tensors.items()}
    assert sum(".mlp." in k for k in tensors) >= 2 * tiny_spec.text.num_hidden_layers  # dense + vision MLPs
    (tmp_path / "v518").mkdir()
    save_file(respelled, tmp_path / "v518" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "v518" / "config.json").write_text((tmp_path / "v524" / "config.json").read_text())

    spec = from_hf_config(tmp_path / "v524")  # transformers writes no MTP depths
    a = M3ForConditionalGeneration.from_config(spec, device="meta")
    b = M3ForConditionalGeneration.from_config(spec, device="meta")
    load_checkpoint(a, tmp_path / "v524")
    load_checkpoint(b, tmp_path / "v518")
    _assert_same_state(a, b)

    both = dict(respelled)
    dense = next(k for k in tensors if ".mlp.gate_proj." in k)
    both[dense] = tensors[dense].clone()
    save_file(both, tmp_path / "v518" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="spelled two ways"):
        load_checkpoint(M3ForConditionalGeneration.from_config(spec, device="meta"), tmp_path / "v518")


def test_vl_mxfp8_and_bf16_leave_vision_alone(tiny_spec: M3Spec, tmp_path: Path) -> None:
    """§6.2: the vision tower and projector/merger are not quantised; §6.1: the patch embedding stays fp32."""
    vl = M3ForConditionalGeneration.from_config(tiny_spec)
    save_checkpoint(vl, tiny_spec, tmp_path, mxfp8=True, dtype=torch.bfloat16)
    disk = load_file(tmp_path / "model.safetensors")
    scaled = {k.removesuffix("_scale_inv") for k in disk if k.endswith("_scale_inv")}
    assert scaled == {"language_model." + k for k in _quantised_keys(tiny_spec)}
    assert disk["vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert disk["vision_tower.vision_model.embeddings.patch_embedding.weight"].dtype == torch.float32
    target = M3ForConditionalGeneration.from_config(tiny_spec, device="meta")
    assert len(load_checkpoint(target, tmp_path).dequantized) == len(scaled)
    for k, v in vl.state_dict().items():
        if k.startswith(("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")):
            want = v if k.endswith("patch_embedding.weight") else v.to(torch.bfloat16).float()
            assert torch.equal(target.state_dict()[k], want), k


# -------------------------------------------------------------------------------------------- MXFP8


def _e4m3_to_f64(bits: np.ndarray) -> np.ndarray:
    """OCP E4M3FN by hand: bias 7, 3 mantissa bits, subnormals at e = 0, NaN at S.1111.111, no inf."""
    b = bits.astype(np.int64)
    s, e, m = b >> 7, (b >> 3) & 0xF, b & 7
    mag = np.where(e == 0, m / 8.0 * 2.0**-6, (1.0 + m / 8.0) * 2.0 ** (e - 7.0))
    mag = np.where((e == 15) & (m == 7), np.nan, mag)
    return np.where(s == 1, -mag, mag)


def _reference_dequant(wbits: np.ndarray, sbits: np.ndarray) -> np.ndarray:
    """§6.2 in float64: w · 2^(s − 127), the scale repeated ×32 along the input dim and trimmed."""
    scale = 2.0 ** (sbits.astype(np.float64) - 127.0)
    return _e4m3_to_f64(wbits) * np.repeat(scale, 32, axis=1)[:, : wbits.shape[1]]


def test_mxfp8_dequant_matches_float64_transcription() -> None:
    g = torch.Generator().manual_seed(0)
    wbits = torch.randint(0, 256, (6, 70), dtype=torch.uint8, generator=g)  # 3 blocks, the last 6 wide
    wbits[0, :2] = torch.tensor([0x7F, 0xFF], dtype=torch.uint8)  # NaN encodings
    wbits[1, :] = torch.arange(70, dtype=torch.uint8)  # smallest subnormals upwards
    sbits = torch.randint(60, 190, (6, 3), dtype=torch.uint8, generator=g)
    sbits[1] = torch.tensor([0, 127, 247], dtype=torch.uint8)  # 2^-127 (fp32 subnormal), 1, 2^120
    got = dequantize_mxfp8(wbits.view(torch.float8_e4m3fn), sbits)
    assert got.dtype == torch.float32 and got.shape == (6, 70)
    ref = _reference_dequant(wbits.numpy(), sbits.numpy())
    np.testing.assert_array_equal(got.double().numpy(), ref)
    e8m0 = dequantize_mxfp8(wbits.view(torch.float8_e4m3fn), sbits.view(torch.float8_e8m0fnu))
    assert torch.equal(e8m0.nan_to_num(), got.nan_to_num())


def _quantised_keys(spec: M3Spec) -> set[str]:
    """The §6.2 write-side set, listed by hand for m3-tiny (layer 0 dense; layers 1-3 and MTP MoE)."""
    t = spec.text
    attn = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    shared = [f"block_sparse_moe.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")]
    experts = [
        f"block_sparse_moe.experts.{e}.{w}.weight"
        for e in range(t.num_local_experts)
        for w in ("w1", "w2", "w3")
    ]
    out = {f"model.layers.0.{k}" for k in attn + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]}
    for prefix in [f"model.layers.{i}." for i in (1, 2, 3)] + ["model.mtp.layers.0.transformer_layer."]:
        out |= {prefix + k for k in attn + shared + experts}
    return out


def test_mxfp8_round_trip(model: M3ForCausalLM, tiny_text_spec: M3Spec, tmp_path: Path) -> None:
    save_checkpoint(model, tiny_text_spec, tmp_path, mxfp8=True, max_shard_size="200KB")
    disk: dict[str, torch.Tensor] = {}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in set(index.values()):
        disk.update(load_file(tmp_path / shard))
    scaled = {k.removesuffix("_scale_inv") for k in disk if k.endswith("_scale_inv")}
    assert scaled == _quantised_keys(tiny_text_spec)
    for k in scaled:  # a weight and its scale share a shard; shapes and dtypes per §6.2
        assert index[k] == index[k + "_scale_inv"] and disk[k].dtype == torch.float8_e4m3fn
        assert disk[k + "_scale_inv"].shape == (disk[k].shape[0], -(-disk[k].shape[1] // 32))
    target = _fresh(tiny_text_spec)
    report = load_checkpoint(target, tmp_path)
    assert set(report.dequantized) == scaled
    hf_ref, hf_got = native_to_hf(model.state_dict()), native_to_hf(target.state_dict())
    worst_bound, worst_rel = 0.0, 0.0
    for k, want in hf_ref.items():
        if k not in scaled:
            assert torch.equal(hf_got[k], want), k
            continue
        err = (hf_got[k] - want).abs()
        bound = mxfp8_error_bound(want, disk[k + "_scale_inv"])
        assert (err <= bound).all(), k
        assert err.max() > 0, k  # it really went through e4m3
        worst_bound = max(worst_bound, (err / bound).max().item())
        normal = bound == want.abs() * 2.0**-4  # outside the e4m3 subnormal range
        worst_rel = max(worst_rel, (err[normal] / want.abs()[normal]).max().item())
    with torch.no_grad():
        a, b = model(_ids()).logits, target(_ids()).logits
    cos = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1).min().item()
    print(
        f"MXFP8: max err/bound {worst_bound:.3f}, worst relative error (normal range) {worst_rel:.4f} "
        f"(e4m3: <= 2^-4); logits max abs {(a - b).abs().max().item():.3g}, min cosine {cos:.5f}"
    )


def test_every_scale_sibling_is_dequantised(
    model: M3ForCausalLM, tiny_text_spec: M3Spec, tmp_path: Path
) -> None:
    """§6.2: the release also quantises the index projections and eh_proj; any `_scale_inv` sibling counts."""
    hf = {k: v.contiguous() for k, v in native_to_hf(model.state_dict()).items()}
    extra = ["model.layers.1.self_attn.index_q_proj.weight", "model.mtp.layers.0.eh_proj.weight"]
    for k in extra:
        hf[k], hf[k + "_scale_inv"] = quantize_mxfp8(hf[k])
    save_file(hf, tmp_path / "model.safetensors")
    target = _fresh(tiny_text_spec)
    assert load_checkpoint(target, tmp_path).dequantized == sorted(extra)
    for k in extra:
        want = dequantize_mxfp8(hf[k], hf[k + "_scale_inv"])
        assert torch.equal(target.state_dict()[k], want), k


# ------------------------------------------------------------------------------------------- errors


def _write(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def test_mismatch_is_one_error_listing_each_kind(
    model: M3ForCausalLM, tiny_text_spec: M3Spec, tmp_path: Path
) -> None:
    hf = native_to_hf(model.state_dict())
    drop = [k for k in hf if k.startswith("model.layers.3.")][:7]
    drop.append("model.layers.2.block_sparse_moe.experts.5.w3.weight")
    bad = {k: v for k, v in hf.items() if k not in drop}
    bad["model.layers.0.self_attn.index_q_proj.weight"] = torch.zeros(2)
    bad["lm_head.weight"] = hf["lm_head.weight"][:-1]
    bad["model.norm.weight"] = hf["model.norm.weight"].to(torch.float8_e4m3fn)  # fp8 without a scale
    bad["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.zeros(
        3, dtype=torch.uint8
    )  # fp32 weight, bad scale
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_fresh(tiny_text_spec), _write(bad, tmp_path / "model.safetensors"))
    msg = str(info.value)
    print(msg)
    assert "\n" not in msg and str(tmp_path) in msg
    assert "8 missing (" in msg and "experts.5: missing w3" in msg and ", ... 3 more" in msg
    assert "1 unexpected (model.layers.0.self_attn.index_q_proj.weight)" in msg
    assert "2 wrong shape (" in msg and "lm_head.weight [1023, 128] vs model [1024, 128]" in msg
    assert "2 wrong dtype (" in msg and "model.norm.weight F8_E4M3" in msg


@pytest.fixture()
def saved(model: M3ForCausalLM, tiny_text_spec: M3Spec, tmp_path: Path) -> Path:
    return save_checkpoint(model, tiny_text_spec, tmp_path / "ckpt", max_shard_size="300KB")


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def _raises_naming(path: Path, target: Path, tiny_text_spec: M3Spec, *words: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_fresh(tiny_text_spec), path)
    msg = str(info.value)
    assert "\n" not in msg and str(target) in msg, msg
    assert all(w in msg for w in words), msg
    return msg


def test_truncated_file(saved: Path, tiny_text_spec: M3Spec) -> None:
    shard = _shards(saved)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    _raises_naming(saved, shard, tiny_text_spec, "not a valid safetensors file", "not fully covered")


def test_corrupted_header(saved: Path, tiny_text_spec: M3Spec) -> None:
    shard = _shards(saved)[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\x00{]!"
    shard.write_bytes(bytes(data))
    _raises_naming(saved, shard, tiny_text_spec, "not a valid safetensors file")
    shard.write_bytes((10**12).to_bytes(8, "little") + bytes(data[8:]))  # absurd header length
    _raises_naming(saved, shard, tiny_text_spec, "header too large")


def test_missing_shard(saved: Path, tiny_text_spec: M3Spec) -> None:
    shard = _shards(saved)[-1]
    shard.unlink()
    _raises_naming(saved, shard, tiny_text_spec, "shard missing", "model.safetensors.index.json puts")


def test_index_disagrees_with_shard(saved: Path, tiny_text_spec: M3Spec) -> None:
    index_path = saved / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = (s.name for s in _shards(saved)[:2])
    key = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][key] = second
    index_path.write_text(json.dumps(index))
    _raises_naming(saved, saved / second, tiny_text_spec, "does not match", "1 keys the index puts here", key)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_checkpoints_are_refused(name: str, tiny_text_spec: M3Spec, tmp_path: Path) -> None:
    f = tmp_path / name
    f.write_bytes(b"\x80\x04 not for unpickling")
    for path in (f, tmp_path):  # the file itself, or a directory holding only it
        _raises_naming(path, f, tiny_text_spec, "pickle", "convert it to safetensors")


def test_not_a_checkpoint(tiny_text_spec: M3Spec, tmp_path: Path) -> None:
    _raises_naming(tmp_path, tmp_path, tiny_text_spec, "no *.safetensors files")
    _raises_naming(tmp_path / "nope", tmp_path / "nope", tiny_text_spec, "no such checkpoint")


# ------------------------------------------------------------------------------------- memory


_RSS_SCRIPT = """
import json, sys, torch
from m3export.model.checkpoint import hf_to_native, load_checkpoint
from m3export.model.text import M3ForCausalLM
from m3export.spec import M3Spec

def status_kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

spec, path, mode = M3Spec.model_validate_json(sys.argv[1]), sys.argv[2], sys.argv[3]
model = M3ForCausalLM.from_config(spec, device="meta")
param_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
try:  # reset the peak-RSS mark (VmHWM) to the current RSS; without it VmHWM still starts at exec
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
base = status_kib("VmRSS")
if mode == "stream":
    load_checkpoint(model, path)
elif mode == "from_pretrained":
    model = M3ForCausalLM.from_pretrained(path, spec=spec)
else:  # the pre-streaming loader: whole files through safetensors, then stack and copy
    from pathlib import Path
    from safetensors.torch import load_file
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    model = model.to_empty(device="cpu")
    model.load_state_dict(hf_to_native(state, vl=False)[0])
print(json.dumps({"param_bytes": param_bytes, "above_base": (status_kib("VmHWM") - base) * 1024}))
"""


def test_load_peak_rss_below_one_and_a_half_model_sizes(tiny_text_spec: M3Spec, tmp_path: Path) -> None:
    """~290 MB model in 3 shards: streaming load peaks under 1.5x the parameter bytes above the RSS
    before loading (VmHWM, reset before the load); whole-file loading does not, so this can fail."""
    spec = spec_variant(tiny_text_spec, vocab_size=120_000, hidden_size=256, intermediate_size=512)
    big = M3ForCausalLM.from_config(spec)
    save_checkpoint(big, spec, tmp_path, max_shard_size="120MB")
    del big
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    ratios = {}
    for mode in ("stream", "from_pretrained", "whole_files"):
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, spec.model_dump_json(), str(tmp_path), mode],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ratios[mode] = r["above_base"] / r["param_bytes"]
        print(
            f"{mode}: params {r['param_bytes'] / 2**20:.0f} MiB, peak above base {r['above_base'] / 2**20:.0f} MiB, ratio {ratios[mode]:.2f}"
        )
    assert ratios["stream"] < 1.5 and ratios["from_pretrained"] < 1.5, ratios
    assert ratios["whole_files"] > 1.5, ratios
