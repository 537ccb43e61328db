"""The TensorRT plugin signature (defined once), the functions registered with `tensorrt.plugin`
generated from it, manifest plugin records, the operator-matrix data file, the `export.trt` spec
section and its profiles, and how the TensorRT steps report a machine without TensorRT. Fast: no
export, no TensorRT."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_trt_graphs import TRT_SECTION, trt_spec

import m3export.ops.moe  # noqa: F401  (registers torch.ops.m3.moe)
from m3export.errors import ArtifactError, SpecError
from m3export.export.trt.engine import profile_shapes, resolve_precision, tensorrt_unavailable
from m3export.export.trt.graph_check import load_supported_ops
from m3export.export.trt.rewrites import BOOL_CASTS
from m3export.ops.lowering import get_lowering, lowering_names
from m3export.ops.trt_plugin import (
    check_plugin_records,
    decode_attributes,
    make_plugin_functions,
    plugin_record,
)
from m3export.ops.trt_signature import M3_MOE_PLUGIN
from m3export.spec import M3Spec, load_spec, parse_spec
from m3export.split.plan import plan_subgraphs

SPECS = Path(__file__).resolve().parents[1] / "specs"
NO_TRT = importlib.util.find_spec("tensorrt") is None


def test_signature_is_the_moe_op_signature() -> None:
    """Plugin inputs/attributes are m3::moe's parameters, in order: any lowering can replace the node."""
    args = torch.ops.m3.moe.default._schema.arguments
    tensors = [a.name for a in args if str(a.type) == "Tensor"]
    scalars = [
        (a.name, "int" if str(a.type) in ("int", "SymInt") else "float")
        for a in args
        if str(a.type) != "Tensor"
    ]
    assert list(M3_MOE_PLUGIN.input_names) == tensors
    assert [(a.name, a.kind) for a in M3_MOE_PLUGIN.attributes] == scalars
    assert [p.dtype for p in M3_MOE_PLUGIN.inputs] == ["T", "float32", "float32", "T", "T"]  # router in fp32


def test_lowering_emits_the_signature_node() -> None:
    trt = get_lowering("trt")
    assert "trt" in lowering_names()
    assert trt.custom_nodes == {(M3_MOE_PLUGIN.domain, M3_MOE_PLUGIN.name): 1}
    schema = M3_MOE_PLUGIN.onnx_schema()
    assert [i.name for i in schema.inputs] == list(M3_MOE_PLUGIN.input_names)
    assert set(schema.attributes) == {*M3_MOE_PLUGIN.attribute_names, "plugin_version", "plugin_namespace"}
    attrs = M3_MOE_PLUGIN.node_attributes(
        {"top_k": 4, "routed_scaling_factor": 2, "swiglu_alpha": 1.702, "swiglu_beta": 1, "swiglu_limit": 7}
    )
    assert attrs["top_k"] == 4 and isinstance(attrs["routed_scaling_factor"], float)
    assert (attrs["plugin_version"], attrs["plugin_namespace"]) == ("1", "m3export")
    with pytest.raises(ValueError, match="missing"):
        M3_MOE_PLUGIN.node_attributes({"top_k": 4})
    # TensorRT rejects dots in plugin names/namespaces and reserves these namespaces.
    assert "." not in M3_MOE_PLUGIN.name + M3_MOE_PLUGIN.namespace
    assert M3_MOE_PLUGIN.namespace not in {"", "trt", "tensorrt", "std"}


class _Desc:
    """Stand-ins for tensorrt.plugin's TensorDesc / Tensor / AutoTuneCombination (classes only)."""

    def like(self) -> str:
        return "like-hidden"


class _Tensor:
    pass


class _Combination:
    def __init__(self, spec: str) -> None:
        self.spec = spec


def test_registered_functions_are_generated_from_the_signature() -> None:
    """The parameter schemas `tensorrt.plugin` requires: register (tensors, attributes) -> TensorDesc;
    autotune (tensors, outputs); impl (tensors, attributes, outputs, stream)."""
    register, autotune, impl = make_plugin_functions(_Desc, _Tensor, _Combination)
    tensors, attrs = list(M3_MOE_PLUGIN.input_names), list(M3_MOE_PLUGIN.attribute_names)
    reg = inspect.signature(register)
    assert list(reg.parameters) == tensors + attrs and reg.return_annotation is _Desc
    assert all(reg.parameters[n].annotation is _Desc for n in tensors)
    assert all(reg.parameters[n].default is inspect.Parameter.empty for n in reg.parameters)
    assert reg.parameters["top_k"].annotation == np.typing.NDArray[np.int32]
    assert reg.parameters["swiglu_alpha"].annotation == np.typing.NDArray[np.float32]
    assert list(inspect.signature(autotune).parameters) == [*tensors, "outputs"]
    imp = inspect.signature(impl)
    assert list(imp.parameters) == [*tensors, *attrs, "outputs", "stream"]
    assert all(imp.parameters[a].annotation == reg.parameters[a].annotation for a in attrs)

    descs = [_Desc() for _ in tensors]
    assert register(*descs, *(np.zeros(1) for _ in attrs)) == "like-hidden"
    (combo,) = autotune(*descs, (_Desc(),))
    assert combo.spec == "FP32|FP16|BF16, FP32, FP32, FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16"


def test_decode_attributes_takes_trt_plugin_fields() -> None:
    fields = {"top_k": np.array([2], np.int32)} | {
        n: np.array([v], np.float32)
        for n, v in (
            ("routed_scaling_factor", 2.0),
            ("swiglu_alpha", 1.702),
            ("swiglu_beta", 1.0),
            ("swiglu_limit", 7.0),
        )
    }
    out = decode_attributes(fields)
    assert list(out) == list(M3_MOE_PLUGIN.attribute_names)
    assert out["top_k"] == 2 and isinstance(out["top_k"], int)
    assert out["swiglu_alpha"] == pytest.approx(1.702, rel=1e-7)
    with pytest.raises(ValueError, match="one value"):
        decode_attributes(fields | {"top_k": np.array([2, 3], np.int32)})
    with pytest.raises(ValueError, match="missing"):
        decode_attributes({k: v for k, v in fields.items() if k != "swiglu_limit"})


def test_manifest_plugin_records_are_checked_against_this_signature() -> None:
    rec = plugin_record()
    assert check_plugin_records([rec]) == [M3_MOE_PLUGIN]
    with pytest.raises(ArtifactError, match="rebuild the engines"):
        check_plugin_records([{**rec, "digest": "0" * 64}])
    with pytest.raises(ArtifactError, match="unknown TensorRT plugin"):
        check_plugin_records([{**rec, "id": "other::Plugin"}])
    changed = dataclasses.replace(M3_MOE_PLUGIN, attributes=M3_MOE_PLUGIN.attributes[:-1])
    assert changed.digest() != M3_MOE_PLUGIN.digest()


def test_operator_matrix_data_has_source_and_agrees_with_the_rewrites() -> None:
    ops = load_supported_ops()
    assert ops.source["tensorrt_version"] == "10.15" and ops.opset_range == (9, 24)
    assert "onnx-tensorrt" in ops.source["url"] and ops.source["url"].endswith("docs/operators.md")
    assert len(ops.operators) > 150
    for op in ("MatMul", "Attention", "RMSNormalization", "TopK", "ScatterElements", "Einsum", "Mod"):
        assert ops.supported(op), op
    for op in ("NonZero", "Det", "Unique"):
        assert ops.supported(op) == (op == "NonZero")
    for op, (to, _) in BOOL_CASTS.items():  # each cast exists because the matrix lists no BOOL there
        assert "BOOL" not in ops.types(op) and {"INT32": "INT32", "FLOAT": "FP32"}[to] in ops.types(op), op


def test_trt_spec_section_validates(tiny_spec: M3Spec) -> None:
    full = load_spec(SPECS / "m3-full.yaml")  # targets [onnx, trt] without a trt section: defaults
    assert full.export.trt is not None and resolve_precision(full) == "bf16"
    assert tiny_spec.export.trt is None
    data = tiny_spec.model_dump(mode="json")
    bad_range = {**TRT_SECTION, "profiles": {"seq": {"min": 8, "opt": 4, "max": 64}}}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"targets": ["onnx", "trt"], "trt": bad_range}, "min <= opt <= max"),
        ({"targets": ["onnx"], "trt": TRT_SECTION}, "neither 'trt' nor 'trt_rtx' is in export.targets"),
        ({"targets": ["onnx", "trt_rtx"], "trt": {"compute_capabilities": ["SM90"]}}, "compute_capabilities"),
        ({"targets": ["onnx", "trt_rtx"], "trt": {"compute_capabilities": []}}, "compute_capabilities"),
        (
            {"targets": ["onnx", "trt"], "trt": {"profiles": {"batch": {"min": 0, "opt": 1, "max": 2}}}},
            "batch.min",
        ),
        (
            {
                "targets": ["onnx", "trt"],
                "trt": {"tolerances": {"plugin": {"int8": TRT_SECTION["tolerances"]["engine"]}}},
            },
            "int8",
        ),
    ]
    for export, needle in cases:
        with pytest.raises(SpecError, match=needle):
            parse_spec({**data, "export": {**data["export"], **export}})
    with pytest.raises(SpecError, match="strongly typed"):
        resolve_precision(
            parse_spec(
                {
                    **data,
                    "export": {**data["export"], "targets": ["onnx", "trt"], "trt": {"precision": "fp16"}},
                }
            )
        )


def test_profiles_cover_every_input_dim(tiny_spec: M3Spec, tiny_text_spec: M3Spec) -> None:
    spec = trt_spec(tiny_spec)
    trt = spec.export.trt
    assert trt is not None
    plans = {p.name: p for p in plan_subgraphs(spec)}
    vision = profile_shapes(plans["vision"], trt, spec)
    m2 = spec.vision.spatial_merge_size**2 if spec.vision else 0
    assert (
        vision["pixel_values"][0][0] == m2
        and vision["pixel_values"][2][0] == trt.profiles.image_tokens.max * m2
    )
    text0 = profile_shapes(plans["text_0"], trt, spec)
    assert text0["image_features"][0] == (0, spec.text.hidden_size)  # no image: zero rows
    assert text0["input_ids"] == ((1, 1), (2, 16), (4, 64))
    for plan in plans.values():
        shapes = profile_shapes(plan, trt, spec)
        assert set(shapes) == set(plan.input_names)
        assert all(lo <= opt <= hi for s in shapes.values() for lo, opt, hi in zip(*s, strict=True))
    odd = dataclasses.replace(
        plans["text_1"],
        inputs=(
            *plans["text_1"].inputs[:1],
            dataclasses.replace(plans["text_1"].inputs[1], dims=("batch", "window")),
        ),
    )
    with pytest.raises(SpecError, match="'window'"):
        profile_shapes(odd, trt, spec)


@pytest.mark.skipif(not NO_TRT, reason="tensorrt is installed here")
def test_without_tensorrt_the_engine_steps_say_why(tmp_path: Path) -> None:
    from m3export.ops.trt_plugin import register_plugin
    from m3export.runners.trt_runner import TrtRunner

    reason = tensorrt_unavailable()
    assert reason is not None and "not installed" in reason and "m3export[trt]" in reason
    with pytest.raises(ArtifactError, match="cannot run a TensorRT engine here"):
        TrtRunner(tmp_path / "x.engine", [plugin_record()])
    with pytest.raises(RuntimeError, match=r"TensorRT >= 10\.8"):
        register_plugin()
