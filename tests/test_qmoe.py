"""int8 / int4 experts (issue #14): the block quantiser's format, and the `ort` lowering's
`com.microsoft::QMoE` graphs against the eager op on the dequantised weights and against a float64
transcription that reads the graph's own packed bytes and scales (unpacked here, independently of
m3export/ops/quant.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import m3export.ops.moe  # noqa: F401  (registers torch.ops.m3.moe)
from m3export.export import OnnxArtifact, export_onnx
from m3export.model.moe import StackedExperts, quantise_experts
from m3export.ops import quant
from m3export.ops.lowering import lowering_for
from m3export.ops.lowering_ort import make_ort_lowering
from m3export.spec import PrecisionSpec

ALPHA, BETA, LIMIT = 1.702, 1.0, 7.0
HIDDEN, INTER, EXPERTS, TOP_K = 64, 32, 8, 3


class QBlock(nn.Module):
    """Routed experts as the model holds them (StackedExperts), weights quantised and dequantised."""

    bias: torch.Tensor

    def __init__(self, experts: str, block: int, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.router = nn.Parameter(0.1 * torch.randn(EXPERTS, HIDDEN, generator=g))
        self.register_buffer("bias", 0.5 * torch.randn(EXPERTS, generator=g))
        self.experts = StackedExperts(HIDDEN, INTER, EXPERTS)
        with torch.no_grad():
            self.experts.gate_up_proj.copy_(
                torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) * 2 / HIDDEN**0.5
            )
            self.experts.down_proj.copy_(torch.randn(EXPERTS, HIDDEN, INTER, generator=g) / (4 * INTER**0.5))
        self.experts.to(dtype)
        quantise_experts(self, PrecisionSpec(experts=experts, block_size=block))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        e = self.experts
        return torch.ops.m3.moe(
            hidden_states, self.router, self.bias, e.gate_up_proj, e.down_proj, TOP_K, 2.0, ALPHA, BETA, LIMIT
        )


def _tokens(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (3.0 * torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))).to(dtype)


def _export(block: QBlock, lowering, out: Path, dtype: torch.dtype) -> OnnxArtifact:  # type: ignore[no-untyped-def]
    return export_onnx(
        block,
        {"hidden_states": _tokens(16, seed=99, dtype=dtype)},
        out,
        output_names=["routed"],
        dynamic_axes={"hidden_states": {0: "tokens"}},
        opset=23,
        lowering=lowering,
    )


def _session(path: Path, prepacking: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not prepacking:  # as every m3export session (runners/ort_runner.py)
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _graph_experts(path: Path, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """fc1 [E, 2I, H] (rows interleaved g0, u0, ...) and fc2 [E, H, I] in float64, dequantised from the
    QMoE node's initializers by this test's own reading of the format (low nibble = even input)."""
    model = onnx.load(path)
    (node,) = [n for n in model.graph.node if n.op_type == "QMoE"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    zero = 2 ** (bits - 1)

    def deq(packed_name: str, scales_name: str) -> np.ndarray:
        packed, scales = inits[packed_name], inits[scales_name].astype(np.float64)
        if bits == 4:
            levels = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
        else:
            levels = packed
        q = levels.astype(np.float64) - zero
        return q * np.repeat(scales, block, axis=-1)

    return deq(node.input[2], node.input[3]), deq(node.input[5], node.input[6])


def _float64_qmoe(block: QBlock, fc1: np.ndarray, fc2: np.ndarray, x: np.ndarray) -> np.ndarray:
    """§2.6 routing (float64) with the graph's dequantised experts; fc2 carries the ×2 (folded)."""
    s = 1.0 / (1.0 + np.exp(-(x @ block.router.detach().double().numpy().T)))
    bias = block.bias.double().numpy()
    out = np.zeros((x.shape[0], HIDDEN))
    for t in range(x.shape[0]):
        chosen = np.argsort(-(s[t] + bias), kind="stable")[:TOP_K]
        for e, w in zip(chosen, s[t, chosen] / s[t, chosen].sum(), strict=True):
            h = fc1[e] @ x[t]
            g, u = np.minimum(h[0::2], LIMIT), np.clip(h[1::2], -LIMIT, LIMIT)
            out[t] += w * (fc2[e] @ (g / (1.0 + np.exp(-ALPHA * g)) * (u + BETA)))
    return out


def test_quantiser_format() -> None:
    """Symmetric blocks, levels stored + 2^(bits-1), int4 packed low nibble first, zero blocks exact."""
    w = np.array([[0.0] * 16 + [7.0, -7.0, 3.5, 1.0] + [0.0] * 12], dtype=np.float32)  # [1, 32]
    packed, scales = quant.quantize(w, 4, 16)
    assert scales.tolist() == [[0.0, 1.0]]
    assert packed.shape == (1, 16) and packed.dtype == np.uint8
    assert packed[0, :8].tolist() == [0x88] * 8  # zero block: level 8 (q 0) in both nibbles
    # inputs 16, 17 -> q 7, -7 -> levels 15, 1: low nibble 15, high nibble 1; 3.5 -> 4 (half to even)
    assert packed[0, 8] == 0x1F and packed[0, 9] == (8 + 1) << 4 | (8 + 4)
    p8, s8 = quant.quantize(w, 8, 32)
    assert s8.tolist() == [[np.float32(7.0) / np.float32(127)]] and p8[0, 16] == 255 and p8[0, 17] == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantiser_error_bound_and_requantisation(bits: int, dtype: type) -> None:
    """Every weight within half a step of its block's scale; quantising the dequantised weights again
    (what the lowering does with the eager model's weights) gives back the same levels."""
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((4, 24, 64)) * rng.uniform(0.01, 3.0, (4, 24, 1))).astype(dtype)
    w[0, 0, :32] = 0  # an all-zero block
    packed, scales = quant.quantize(w, bits, 32)
    deq = quant.dequantize(packed, scales, bits, 32)
    step = np.repeat(scales.astype(np.float32), 32, axis=-1)
    assert np.all(np.abs(deq - w.astype(np.float32)) <= 0.5 * step * (1 + 1e-3) + 1e-7)
    assert np.all(deq[0, 0, :32] == 0)
    again, rescales = quant.quantize(deq.astype(dtype), bits, 32)
    assert np.array_equal(again, packed)
    np.testing.assert_allclose(rescales.astype(np.float32), scales.astype(np.float32), rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("experts", "block"), [("int4", 16), ("int4", 32), ("int8", 32)])
def test_qmoe_lowering_matches_eager_and_float64(
    tmp_path: Path, experts: str, block: int, dtype: torch.dtype
) -> None:
    bits = quant.BITS[experts]
    qblock = QBlock(experts, block, dtype).eval()
    art = _export(qblock, make_ort_lowering(quant=(bits, block)), tmp_path / "q.onnx", dtype)
    model = onnx.load(art.path, load_external_data=False)
    custom = [(n.domain, n.op_type) for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert custom == [("com.microsoft", "QMoE")]
    assert {o.domain for o in model.opset_import} == {"", "com.microsoft"}  # the fold domain is gone
    fc1, fc2 = _graph_experts(art.path, bits, block)
    sess = _session(art.path)
    for n in (1, 5, 37):
        x = _tokens(n, seed=n, dtype=dtype)
        got = sess.run(None, {"hidden_states": x.numpy()})[0].astype(np.float64)
        with torch.no_grad():
            eager = qblock(x).double().numpy()
        want = _float64_qmoe(qblock, fc1, fc2, x.double().numpy())
        scale = np.abs(want).max()
        # fp32: summation order only; fp16: the activations' rounding (docs/precision.md).
        tol = 2e-6 if dtype == torch.float32 else 2e-3
        assert np.abs(got - want).max() <= tol * scale, f"{experts}/{block} T={n}: vs float64"
        assert np.abs(got - eager).max() <= 2 * tol * scale, f"{experts}/{block} T={n}: vs eager"


def test_int8_blocks_quantise_activations_when_onnxruntime_prepacks(tmp_path: Path) -> None:
    """Measured on onnxruntime 1.32 CPU (docs/precision.md): with weight prepacking on (ONNX Runtime's
    default) block-wise int8 experts also quantise the activations to int8 per block, ~1% of the
    output; int4 keeps fp32 activations. m3export's sessions disable prepacking, so they compute the
    weight-only op the eager reference does. If this starts failing, ORT changed the kernel: re-measure."""
    errs = {}
    for experts in ("int8", "int4"):
        bits = quant.BITS[experts]
        qblock = QBlock(experts, 32, torch.float32).eval()
        art = _export(
            qblock, make_ort_lowering(quant=(bits, 32)), tmp_path / f"{experts}.onnx", torch.float32
        )
        x = _tokens(37, seed=5)
        with torch.no_grad():
            eager = qblock(x).numpy()
        got = _session(art.path, prepacking=True).run(None, {"hidden_states": x.numpy()})[0]
        errs[experts] = float(np.abs(got - eager).max() / np.abs(eager).max())
    assert 1e-3 < errs["int8"] < 0.05 and errs["int4"] < 1e-5, errs


def test_planted_scale_layout_bug_is_caught(tmp_path: Path) -> None:
    """Scales laid out [E, K/block, N] and read as [E, N, K/block]: the graph loads and runs, and is
    wrong by the output's scale."""
    qblock = QBlock("int4", 16, torch.float32).eval()
    lowering = make_ort_lowering(quant=(4, 16), scales_n_major=False)
    art = _export(qblock, lowering, tmp_path / "bug.onnx", torch.float32)
    x = _tokens(37, seed=5)
    with torch.no_grad():
        eager = qblock(x).numpy()
    got = _session(art.path).run(None, {"hidden_states": x.numpy()})[0]
    assert np.abs(got - eager).max() > 0.1 * np.abs(eager).max()


def test_only_the_ort_lowering_has_a_quantised_form(tiny_spec) -> None:  # type: ignore[no-untyped-def]
    from m3export.errors import SpecError
    from m3export.spec import M3Spec

    data = tiny_spec.model_dump(mode="json")
    data["export"]["precision"]["experts"] = "int4"
    data.pop("tolerances")
    spec = M3Spec.model_validate(data)
    lowering = lowering_for(spec)
    assert lowering.name == "ort" and lowering.custom_nodes == {("com.microsoft", "QMoE"): 1}
    portable = M3Spec.model_validate({**data, "export": {**data["export"], "moe": "portable"}})
    with pytest.raises(SpecError, match=r"^export.precision.experts 'int4': the 'portable' MoE lowering"):
        lowering_for(portable)
    assert dataclasses.replace(lowering).quantised is None  # no quantised form of a quantised one
