"""The M3 MoE plugin for TensorRT-RTX: an `IPluginV3` (core / build / runtime capabilities) with an
`IPluginCreatorV3One` creator, generated from `M3_MOE_PLUGIN` (trt_signature.py).

Why a second plugin class: TensorRT-RTX accepts only `IPluginCreatorV3One` creators and its wheels
have no `tensorrt.plugin` module, so the decorator plugin of trt_plugin.py (datacenter TensorRT)
cannot register there. Both are driven by the one signature: the same inputs, dtype rules,
attributes and the same compute function, `plugin_compute` (the eager `m3::moe` op) on the engine's
device buffers wrapped zero-copy as torch CUDA tensors.

The classes are made by `plugin_classes(trt)` from the bindings module passed in, so nothing here
imports TensorRT-RTX at import time. The builder calls the build-time methods on CPU (output types
and shapes, format combinations, configure, workspace, tactics, serialised fields); `enqueue` runs
only in an execution context, which m3export creates only on a GPU.

Attribute fields are checked when TensorRT creates the plugin: each must be present, hold one value
and have the signature's type (INT32 for `int`, FLOAT32 for `float`, as the ONNX parser passes INT /
FLOAT attributes). Anything else raises, so the parser refuses the node and the build fails there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from m3export.ops.trt_plugin import decode_attributes, plugin_compute
from m3export.ops.trt_signature import M3_MOE_PLUGIN, PluginSignature

_FIELD_TYPE = {"int": "INT32", "float": "FLOAT32"}  # PluginFieldType member per signature kind
_FIELD_NUMPY = {"int": np.int32, "float": np.float32}


def check_fields(fields: dict[str, tuple[str, np.ndarray]], sig: PluginSignature = M3_MOE_PLUGIN) -> None:
    """`fields`: name -> (PluginFieldType name, values). ValueError naming the first bad attribute:
    a type other than the signature's here, a missing or multi-valued one in `decode_attributes`."""
    for attr in sig.attributes:
        kind = fields[attr.name][0] if attr.name in fields else _FIELD_TYPE[attr.kind]
        if kind != _FIELD_TYPE[attr.kind]:
            raise ValueError(
                f"{sig.plugin_id}: attribute {attr.name!r} has type {kind}, the signature declares "
                f"{attr.kind} ({_FIELD_TYPE[attr.kind]})"
            )
    decode_attributes({name: data for name, (_, data) in fields.items()}, sig)


def _field_collection(trt: Any, sig: PluginSignature, values: dict[str, np.ndarray] | None) -> Any:
    """The signature's attributes as TensorRT plugin fields: `values` (one each), or empty (the
    creator's declaration)."""
    return trt.PluginFieldCollection(
        [
            trt.PluginField(
                a.name,
                np.asarray([] if values is None else values[a.name], dtype=_FIELD_NUMPY[a.kind]).reshape(-1),
                getattr(trt.PluginFieldType, _FIELD_TYPE[a.kind]),
            )
            for a in sig.attributes
        ]
    )


def _format_supported(
    trt: Any, sig: PluginSignature, pos: int, in_out: Sequence[Any], num_inputs: int
) -> bool:
    """The signature's dtype rules: LINEAR only; fp32 params fp32; every `T` param hidden's dtype,
    which is fp32, fp16 or bf16."""
    params = (*sig.inputs, *sig.outputs)
    desc = in_out[pos].desc
    if num_inputs != len(sig.inputs) or desc.format != trt.TensorFormat.LINEAR:
        return False
    if params[pos].dtype == "float32":
        return bool(desc.type == trt.DataType.FLOAT)
    if pos == 0:
        return desc.type in (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)
    return bool(desc.type == in_out[0].desc.type)


def _plugin_class(trt: Any, sig: PluginSignature) -> type:
    """The IPluginV3 (core / build / runtime in one object) of `sig`."""

    class M3MoEPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):  # type: ignore[misc,name-defined]
        def __init__(self, values: dict[str, np.ndarray], phase: Any = None) -> None:
            for base in (trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
                base.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = (
                sig.name,
                sig.namespace,
                sig.version,
            )
            self.num_outputs = len(sig.outputs)
            self.timing_cache_id = ""
            self.values, self.phase = values, phase

        def get_capability_interface(self, _type: Any) -> Any:
            return self

        def get_output_data_types(self, input_types: Sequence[Any]) -> list[Any]:
            return [input_types[0]]  # routed: hidden's dtype

        def get_output_shapes(self, inputs: Sequence[Any], _shape_inputs: Any, _builder: Any) -> list[Any]:
            return [trt.DimsExprs(inputs[0])]  # routed: hidden's shape [T, H]

        def supports_format_combination(self, pos: int, in_out: Sequence[Any], num_inputs: int) -> bool:
            return _format_supported(trt, sig, pos, in_out, num_inputs)

        def configure_plugin(self, _inp: Any, _out: Any) -> None:
            return None

        def on_shape_change(self, _inp: Any, _out: Any) -> None:
            return None

        def get_workspace_size(self, _inp: Any, _out: Any) -> int:
            return 0

        def get_valid_tactics(self) -> list[int]:
            return []

        def set_tactic(self, _tactic: int) -> None:
            return None

        def get_fields_to_serialize(self) -> Any:
            return _field_collection(trt, sig, self.values)

        def enqueue(
            self,
            input_desc: Sequence[Any],
            output_desc: Sequence[Any],
            inputs: Sequence[int],
            outputs: Sequence[int],
            _workspace: int,
            stream: int,
        ) -> None:
            _enqueue(trt, input_desc, output_desc, inputs, outputs, stream, self.values)

        def attach_to_context(self, _context: Any) -> Any:
            return self.clone()

        def clone(self) -> Any:
            return M3MoEPlugin(dict(self.values), self.phase)

    return M3MoEPlugin


def _creator_class(trt: Any, sig: PluginSignature, plugin_cls: type) -> type:
    """The IPluginCreatorV3One of `sig`: checks the fields TensorRT passes, makes `plugin_cls`."""

    class M3MoECreator(trt.IPluginCreatorV3One):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = sig.name, sig.namespace, sig.version
            self.field_names = _field_collection(trt, sig, None)

        def create_plugin(self, _name: str, fc: Any, phase: Any) -> Any:
            fields = {f.name: (f.type.name, np.array(f.data).reshape(-1)) for f in fc}
            check_fields(fields, sig)
            return plugin_cls({a.name: fields[a.name][1].copy() for a in sig.attributes}, phase)

    return M3MoECreator


@functools.cache
def plugin_classes(trt: Any, sig: PluginSignature = M3_MOE_PLUGIN) -> tuple[type, type]:
    """(plugin class, creator class) for the TensorRT(-RTX) bindings module `trt`."""
    plugin_cls = _plugin_class(trt, sig)
    return plugin_cls, _creator_class(trt, sig, plugin_cls)


def register_rtx_plugin(trt: Any, sig: PluginSignature = M3_MOE_PLUGIN) -> Any:
    """Register the creator with `trt`'s plugin registry (idempotent); returns the creator."""
    registry = trt.get_plugin_registry()
    existing = registry.get_creator(sig.name, sig.version, sig.namespace)
    if existing is not None:
        return existing
    _, creator_cls = plugin_classes(trt, sig)
    creator = creator_cls()
    if not registry.register_creator(creator, sig.namespace):
        raise RuntimeError(f"TensorRT refused to register the {sig.plugin_id} plugin creator")
    _CREATORS.append(creator)  # the registry keeps a raw pointer: keep the Python object alive
    return creator


_CREATORS: list[Any] = []


def _enqueue(
    trt: Any,
    input_desc: Sequence[Any],
    output_desc: Sequence[Any],
    inputs: Sequence[int],
    outputs: Sequence[int],
    stream: int,
    values: dict[str, np.ndarray],
) -> None:
    """Wrap the device buffers as torch CUDA tensors, run `m3::moe`, write the output (GPU only)."""
    import torch

    from m3export.ops.trt_plugin import cuda_view

    dtypes = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
    }
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        tensors = [
            cuda_view(ptr, tuple(d.dims), dtypes[d.type]) for ptr, d in zip(inputs, input_desc, strict=True)
        ]
        out = cuda_view(outputs[0], tuple(output_desc[0].dims), dtypes[output_desc[0].type])
        out.copy_(plugin_compute(tensors, values))


def rtx_plugin_record(sig: PluginSignature = M3_MOE_PLUGIN) -> dict[str, Any]:
    """The manifest entry of the plugin a TensorRT-RTX engine uses (same id and digest as the
    datacenter plugin's record: one signature; another provider)."""
    from m3export.ops.trt_plugin import plugin_record

    return {
        **plugin_record(sig),
        "provider": "m3export.ops.trt_rtx_plugin.register_rtx_plugin (IPluginV3 + IPluginCreatorV3One)",
    }


def register_rtx_from_manifest(
    trt: Any, records: Sequence[dict[str, Any]], source: str = "manifest"
) -> list[Any]:
    """Check an artifact's plugin records against this m3export's signatures (unknown ids and other
    digests are refused: rebuild), then register each creator with TensorRT-RTX; the creators."""
    from m3export.ops.trt_plugin import check_plugin_records

    return [register_rtx_plugin(trt, sig) for sig in check_plugin_records(records, source)]
