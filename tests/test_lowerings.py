"""Lowerings of `m3::moe`: exported graphs run in onnxruntime (CPU) at token counts other than the
trace shape and match the eager op and an independent float64 numpy transcription of §2.5-2.6."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import m3export.ops.moe  # noqa: F401  (registers torch.ops.m3.moe)
from m3export.errors import SpecError
from m3export.export import OnnxArtifact, export_onnx
from m3export.ops.lowering import MoELowering, get_lowering, lowering_names, register_lowering
from m3export.ops.lowering_ort import make_ort_lowering

ALPHA, BETA, LIMIT = 1.702, 1.0, 7.0
HIDDEN, INTER = 32, 24
TRACE_TOKENS = 16
RUN_TOKENS = (1, 5, 37, 200)  # none equals the trace shape
ATOL = 1e-5  # fp32, max abs; outputs reach ~15


class MoEBlock(nn.Module):
    """Routed experts plus a residual, weights laid out as m3::moe takes them."""

    correction_bias: torch.Tensor

    def __init__(self, num_experts: int, top_k: int, scale: float, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.top_k, self.scale = top_k, scale
        self.router_weight = nn.Parameter(0.1 * torch.randn(num_experts, HIDDEN, generator=g))
        self.register_buffer("correction_bias", 0.5 * torch.randn(num_experts, generator=g))
        # At inputs of scale 3 the gate/up pre-activations reach well past ±7: both clamps act.
        self.gate_up_proj = nn.Parameter(
            torch.randn(num_experts, 2 * INTER, HIDDEN, generator=g) * 2 / HIDDEN**0.5
        )
        self.down_proj = nn.Parameter(torch.randn(num_experts, HIDDEN, INTER, generator=g) / (4 * INTER**0.5))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        routed = torch.ops.m3.moe(
            hidden_states,
            self.router_weight,
            self.correction_bias,
            self.gate_up_proj,
            self.down_proj,
            self.top_k,
            self.scale,
            ALPHA,
            BETA,
            LIMIT,
        )
        return routed, hidden_states + routed


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def reference_moe(block: MoEBlock, x: np.ndarray) -> np.ndarray:
    """§2.6 in float64, token by token."""
    w_r, bias, gate_up, down = (
        t.detach().double().numpy()
        for t in (block.router_weight, block.correction_bias, block.gate_up_proj, block.down_proj)
    )
    x = x.astype(np.float64)
    out = np.zeros_like(x)
    s = _sigmoid(x @ w_r.T)
    for t in range(x.shape[0]):
        chosen = np.argsort(-(s[t] + bias), kind="stable")[: block.top_k]
        weights = s[t, chosen] / s[t, chosen].sum() * block.scale
        for e, w in zip(chosen, weights, strict=True):
            h = gate_up[e] @ x[t]
            g = np.minimum(h[:INTER], LIMIT)
            u = np.clip(h[INTER:], -LIMIT, LIMIT)
            out[t] += w * (down[e] @ (g * _sigmoid(ALPHA * g) * (u + BETA)))
    return out


def _tokens(n: int, seed: int) -> np.ndarray:
    return (3.0 * torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))).numpy()


def _export(block: MoEBlock, lowering: MoELowering, out: Path) -> OnnxArtifact:
    return export_onnx(
        block,
        {"hidden_states": torch.from_numpy(_tokens(TRACE_TOKENS, seed=99))},
        out,
        output_names=["routed", "hidden_out"],
        dynamic_axes={"hidden_states": {0: "tokens"}},
        opset=23,
        lowering=lowering,
    )


def _run(art: OnnxArtifact, x: np.ndarray) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(art.path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"hidden_states": x}), strict=True))


def _max_err_vs_eager(block: MoEBlock, art: OnnxArtifact, n: int) -> float:
    x = _tokens(n, seed=n)
    got = _run(art, x)
    with torch.no_grad():
        want = block(torch.from_numpy(x))
    return float(np.abs(got["routed"] - want[0].numpy()).max())


CASES = {"E8k3": (8, 3), "E4k2": (4, 2)}


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[str, str], tuple[MoEBlock, OnnxArtifact]]:
    out = tmp_path_factory.mktemp("lowerings")
    result = {}
    for case, (num_experts, k) in CASES.items():
        block = MoEBlock(num_experts, k, scale=2.0, seed=num_experts).eval()
        for name in ("ort", "portable"):
            result[case, name] = (block, _export(block, get_lowering(name), out / f"{case}-{name}.onnx"))
    return result


def _check_case_exercises_routing_and_clamp(block: MoEBlock, x: np.ndarray) -> None:
    with torch.no_grad():
        xs = torch.from_numpy(x).double()
        s = torch.sigmoid(xs @ block.router_weight.double().t())
        biased = s + block.correction_bias.double()
        pre = torch.einsum("eoh,th->teo", block.gate_up_proj.double(), xs)
    k = block.top_k
    sets = [
        (frozenset(a), frozenset(b))
        for a, b in zip(s.topk(k).indices.tolist(), biased.topk(k).indices.tolist(), strict=True)
    ]
    changed = sum(a != b for a, b in sets)
    assert changed > len(sets) // 2, f"the bias changes the selection of only {changed}/{len(sets)} tokens"
    top = biased.topk(k + 1).values if k < biased.shape[1] else None
    if top is not None:
        assert (top[:, k - 1] - top[:, k]).min() > 1e-5, "near-tie in the top-k: fp32 may legitimately differ"
    assert (pre[..., :INTER] > LIMIT).double().mean() > 0.05, "gate clamp not exercised"
    assert (pre[..., INTER:].abs() > LIMIT).double().mean() > 0.05, "up clamp not exercised"


@pytest.mark.parametrize("name", ["ort", "portable"])
@pytest.mark.parametrize("case", list(CASES))
def test_lowering_matches_eager_and_float64_reference(exported: Any, case: str, name: str) -> None:
    block, art = exported[case, name]
    for n in RUN_TOKENS:
        x = _tokens(n, seed=n)
        if n >= 37:
            _check_case_exercises_routing_and_clamp(block, x)
        got = _run(art, x)
        with torch.no_grad():
            eager_routed, eager_out = (t.numpy() for t in block(torch.from_numpy(x)))
        want = reference_moe(block, x)
        err_eager = np.abs(got["routed"] - eager_routed).max()
        err_ref = np.abs(got["routed"] - want).max()
        err_eager_ref = np.abs(eager_routed - want).max()
        scale = np.abs(want).max()
        assert got["routed"].shape == (n, HIDDEN)
        assert err_eager <= ATOL, f"{name}/{case} T={n}: vs eager {err_eager:.3g} (output scale {scale:.3g})"
        # The lowering is no further from float64 than the eager op plus the ORT-vs-eager gap.
        assert err_ref <= max(err_eager_ref, ATOL) + err_eager, (
            f"{name}/{case} T={n}: vs float64 {err_ref:.3g}"
        )
        np.testing.assert_allclose(got["hidden_out"], eager_out, atol=ATOL, rtol=0)


def test_ort_graph_has_exactly_one_contrib_moe(exported: Any) -> None:
    for case, (num_experts, k) in CASES.items():
        _, art = exported[case, "ort"]
        model = onnx.load(art.path, load_external_data=False)
        custom = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
        assert [(n.domain, n.op_type) for n in custom] == [("com.microsoft", "MoE")]
        assert not model.functions
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in custom[0].attribute}
        assert attrs == {
            "k": k,
            "activation_type": b"swiglu",
            "swiglu_fusion": 1,
            "activation_alpha": pytest.approx(ALPHA),
            "activation_beta": pytest.approx(BETA),
            "swiglu_limit": pytest.approx(LIMIT),
            "normalize_routing_weights": 0,
            "use_sparse_mixer": 0,
        }
        # Interleave and ×2 are folded: the MoE weights are initializers, not computed per run.
        inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
        assert inits[custom[0].input[2]] == (num_experts, 2 * INTER, HIDDEN)
        assert inits[custom[0].input[4]] == (num_experts, HIDDEN, INTER)
        assert custom[0].input[3] == ""  # no fc1 bias
        assert art.data_path is not None and art.data_path.stat().st_size > art.path.stat().st_size


def test_folded_weights_equal_the_transforms_applied_in_numpy(exported: Any) -> None:
    """The interleave (ort), ×scale (ort) and transposes (portable) are folded into initializers at
    save time (lazily, one tensor at a time); their bytes equal the transforms written in numpy."""
    for case in CASES:
        for name in ("ort", "portable"):
            block, art = exported[case, name]
            gate_up = block.gate_up_proj.detach().numpy()
            down = block.down_proj.detach().numpy()
            two_i = gate_up.shape[1]
            if name == "ort":
                interleaved = np.empty_like(gate_up)
                interleaved[:, 0::2], interleaved[:, 1::2] = (
                    gate_up[:, : two_i // 2],
                    gate_up[:, two_i // 2 :],
                )
                expected = [interleaved, down * 2.0]
            else:
                expected = [gate_up.transpose(0, 2, 1), down.transpose(0, 2, 1)]
            model = onnx.load(art.path)
            weights = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer]
            for want in expected:
                assert any(w.shape == want.shape and np.array_equal(w, want) for w in weights), (case, name)


def test_export_keeps_no_reference_to_the_weights(tmp_path: Path) -> None:
    """After export returns, nothing (onnxscript's rewrite rules included) holds the module's
    weights: a stage-at-a-time build releases each subgraph's weights before the next."""
    import gc
    import weakref

    block = MoEBlock(4, 2, scale=2.0, seed=3).eval()
    refs = [weakref.ref(p) for p in block.parameters()]
    _export(block, get_lowering("ort"), tmp_path / "m.onnx")
    del block
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


def test_portable_graph_uses_only_the_default_domain(exported: Any) -> None:
    for case in CASES:
        _, art = exported[case, "portable"]
        model = onnx.load(art.path, load_external_data=False)
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        assert not model.functions


@pytest.mark.parametrize(
    ("bug", "kwargs"),
    [
        ("concatenated fc1", {"interleave_gate_up": False}),
        ("scaling dropped", {"apply_routed_scaling": False}),
    ],
)
def test_planted_bug_is_caught_by_parity(tmp_path: Path, bug: str, kwargs: dict[str, bool]) -> None:
    block = MoEBlock(8, 3, scale=2.0, seed=8).eval()
    art = _export(block, make_ort_lowering(**kwargs), tmp_path / "bug.onnx")
    err = _max_err_vs_eager(block, art, 37)
    assert err > 1e3 * ATOL, f"planted bug '{bug}' gave only {err:.3g} max abs error"


def test_non_power_of_two_scale_is_applied_after_the_op(tmp_path: Path) -> None:
    block = MoEBlock(8, 3, scale=2.5, seed=8).eval()
    art = _export(block, get_lowering("ort"), tmp_path / "scale.onnx")
    model = onnx.load(art.path, load_external_data=False)
    moe_out = next(n.output[0] for n in model.graph.node if n.op_type == "MoE")
    assert [n.op_type for n in model.graph.node if moe_out in n.input] == ["Mul"]
    for n in RUN_TOKENS:
        assert _max_err_vs_eager(block, art, n) <= ATOL


def test_a_plugin_lowering_is_one_more_entry(tmp_path: Path) -> None:
    """What a TensorRT plugin lowering needs: a translate emitting its node, nothing else."""
    from onnx.defs import OpSchema
    from onnxscript import values

    schema = OpSchema(
        "M3MoE",
        "trt.plugins",
        1,
        inputs=[OpSchema.FormalParameter(n, "T") for n in ("hidden", "router_weight", "bias", "fc1", "fc2")],
        outputs=[OpSchema.FormalParameter("out", "T")],
        type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[OpSchema.Attribute("top_k", OpSchema.AttrType.INT, required=False)],
    )
    plugin = values.Op(values.Opset("trt.plugins", 1), "M3MoE", op_schema=schema)

    def translate(hidden, router_weight, bias, gate_up, down, top_k, *_):  # type: ignore[no-untyped-def]
        return plugin(hidden, router_weight, bias, gate_up, down, top_k=top_k)

    lowering = MoELowering(
        name="trt-demo", summary="demo", translate=translate, custom_nodes={("trt.plugins", "M3MoE"): 1}
    )
    art = _export(MoEBlock(4, 2, scale=2.0, seed=1).eval(), lowering, tmp_path / "plugin.onnx")
    assert art.node_counts["trt.plugins::M3MoE"] == 1


def test_registry_names_and_errors() -> None:
    assert {"ort", "portable"} <= set(lowering_names())
    assert get_lowering("ort").custom_nodes == {("com.microsoft", "MoE"): 1}
    assert get_lowering("portable").custom_nodes == {}
    with pytest.raises(SpecError, match=r"accepted values: .*ort.*portable"):
        get_lowering("tensorrt-typo")
    with pytest.raises(ValueError, match="already registered"):
        register_lowering(get_lowering("ort"))


def _float16_block(num_experts: int, k: int, seed: int) -> MoEBlock:
    """The block in fp16 with the router weight and correction bias kept fp32, as the model keeps them
    (m3-architecture.md §2.7; m3export/model/moe.py)."""
    block = MoEBlock(num_experts, k, scale=2.0, seed=seed).eval().half()
    block.router_weight.data = block.router_weight.data.float()
    block.correction_bias = block.correction_bias.float()
    return block


@pytest.mark.parametrize("name", ["ort", "portable"])
def test_float16_lowering_matches_float16_eager_and_float64(tmp_path: Path, name: str) -> None:
    """An fp16 graph (export.precision.dtype float16): fp16 expert weights in the file, the router in
    fp32, and ORT's fp16 kernels within fp16 rounding of the fp16 eager op and of float64 on the same
    (fp16-rounded) weights. A wrong layout is off by the output's whole scale."""
    block = _float16_block(8, 3, seed=8)
    art = export_onnx(
        block,
        {"hidden_states": torch.from_numpy(_tokens(TRACE_TOKENS, seed=99)).half()},
        tmp_path / f"{name}.onnx",
        output_names=["routed", "hidden_out"],
        dynamic_axes={"hidden_states": {0: "tokens"}},
        opset=23,
        lowering=get_lowering(name),
    )
    graph = onnx.load(art.path, load_external_data=False)
    big = {t.name: t.data_type for t in graph.graph.initializer if np.prod(t.dims) >= 8 * HIDDEN}
    assert onnx.TensorProto.FLOAT16 in big.values(), big
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    for n in (5, 200):
        x = _tokens(n, seed=n).astype(np.float16)
        _check_case_exercises_routing_and_clamp(block, x.astype(np.float32))
        got = _run(art, x)["routed"].astype(np.float64)
        with torch.no_grad():
            eager = block(torch.from_numpy(x))[0].double().numpy()
        want = reference_moe(block, x)
        scale = np.abs(want).max()
        vs_eager, vs_ref = np.abs(got - eager).max() / scale, np.abs(got - want).max() / scale
        # fp16 carries 11 bits (eps 2^-11 = 4.9e-4): a few roundings of the output scale.
        assert vs_eager <= 4e-3, f"{name} T={n}: vs fp16 eager {vs_eager:.3g} of the scale {scale:.3g}"
        assert vs_ref <= 4e-3, f"{name} T={n}: vs float64 {vs_ref:.3g} of the scale {scale:.3g}"
