"""HF-layout safetensors checkpoints (m3-architecture.md §6): save and streaming load.

Generic over the module: its native state-dict names must equal the HF keys except for the
stacked routed experts (`hf_keys`), so the text model (`model.*`, `lm_head.*`, or under
`language_model.` in a VL checkpoint) and a VL module (`language_model.*` + vision keys) both work.
On disk: one `model.safetensors` or shards with `model.safetensors.index.json`; fp32, bf16 (router
and correction bias stay fp32) or MXFP8 (§6.2). Pickle checkpoints are refused, never unpickled.

Loading streams: each native tensor is allocated once and filled from the files with `readinto`
(experts straight into their slice of the stacked tensor), so peak memory is the model plus one
checkpoint tensor. `safe_open` validates every file's header but is not used to read data: its
tensors are mmap views whose touched pages stay resident while the file is open, which doubles RSS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from m3export.errors import CheckpointError, SpecError
from m3export.model.checkpoint_files import INDEX_NAME, DiskTensor, read_checkpoint, read_into
from m3export.model.hf_keys import (
    SCALE_SUFFIX,
    VL_NON_TEXT_PREFIXES,
    VL_TEXT_PREFIX,
    canonical_key,
    checkpoint_root,
    describe_missing,
    hf_to_native,
    is_mtp_key,
    is_mxfp8_write_key,
    keeps_fp32,
    native_to_hf,
)
from m3export.model.mxfp8 import MXFP8_BLOCK, dequantize_mxfp8, quantize_mxfp8
from m3export.spec import M3Spec, from_hf_config, to_hf_config

__all__ = [
    "VL_NON_TEXT_PREFIXES",
    "VL_TEXT_PREFIX",
    "LoadReport",
    "hf_to_native",
    "load_checkpoint",
    "native_to_hf",
    "save_checkpoint",
]

_OWN_FILES = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*$", re.IGNORECASE)
_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_EXAMPLES = 5


# ---------------------------------------------------------------------------------------------- save


def save_checkpoint(
    model: nn.Module,
    spec: M3Spec,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    mxfp8: bool = False,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write the HF layout (§6.1) and `config.json` to out_dir; returns out_dir.

    dtype: on-disk dtype of floating tensors (None: as the model holds them); router weight,
    correction bias and patch embedding stay fp32. mxfp8: quantise the §6.2 key set to e4m3 plus
    `<key>_scale_inv`. max_shard_size (bytes, or "500MB" / "2GiB"): shard with an index past it.
    A text model under a VL spec is written under `language_model.`.
    """
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"dtype {dtype}: checkpoints are written in torch.float32 or torch.bfloat16")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    vl = spec.is_vl and not any(k.startswith(VL_TEXT_PREFIX) for k in state)
    hf = native_to_hf(state, vl=vl)
    shards = _plan_shards(hf, dtype, mxfp8, _parse_size(max_shard_size))
    for stale in out.iterdir():  # an earlier save with other sharding would shadow this one
        if _OWN_FILES.match(stale.name):
            stale.unlink()
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shards):
        name = (
            "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        weight_map.update(_write_shard(out / name, {k: hf[k] for k in keys}, dtype, mxfp8))
    if len(shards) > 1:
        total = sum(_nbytes(t) for t in _disk_view(hf, dtype, mxfp8))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(_config(spec, dtype), indent=2) + "\n")
    return out


def _config(spec: M3Spec, dtype: torch.dtype | None) -> dict:
    cfg = to_hf_config(spec)
    if dtype is not None:  # torch_dtype is the dense dtype on disk; from_hf_config reads it back
        name = str(dtype).removeprefix("torch.")
        cfg["torch_dtype"] = name
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["torch_dtype"] = name
    return cfg


def _disk_tensors(key: str, t: Tensor, dtype: torch.dtype | None, mxfp8: bool) -> dict[str, Tensor]:
    t = t.cpu()
    if mxfp8 and t.ndim == 2 and is_mxfp8_write_key(key):
        q, scale = quantize_mxfp8(t)
        return {key: q, key + SCALE_SUFFIX: scale}
    if dtype is not None and t.is_floating_point() and not keeps_fp32(key):
        t = t.to(dtype)
    return {key: t.contiguous()}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _disk_view(hf: dict[str, Tensor], dtype: torch.dtype | None, mxfp8: bool) -> list[Tensor]:
    """Meta stand-ins for what `_disk_tensors` writes, to size shards without converting anything."""
    out = []
    for k, t in hf.items():
        if mxfp8 and t.ndim == 2 and is_mxfp8_write_key(k):
            nb = -(-t.shape[1] // MXFP8_BLOCK)
            out.append(torch.empty(t.shape, dtype=torch.float8_e4m3fn, device="meta"))
            out.append(torch.empty((t.shape[0], nb), dtype=torch.uint8, device="meta"))
        else:
            floating = dtype is not None and t.is_floating_point() and not keeps_fp32(k)
            out.append(torch.empty(t.shape, dtype=dtype if floating else t.dtype, device="meta"))
    return out


def _plan_shards(
    hf: dict[str, Tensor], dtype: torch.dtype | None, mxfp8: bool, limit: int | None
) -> list[list[str]]:
    """Greedy in key order; a weight and its scale stay together; an oversized tensor gets its own shard."""
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in hf.items():
        n = sum(_nbytes(x) for x in _disk_view({k: t}, dtype, mxfp8))
        if limit is not None and shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _write_shard(path: Path, hf: dict[str, Tensor], dtype: torch.dtype | None, mxfp8: bool) -> dict[str, str]:
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for k, t in hf.items():
        tensors.update(_disk_tensors(k, t, dtype, mxfp8))
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dict.fromkeys(tensors, path.name)


def _parse_size(size: int | str | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    m = _SIZE.match(size)
    if m is None:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '500MB' or '2GiB'")
    return int(float(m[1]) * (_UNITS[m[2].lower()] if m[2] else 1))


# ---------------------------------------------------------------------------------------------- load


@dataclass
class LoadReport:
    """What `load_checkpoint` did: native tensors loaded, checkpoint keys passed over (not text, or
    MTP depths the model does not have), HF keys dequantised from MXFP8, and the files read."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dequantized: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def load_checkpoint(
    model: nn.Module, path: str | Path, *, device: str | torch.device | None = None
) -> LoadReport:
    """Load an HF-layout safetensors checkpoint (file, directory or index; §6) into `model` in place.

    Tensors on the meta device are materialised on `device` (default CPU), one at a time; others are
    filled where they are. Values are converted to each tensor's own dtype (so the fp32 router and
    correction bias stay fp32); MXFP8 weights are dequantised. Any missing, unexpected, mis-shaped or
    ill-typed key raises one CheckpointError listing them.
    """
    p = Path(path)
    disk = read_checkpoint(p)
    own = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    disk, skipped = _select(disk, own)
    expected = native_to_hf(own)
    _check_match(p, expected, disk)
    for name, t in own.items():
        _materialise(model, name, t, disk, device)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ValueError(
                f"{name} is still on the meta device: not in the state dict, so no checkpoint fills it"
            )
    dequantized = sorted(k for k in disk if k + SCALE_SUFFIX in disk)
    files = sorted({d.file for d in disk.values()})
    return LoadReport(loaded=sorted(own), skipped=sorted(skipped), dequantized=dequantized, files=files)


class CheckpointSource:
    """An HF-layout checkpoint validated once against a (meta) model, then read module by module:
    `fill(modules)` loads every tensor under those module paths (which must already be allocated,
    e.g. by `to_empty`), one checkpoint tensor at a time."""

    def __init__(self, model: nn.Module, path: str | Path) -> None:
        self.model = model
        self.path = Path(path)
        disk = read_checkpoint(self.path)
        own = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
        self.disk, self.skipped = _select(disk, own)
        _check_match(self.path, native_to_hf(own), self.disk)

    def fill(self, modules: Sequence[str]) -> None:
        own = self.model.state_dict(keep_vars=True)
        for name, t in own.items():
            if any(name.startswith(m + ".") for m in modules):
                _materialise(self.model, name, t.detach(), self.disk, None)


def _select(disk: dict[str, DiskTensor], own: dict[str, Tensor]) -> tuple[dict[str, DiskTensor], list[str]]:
    """Strip the VL text root when a text module reads a VL checkpoint; pass over the other roots and
    MTP depths the model does not have (the BF16 release declares MTP but ships none, §3.4)."""
    root = checkpoint_root(own, disk)
    has_mtp = any(is_mtp_key(k) for k in own)
    kept: dict[str, DiskTensor] = {}
    spelled: dict[str, str] = {}
    skipped: list[str] = []
    for k, d in disk.items():
        if not k.startswith(root) or (not has_mtp and is_mtp_key(k.removeprefix(root))):
            skipped.append(k)
            continue
        name = canonical_key(k.removeprefix(root))
        if name in kept:
            raise CheckpointError(f"{d.file}: {k} and {spelled[name]} are the same tensor spelled two ways")
        kept[name], spelled[name] = d, k
    return kept, skipped


def _check_match(path: Path, expected: dict[str, Tensor], disk: dict[str, DiskTensor]) -> None:
    weights = {k for k in disk if not (k.endswith(SCALE_SUFFIX) and k.removesuffix(SCALE_SUFFIX) in disk)}
    missing = describe_missing([k for k in expected if k not in disk])
    unexpected = [k for k in weights if k not in expected]
    shape: list[str] = []
    dtype: list[str] = []
    for k, t in expected.items():
        if k not in disk:
            continue
        d, s = disk[k], disk.get(k + SCALE_SUFFIX)
        if d.shape != tuple(t.shape):
            shape.append(f"{k} {list(d.shape)} vs model {list(t.shape)}")
        if s is not None:
            want = (t.shape[0], -(-t.shape[-1] // MXFP8_BLOCK)) if t.ndim == 2 else None
            if s.shape != want:
                shape.append(
                    f"{k + SCALE_SUFFIX} {list(s.shape)} vs {list(want) if want else 'none (not 2-D)'}"
                )
            if d.dtype != "F8_E4M3" or s.dtype not in ("U8", "F8_E8M0"):
                dtype.append(f"{k} {d.dtype} with scale {s.dtype} (MXFP8 wants F8_E4M3 + U8)")
        elif d.dtype.startswith("F8") or (t.is_floating_point() and not d.is_floating):
            dtype.append(f"{k} {d.dtype} for a {str(t.dtype).removeprefix('torch.')} tensor")
    parts = [
        _summary(n, kind)
        for n, kind in (
            (missing, "missing"),
            (unexpected, "unexpected"),
            (shape, "wrong shape"),
            (dtype, "wrong dtype"),
        )
        if n
    ]
    if parts:
        raise CheckpointError(
            f"{path}: checkpoint does not match the model: {'; '.join(parts)} "
            "(check that the spec / config.json describes this checkpoint)"
        )


def _summary(items: list[str], kind: str) -> str:
    items = sorted(items)
    more = f", ... {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else ""
    return f"{len(items)} {kind} ({', '.join(items[:_EXAMPLES])}{more})"


def _materialise(
    model: nn.Module, name: str, t: Tensor, disk: dict[str, DiskTensor], device: str | torch.device | None
) -> None:
    """Fill one native tensor from its HF pieces; a meta tensor is replaced by the filled one."""
    direct = not t.is_meta and t.device.type == "cpu"
    dst = t if direct else torch.empty(t.shape, dtype=t.dtype)
    with torch.no_grad():
        for key, view in native_to_hf({name: dst}).items():
            scale = disk.get(key + SCALE_SUFFIX)
            if scale is None:
                read_into(disk[key], view)
            else:
                view.copy_(dequantize_mxfp8(disk[key].read(), scale.read()))
        if t.is_meta:
            _assign(model, name, dst.to(device or "cpu"))
        elif not direct:
            t.copy_(dst)


def _assign(model: nn.Module, name: str, value: Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = mod._parameters.get(attr)
    if old is not None:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        mod._buffers[attr] = value


def resolve_pretrained(source: str | Path | M3Spec, spec: M3Spec | None) -> tuple[M3Spec, Path]:
    """(spec, checkpoint dir) for `from_pretrained`: `source` is a directory, or a spec whose
    `weights.checkpoint` names one; `spec` overrides the architecture read from config.json."""

    if isinstance(source, M3Spec):
        if source.weights.checkpoint is None:
            raise SpecError(
                f"spec {source.name!r} has random weights: build it with from_config, not from_pretrained"
            )
        return spec or source, Path(source.weights.checkpoint)
    path = Path(source)
    return spec or from_hf_config(path), path
