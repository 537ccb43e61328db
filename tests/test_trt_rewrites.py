"""The TensorRT-specific rewrites on small hand-built graphs: each turns a node the parser's operator
matrix rejects into accepted ones, and onnxruntime computes bit-identical outputs before and after
(the shapes the M3 subgraphs produce: MSA bool scatter / compare, splice NonZero, vision 2-D mask)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from m3export.export.trt.graph_check import check_trt_graph
from m3export.export.trt.rewrites import CAST_BOOL, MASK_4D, REWRITE_KEY, apply_trt_rewrites


def _model(
    nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _rewrite_and_compare(
    model: onnx.ModelProto, feed: dict[str, np.ndarray]
) -> tuple[list[str], onnx.ModelProto]:
    before = check_trt_graph(model)
    want = _run(model, feed)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    done = apply_trt_rewrites(rewritten)
    onnx.checker.check_model(rewritten, full_check=True)
    assert not before.passed and check_trt_graph(rewritten).passed, check_trt_graph(rewritten).issues
    for w, g in zip(want, _run(rewritten, feed), strict=True):
        assert w.dtype == g.dtype and np.array_equal(w, g)
    return [f"{r.rule}:{r.op}" for r in done], rewritten


def test_bool_inputs_are_cast_where_the_matrix_lists_no_bool() -> None:
    nodes = [
        helper.make_node("Equal", ["a", "b"], ["eq"], name="eq"),
        helper.make_node("ScatterElements", ["data", "idx", "upd"], ["sc"], name="sc", axis=1),
        helper.make_node("NonZero", ["mask"], ["nz"], name="nz"),
    ]
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.BOOL, [4, 5]),
        helper.make_tensor_value_info("b", TensorProto.BOOL, [4, 5]),
        helper.make_tensor_value_info("data", TensorProto.BOOL, [4, 5]),
        helper.make_tensor_value_info("idx", TensorProto.INT64, [4, 2]),
        helper.make_tensor_value_info("upd", TensorProto.BOOL, [4, 2]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, [3, 6]),
    ]
    rng = np.random.default_rng(0)
    feed = {
        n: rng.random(s) > 0.5
        for n, s in (("a", (4, 5)), ("b", (4, 5)), ("data", (4, 5)), ("upd", (4, 2)), ("mask", (3, 6)))
    }
    feed["idx"] = np.stack([rng.permutation(5)[:2] for _ in range(4)]).astype(np.int64)
    done, model = _rewrite_and_compare(
        _model(
            nodes,
            inputs,
            [
                helper.make_tensor_value_info("eq", TensorProto.BOOL, [4, 5]),
                helper.make_tensor_value_info("sc", TensorProto.BOOL, [4, 5]),
                helper.make_tensor_value_info("nz", TensorProto.INT64, [2, None]),
            ],
        ),
        feed,
    )
    assert done == [f"{CAST_BOOL}:Equal", f"{CAST_BOOL}:ScatterElements", f"{CAST_BOOL}:NonZero"]
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2 + 2 + 1 + 1  # Equal's two inputs, scatter's data/updates and back, NonZero's
    assert all(any(p.key == REWRITE_KEY for p in n.metadata_props) for n in casts)


def test_two_dimensional_attention_mask_is_made_four_dimensional() -> None:
    shape = [1, 2, 6, 8]
    nodes = [helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], name="attn")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [6, 6]))
    rng = np.random.default_rng(1)
    feed = {n: rng.standard_normal(shape).astype(np.float32) for n in "qkv"}
    feed["mask"] = np.kron(np.eye(2, dtype=bool), np.ones((3, 3), dtype=bool))  # block-diagonal, as in vision
    done, model = _rewrite_and_compare(
        _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]), feed
    )
    assert done == [f"{MASK_4D}:Attention"]
    unsqueeze = next(n for n in model.graph.node if n.op_type == "Unsqueeze")
    assert unsqueeze.output[0] == next(n for n in model.graph.node if n.op_type == "Attention").input[3]


def test_graphs_the_matrix_accepts_are_left_alone() -> None:
    nodes = [helper.make_node("Equal", ["a", "b"], ["eq"], name="eq")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, [3]) for n in "ab"]
    model = _model(nodes, inputs, [helper.make_tensor_value_info("eq", TensorProto.BOOL, [3])])
    assert apply_trt_rewrites(model) == [] and [n.op_type for n in model.graph.node] == ["Equal"]
