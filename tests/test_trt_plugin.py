"""The plugin's compute function on CPU: fed the attributes exactly as TensorRT hands them over
(1-element int32 / float32 plugin fields, read from the exported plugin node) and the node's own
weight initializers, it equals the eager `m3::moe` and an independent float64 numpy reference
(tests/test_lowerings.py), at token counts other than the trace shape. On a GPU the same function
runs inside the engine (tests/test_trt_gpu.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_lowerings import (
    ATOL,
    RUN_TOKENS,
    MoEBlock,
    _check_case_exercises_routing_and_clamp,
    _export,
    _tokens,
    reference_moe,
)

from m3export.ops.lowering import get_lowering
from m3export.ops.trt_plugin import plugin_compute
from m3export.ops.trt_signature import M3_MOE_PLUGIN


def plugin_inputs(path: Path) -> tuple[onnx.NodeProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(plugin node, its weight initializers by name, its attributes as TensorRT plugin fields)."""
    model = onnx.load(path)
    (node,) = [n for n in model.graph.node if n.op_type == M3_MOE_PLUGIN.name]
    weights = {
        i.name: np.array(numpy_helper.to_array(i)) for i in model.graph.initializer if i.name in node.input
    }
    fields = {
        a.name: np.array(
            [onnx.helper.get_attribute_value(a)],
            np.int32 if a.type == onnx.AttributeProto.INT else np.float32,
        )
        for a in node.attribute
        if a.name in M3_MOE_PLUGIN.attribute_names
    }
    return node, weights, fields


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[MoEBlock, Any]:
    block = MoEBlock(8, 3, scale=2.0, seed=8).eval()
    art = _export(block, get_lowering("trt"), tmp_path_factory.mktemp("plugin") / "moe.trt.onnx")
    return block, plugin_inputs(art.path)


def _run(
    node: onnx.NodeProto, weights: dict[str, np.ndarray], fields: dict[str, np.ndarray], x: np.ndarray
) -> np.ndarray:
    tensors = [torch.from_numpy(x)] + [torch.from_numpy(weights[n]) for n in node.input[1:]]
    return plugin_compute(tensors, fields).numpy()


def test_plugin_compute_equals_the_eager_op_and_the_float64_reference(exported: Any) -> None:
    block, (node, weights, fields) = exported
    assert fields["top_k"].dtype == np.int32 and fields["swiglu_alpha"].dtype == np.float32
    for n in RUN_TOKENS:
        x = _tokens(n, seed=n)
        if n >= 37:
            _check_case_exercises_routing_and_clamp(block, x)
        got = _run(node, weights, fields, x)
        with torch.no_grad():
            eager = block(torch.from_numpy(x))[0].numpy()
        want = reference_moe(block, x)
        err_eager, err_ref = np.abs(got - eager).max(), np.abs(got - want).max()
        assert got.shape == (n, x.shape[1]) and got.dtype == np.float32
        assert err_eager <= ATOL, f"T={n}: plugin vs eager {err_eager:.3g}"
        assert err_ref <= max(np.abs(eager - want).max(), ATOL) + err_eager, (
            f"T={n}: vs float64 {err_ref:.3g}"
        )


@pytest.mark.parametrize(
    ("field", "value"), [("swiglu_limit", 1e4), ("routed_scaling_factor", 1.0), ("top_k", 2)]
)
def test_a_wrong_plugin_field_is_visible(exported: Any, field: str, value: float) -> None:
    """The comparison above is sensitive to every constant the plugin receives."""
    block, (node, weights, fields) = exported
    x = _tokens(37, seed=37)
    bad = dict(fields, **{field: np.array([value], fields[field].dtype)})
    with torch.no_grad():
        eager = block(torch.from_numpy(x))[0].numpy()
    assert np.abs(_run(node, weights, bad, x) - eager).max() > 1e3 * ATOL
