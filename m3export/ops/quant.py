"""Weight-only block quantisation of the routed experts (issue #14): the one implementation both the
eager reference (dequantised weights) and the `ort` lowering's `com.microsoft::QMoE` initializers use.

Format (ONNX Runtime's `QMoE` with quant_type 'int' and `block_size`, measured on onnxruntime 1.32
CPU, docs/precision.md):
  - weights per expert output-major [E, N, K] (like `nn.Linear.weight`), quantised in blocks of
    `block` consecutive inputs (along K);
  - symmetric: scale = max |w| over the block / (2^(bits-1) - 1), q = round-half-even(w / scale)
    clamped to ±(2^(bits-1) - 1), stored unsigned as q + 2^(bits-1) (QMoE's default zero point when
    no zero-point input is given: 8 for 4 bits, 128 for 8 bits); an all-zero block has scale 0, q 0;
  - int4 packs two values per byte along K, the even-K element in the low nibble: [E, N, K / 2] uint8;
    int8 is one byte per value: [E, N, K] uint8;
  - scales [E, N, K / block], in the graph's dtype.
Dequantised weight = (stored - zero point) * scale, computed in fp32.

Quantising a dequantised tensor again gives back the same integers (each value is within a few ulp
of an integer multiple of its block's scale), so the lowering re-quantises the eager model's
(dequantised) expert weights instead of carrying the integers alongside them; tests pin that.
"""

from __future__ import annotations

import numpy as np

from m3export.spec.export import EXPERT_BITS

BITS = EXPERT_BITS  # export.precision.experts -> bits per weight (owned by the spec)


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    *lead, k = w.shape
    if k % block:
        raise ValueError(f"the input dimension {k} is not a multiple of the quantisation block {block}")
    return w.astype(np.float32).reshape(*lead, k // block, block)


def block_scales(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Scales [..., N, K / block] in w's dtype (rounded to it, as the graph stores them)."""
    if w.ndim == 3:  # one expert at a time (see quantize)
        return np.stack([block_scales(e, bits, block) for e in w])
    amax = np.abs(_blocks(w, block)).max(axis=-1)
    return (amax / np.float32(qmax(bits))).astype(w.dtype)


def _levels(w: np.ndarray, scales: np.ndarray, bits: int, block: int) -> np.ndarray:
    """The unsigned levels [..., N, K] (uint8, before packing) of w under `scales`."""
    s = scales.astype(np.float32)[..., None]
    q = np.round(_blocks(w, block) / np.where(s == 0, np.float32(1), s))
    m = qmax(bits)
    return (np.clip(q, -m, m) + (m + 1)).astype(np.uint8).reshape(w.shape)


def quantize(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed weights uint8 [..., N, K * bits / 8], scales [..., N, K / block] in w's dtype).

    A stacked [E, N, K] tensor is quantised one expert at a time, so the fp32 temporaries are one
    expert's (an m3-full layer's fc1 is 128 x 6144 x 6144: 18 GiB in fp32 at once, 144 MiB per expert)."""
    if w.ndim == 3:
        parts = [quantize(e, bits, block) for e in w]
        return np.stack([p for p, _ in parts]), np.stack([s for _, s in parts])
    scales = block_scales(w, bits, block)
    return pack(_levels(w, scales, bits, block), bits), scales


def pack(levels: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return levels
    if bits != 4:
        raise ValueError(f"unsupported expert weight bits {bits}")
    return (levels[..., 0::2] | (levels[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def dequantize(packed: np.ndarray, scales: np.ndarray, bits: int, block: int) -> np.ndarray:
    """float32 [..., N, K]: (level - zero point) * scale."""
    levels = unpack(packed, bits).astype(np.float32) - np.float32(qmax(bits) + 1)
    return (_blocks(levels, block) * scales.astype(np.float32)[..., None]).reshape(levels.shape)


def fake_quantize(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """w quantised and dequantised, in w's dtype: the weights the eager reference of QMoE runs with."""
    return dequantize(*quantize(w, bits, block), bits, block).astype(w.dtype)
