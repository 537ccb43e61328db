"""The files of a safetensors checkpoint: find them, validate them, read tensors without mmap.

`read_checkpoint` resolves a file, a directory (index, `model.safetensors`, or every
`*.safetensors`) or an index file, checks every header with `safe_open` and the index against the
shards, and returns where each tensor lies. `read_into` then copies one tensor's bytes straight
into a destination tensor. Pickle checkpoints are refused by name: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from m3export.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class DiskTensor:
    """One tensor in a safetensors file: dtype (safetensors name), shape, absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def is_floating(self) -> bool:
        return self.dtype in TORCH_DTYPES and TORCH_DTYPES[self.dtype].is_floating_point

    def read(self) -> Tensor:
        """The tensor, in its on-disk dtype, in fresh CPU memory."""
        if self.dtype not in TORCH_DTYPES:
            raise CheckpointError(
                f"{self.file}: dtype {self.dtype} is not supported ({sorted(TORCH_DTYPES)})"
            )
        out = torch.empty(self.shape, dtype=TORCH_DTYPES[self.dtype])
        _read_bytes(self, out)
        return out


def read_into(src: DiskTensor, dst: Tensor) -> None:
    """Copy src into dst, converting to dst's dtype; same dtype into contiguous CPU memory reads in place."""
    if TORCH_DTYPES.get(src.dtype) == dst.dtype and dst.is_contiguous() and dst.device.type == "cpu":
        _read_bytes(src, dst)
    elif src.dtype in TORCH_DTYPES and dst.is_contiguous() and dst.device.type == "cpu" and dst.numel():
        _convert_chunks(src, dst)
    else:
        dst.copy_(src.read())


_CHUNK_BYTES = 64 << 20


def _convert_chunks(src: DiskTensor, dst: Tensor) -> None:
    """Read and convert (e.g. a bf16 checkpoint into an fp32 model) 64 MiB at a time, never holding
    the whole tensor twice (the embedding of m3-full is 2.3 GiB in bf16)."""
    dtype = TORCH_DTYPES[src.dtype]
    size = torch.empty((), dtype=dtype).element_size()
    flat = dst.view(-1)
    if (src.end - src.start) != flat.numel() * size:
        raise CheckpointError(f"{src.file}: tensor byte range does not match its dtype and shape")
    step = max(1, _CHUNK_BYTES // size)
    for first in range(0, flat.numel(), step):
        n = min(step, flat.numel() - first)
        start = src.start + first * size
        part = DiskTensor(src.file, src.dtype, (n,), start, start + n * size).read()
        flat[first : first + n].copy_(part)


def _read_bytes(src: DiskTensor, dst: Tensor) -> None:
    if dst.numel() == 0:
        return
    buf = dst.view(-1).view(torch.uint8).numpy().data  # dst's own memory (view() never copies)
    if len(buf) != src.end - src.start:
        raise CheckpointError(f"{src.file}: tensor byte range does not match its dtype and shape")
    with open(src.file, "rb", buffering=0) as fh:
        fh.seek(src.start)
        done = 0
        while done < len(buf):  # one read() returns at most ~2 GiB on Linux
            n = fh.readinto(buf[done:])
            if not n:
                raise CheckpointError(f"{src.file}: file ends inside a tensor (truncated?); re-download it")
            done += n


def read_checkpoint(path: Path) -> dict[str, DiskTensor]:
    """Every tensor of the checkpoint at `path`, by key, after validating headers and the index."""
    if path.is_file() and path.name.endswith(".index.json"):
        return _read_indexed(path)
    if path.is_file():
        _refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file or a {INDEX_NAME}")
        return read_header(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if (path / INDEX_NAME).is_file():
        return _read_indexed(path / INDEX_NAME)
    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    files = files or sorted(path.glob("*.safetensors"))
    if not files:
        for f in sorted(path.iterdir()):
            _refuse_pickle(f)
        raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_NAME}")
    out: dict[str, DiskTensor] = {}
    for f in files:
        header = read_header(f)
        if dup := sorted(set(header) & set(out)):
            raise CheckpointError(f"{f}: {len(dup)} tensors also in {out[dup[0]].file.name}, e.g. {dup[0]}")
        out.update(header)
    return out


def _refuse_pickle(path: Path) -> None:
    name = path.name
    if name.endswith(PICKLE_SUFFIXES) or name == "pytorch_model.bin.index.json":
        raise CheckpointError(
            f"{path}: pickle checkpoints are not loaded (unpickling can run arbitrary code); convert it "
            "to safetensors on a trusted machine, e.g. transformers save_pretrained(dir, "
            "safe_serialization=True) or safetensors.torch.save_file(state_dict, 'model.safetensors')"
        )


def read_header(path: Path) -> dict[str, DiskTensor]:
    """Tensors of one safetensors file; a truncated file or a corrupted header raises CheckpointError."""

    from safetensors import safe_open

    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the reader forever
            raise CheckpointError(f"{path}: not a regular file")
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it ({err.strerror})") from None
    try:  # the reference parser: checks header size, JSON, dtypes, and that offsets cover the file
        with safe_open(str(path), framework="pt"):
            pass
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as err:
        reason = " ".join(str(err).split())
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({reason}); re-download or re-save it"
        ) from None
    base = 8 + size
    return {
        k: DiskTensor(
            path, v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1]
        )
        for k, v in header.items()
        if k != "__metadata__"
    }


def _read_indexed(index: Path) -> dict[str, DiskTensor]:
    """Tensors named by an index; every shard must exist and hold exactly the keys the index puts there."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except Exception:
        raise CheckpointError(
            f"{index}: not a valid index (expected JSON with a 'weight_map' object)"
        ) from None
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    out: dict[str, DiskTensor] = {}
    for shard, keys in shards.items():
        f = index.parent / shard
        if Path(shard).name != shard or not f.is_file():
            raise CheckpointError(
                f"{f}: shard missing ({index.name} puts {len(keys)} tensors there, e.g. {keys[0]})"
            )
        header = read_header(f)
        absent = sorted(set(keys) - set(header))
        unlisted = sorted(set(header) - set(keys))
        if absent or unlisted:
            parts = (
                [f"{len(absent)} keys the index puts here are absent ({', '.join(absent[:3])})"]
                if absent
                else []
            )
            parts += (
                [f"{len(unlisted)} keys here are indexed elsewhere ({', '.join(unlisted[:3])})"]
                if unlisted
                else []
            )
            raise CheckpointError(f"{f}: does not match {index.name}: {'; '.join(parts)}")
        out.update(header)
    return out
