"""TensorRT on a GPU (`pytest -m trt`): engine builds, the plugin inside an engine vs the eager op at
fp32 / bf16 / fp16 I/O, and chained engines end to end. Skipped, with the reason, where TensorRT or a
CUDA GPU is missing (e.g. CI). Tolerances come from the spec section in tests/test_trt_graphs.py;
a precision without a tolerance there is not checked.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from test_lowerings import RUN_TOKENS, MoEBlock, _tokens
from test_trt_graphs import eager_outputs, export_both, feed_for, trt_spec

from m3export.export.onnx_export import export_onnx
from m3export.export.trt.engine import build_engine, tensorrt_unavailable
from m3export.ops.lowering import get_lowering
from m3export.ops.trt_plugin import plugin_record
from m3export.parity.compare import compare_output, compare_outputs
from m3export.spec import M3Spec
from m3export.split.plan import plan_subgraphs

REASON = tensorrt_unavailable()
pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(REASON is not None, reason=f"needs TensorRT and a GPU: {REASON}"),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _block(dtype: torch.dtype) -> MoEBlock:
    """The lowering tests' MoE block with experts in `dtype`, router weight and bias kept in fp32."""
    block = MoEBlock(8, 3, scale=2.0, seed=8).eval().to(dtype)
    block.router_weight.data = block.router_weight.data.float()
    block.correction_bias = block.correction_bias.float()
    return block


@pytest.mark.parametrize("precision", list(DTYPES))
def test_plugin_in_an_engine_matches_the_eager_op(
    tmp_path: Path, tiny_text_spec: M3Spec, precision: str
) -> None:
    from m3export.runners.trt_runner import TrtRunner

    trt = trt_spec(tiny_text_spec).export.trt
    assert trt is not None
    tol = trt.tolerances.plugin.get(precision)  # type: ignore[call-overload]  (str key)
    if tol is None:
        pytest.skip(f"no export.trt.tolerances.plugin.{precision}")
    dtype = DTYPES[precision]
    block = _block(dtype)
    hidden = block.router_weight.shape[1]
    trace = {"hidden_states": torch.from_numpy(_tokens(16, seed=99)).to(dtype)}
    art = export_onnx(
        block,
        trace,
        tmp_path / "moe.trt.onnx",
        output_names=["routed", "hidden_out"],
        dynamic_axes={"hidden_states": {0: "tokens"}},
        opset=23,
        lowering=get_lowering("trt"),
    )
    engine = build_engine(
        art.path,
        tmp_path / "moe.engine",
        {"hidden_states": ((1, hidden), (64, hidden), (256, hidden))},
        precision=precision,
        timing_cache=tmp_path / "timing.cache",
    )
    runner = TrtRunner(engine.path, [plugin_record()])
    reference = copy.deepcopy(block).float()  # the same (rounded) weights, computed in fp32
    for n in RUN_TOKENS:
        x = torch.from_numpy(_tokens(n, seed=n)).to(dtype)
        got = runner.infer({"hidden_states": x.float().numpy()})["routed"]
        with torch.no_grad():
            want = reference(x.float())[0].numpy()
        rep = compare_output("routed", got, want, tol, "tensor")
        assert rep.passed, f"{precision} T={n}: {rep.failures}"


def test_engine_build_records_engine_and_passes_engine_parity(tiny_text_spec: M3Spec, tmp_path: Path) -> None:
    spec = trt_spec(tiny_text_spec, [[0, 3], [3, 4]])
    _plan, res, _, said = export_both(spec, "text_1", tmp_path)
    assert res.engine_status == "built", res.engine_reason
    assert res.engine is not None and res.engine.path.is_file() and res.engine.timing_cache.is_file()
    engine_reports = [r for r in res.reports if r.step == "trt_engine"]
    assert engine_reports and all(r.passed for r in engine_reports), [r.failures() for r in engine_reports]
    assert res.status == "pass" and res.manifest_entry()["engine"]["status"] == "built"
    assert any("[trt engine] text_1: built" in m for m in said)


def test_chained_engines_match_the_chained_eager_stages(tiny_text_spec: M3Spec, tmp_path: Path) -> None:
    from m3export.model.factory import load_model
    from m3export.runners.trt_runner import TrtRunner
    from m3export.split.subgraphs import build_stage

    spec = trt_spec(tiny_text_spec)
    trt = spec.export.trt
    assert trt is not None and trt.tolerances.engine is not None
    model = load_model(spec)
    plans = plan_subgraphs(spec)
    runners, stages = {}, {}
    for plan in plans:
        _, res, _, _ = export_both(spec, plan.name, tmp_path)
        assert res.status == "pass", res.manifest_entry()
        assert res.engine is not None
        runners[plan.name] = TrtRunner(res.engine.path, res.manifest_entry()["plugins"])
        stages[plan.name] = build_stage(model, plan)
    batch, seq = 2, 40  # other than the profiles' opt shapes; seq 40 drops MSA blocks
    extra = {k: v.numpy() for p in plans for k, v in feed_for(p, spec, batch, seq, 0, seed=3).items()}
    eager_vals, engine_vals = dict(extra), dict(extra)
    for plan in plans:
        eager_vals.update(
            eager_outputs(stages[plan.name], plan, {n: eager_vals[n] for n in plan.input_names})
        )
        engine_vals.update(runners[plan.name].infer({n: engine_vals[n] for n in plan.input_names}))
    finals = [n for n in eager_vals if "logits" in n]
    assert finals
    rep = compare_outputs(
        "trt_end_to_end",
        "pipeline",
        f"b{batch}_s{seq}",
        {n: np.asarray(engine_vals[n]) for n in finals},
        {n: eager_vals[n] for n in finals},
        trt.tolerances.engine,
        {n: "logits" for n in finals},
    )
    assert rep.passed, rep.failures()
