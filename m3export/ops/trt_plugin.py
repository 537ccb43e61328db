"""The M3 MoE TensorRT plugin as a TensorRT Python plugin (`tensorrt.plugin`, TensorRT >= 10.8).

Why a Python plugin and not an IPluginV3 C++ one: the computation must be *the same function* as the
eager `m3::moe` op, so the plugin calls that op on the plugin's device tensors (torch on CUDA).
A Python plugin needs no compiled code and no per-TensorRT-version build; its cost is a Python
callback per enqueue and an engine that only runs where Python + torch + this package are present
(no `trtexec`, no C++-only runtime). A C++ IPluginV3 (or an AOT Triton kernel via
`tensorrt.plugin.aot_impl`) becomes necessary for CUDA-graph capture, Python-free deployment or
grouped-GEMM kernels tuned for 128 experts; it would be checked against the same signature and the
same `plugin_compute` reference.

The `register`, `autotune` and `impl` functions are generated from `M3_MOE_PLUGIN` (signature.py),
the object the `trt` lowering also emits its node from. Attributes are declared as numpy arrays
(int32 / float32): the ONNX parser hands INT / FLOAT attributes over as 1-element int32 / float32
plugin fields, and `tensorrt.plugin` rebuilds array attributes with `.astype`, whereas scalar `int`
/ `float` annotations go through `int(array)`, which NumPy >= 1.25 deprecates for 1-d arrays.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from m3export.errors import ArtifactError
from m3export.ops.trt_signature import M3_MOE_PLUGIN, PluginSignature

_REGISTERED: set[str] = set()


def decode_attributes(fields: Mapping[str, Any], sig: PluginSignature = M3_MOE_PLUGIN) -> dict[str, Any]:
    """Plugin fields (1-element arrays, as TensorRT passes them, or ONNX attribute values) -> the op's
    Python constants, in the signature's order."""
    out: dict[str, Any] = {}
    for attr in sig.attributes:
        if attr.name not in fields:
            raise ValueError(f"{sig.plugin_id}: attribute {attr.name!r} missing; got {sorted(fields)}")
        arr = np.asarray(fields[attr.name]).reshape(-1)
        if arr.size != 1:
            raise ValueError(f"{sig.plugin_id}: attribute {attr.name!r} must hold one value, got {arr.size}")
        out[attr.name] = int(arr[0]) if attr.kind == "int" else float(arr[0])
    return out


def plugin_compute(tensors: Sequence[Any], fields: Mapping[str, Any]) -> Any:
    """The plugin's computation: `m3::moe` (its eager implementation) on the tensors' own device.

    `tensors` are torch tensors in the signature's input order; `fields` the plugin attributes.
    """
    import torch

    import m3export.ops.moe  # noqa: F401  (registers torch.ops.m3.moe)

    sig = M3_MOE_PLUGIN
    if len(tensors) != len(sig.inputs):
        raise ValueError(f"{sig.plugin_id}: expected {len(sig.inputs)} tensors {sig.input_names}")
    consts = decode_attributes(fields, sig)
    return torch.ops.m3.moe(*tensors, *(consts[n] for n in sig.attribute_names))


def _attr_annotation(kind: str) -> Any:
    import numpy.typing as npt

    return npt.NDArray[np.int32] if kind == "int" else npt.NDArray[np.float32]


def _with_signature(fn: Callable[..., Any], params: list[inspect.Parameter], ret: Any) -> Callable[..., Any]:
    """Give `fn(*args, **kwargs)` an explicit signature: `tensorrt.plugin` validates and binds by it."""
    fn.__signature__ = inspect.Signature(params, return_annotation=ret)  # type: ignore[attr-defined]
    return fn


def make_plugin_functions(
    tensor_desc: type, tensor: type, combination: Callable[[str], Any], sig: PluginSignature = M3_MOE_PLUGIN
) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """(register, autotune, impl) for `tensorrt.plugin`, built from `sig`.

    The classes are parameters (trtp.TensorDesc, trtp.Tensor, trtp.AutoTuneCombination) so the
    generated signatures can be checked without TensorRT.
    """
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    desc_params = [inspect.Parameter(p.name, kind, annotation=tensor_desc) for p in sig.inputs]
    attr_params = [
        inspect.Parameter(a.name, kind, annotation=_attr_annotation(a.kind)) for a in sig.attributes
    ]

    def register(*args: Any, **kwargs: Any) -> Any:
        bound = register.__signature__.bind(*args, **kwargs)  # type: ignore[attr-defined]
        return bound.arguments[sig.inputs[0].name].like()  # routed output: hidden's shape and dtype

    def autotune(*args: Any, **kwargs: Any) -> list[Any]:
        return [combination(sig.autotune_combination())]

    def impl(*args: Any, **kwargs: Any) -> None:
        bound = impl.__signature__.bind(*args, **kwargs)  # type: ignore[attr-defined]
        values = bound.arguments
        _run_on_device(
            [values[p.name] for p in sig.inputs],
            {a.name: values[a.name] for a in sig.attributes},
            values["outputs"][0],
            values["stream"],
        )

    return (
        _with_signature(register, desc_params + attr_params, tensor_desc),
        _with_signature(
            autotune,
            [
                *desc_params,
                inspect.Parameter("outputs", kind, annotation=types.GenericAlias(tuple, (tensor_desc,))),
            ],
            types.GenericAlias(list, (combination,))
            if isinstance(combination, type)
            else inspect.Signature.empty,
        ),
        _with_signature(
            impl,
            [inspect.Parameter(p.name, kind, annotation=tensor) for p in sig.inputs]
            + attr_params
            + [
                inspect.Parameter("outputs", kind, annotation=types.GenericAlias(tuple, (tensor,))),
                inspect.Parameter("stream", kind, annotation=int),
            ],
            None,
        ),
    )


def cuda_view(ptr: int, shape: tuple[int, ...], dtype: Any) -> Any:
    """Zero-copy torch view of a linear device buffer at `ptr` as `dtype`.

    Goes through the CUDA array interface with an integer type of the same width, because that
    interface has no bfloat16. Used by both plugins (this one and trt_rtx_plugin.py).
    """
    import torch

    width = torch.empty((), dtype=dtype).element_size()
    holder = type(
        "_Cai",
        (),
        {
            "__cuda_array_interface__": {
                "shape": tuple(int(d) for d in shape),
                "typestr": {2: "<i2", 4: "<i4", 8: "<i8"}[width],
                "data": (int(ptr), False),
                "version": 3,
            }
        },
    )()
    return torch.as_tensor(holder, device="cuda").view(dtype)


def _as_torch(t: Any, dtype: Any) -> Any:
    """Zero-copy torch view of a `tensorrt.plugin.Tensor` (linear layout) as `dtype`."""
    return cuda_view(int(t.data_ptr), tuple(int(d) for d in t.shape), dtype)


def _torch_dtype(trt_dtype: Any) -> Any:
    import tensorrt as trt
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
    if trt_dtype not in table:
        raise TypeError(f"{M3_MOE_PLUGIN.plugin_id}: unsupported tensor dtype {trt_dtype}")
    return table[trt_dtype]


def _run_on_device(inputs: list[Any], fields: dict[str, Any], output: Any, stream: int) -> None:
    """impl body: wrap TensorRT's device buffers as torch tensors, run the op, write the output."""
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        tensors = [_as_torch(t, _torch_dtype(t.dtype)) for t in inputs]
        out = _as_torch(output, _torch_dtype(output.dtype))
        out.copy_(plugin_compute(tensors, fields))


def register_plugin(sig: PluginSignature = M3_MOE_PLUGIN) -> str:
    """Register the plugin with TensorRT (idempotent); returns its id. Needs `tensorrt` >= 10.8."""
    if sig.plugin_id in _REGISTERED:
        return sig.plugin_id
    try:
        import tensorrt.plugin as trtp
    except ImportError as err:
        raise RuntimeError(
            f"cannot register {sig.plugin_id}: tensorrt.plugin is unavailable ({err}); "
            "install TensorRT >= 10.8 on a GPU machine: pip install 'm3export[trt]'"
        ) from None
    register, autotune, impl = make_plugin_functions(
        trtp.TensorDesc, trtp.Tensor, trtp.AutoTuneCombination, sig
    )
    trtp.register(sig.plugin_id)(register)
    trtp.autotune(sig.plugin_id)(autotune)
    trtp.impl(sig.plugin_id)(impl)
    _REGISTERED.add(sig.plugin_id)
    return sig.plugin_id


# Plugins an artifact may reference, by id. A manifest only selects among these: it never names
# a module to import.
KNOWN_PLUGINS: dict[str, PluginSignature] = {M3_MOE_PLUGIN.plugin_id: M3_MOE_PLUGIN}


def plugin_record(sig: PluginSignature = M3_MOE_PLUGIN) -> dict[str, Any]:
    """The manifest entry of a plugin an engine uses."""
    return {
        "id": sig.plugin_id,
        "version": sig.version,
        "onnx_op": f"{sig.domain}::{sig.name}",
        "provider": "m3export.ops.trt_plugin.register_plugin (tensorrt.plugin, JIT impl in torch)",
        "digest": sig.digest(),
        "signature": sig.to_json(),
    }


def check_plugin_records(
    records: Sequence[Mapping[str, Any]], source: str = "manifest"
) -> list[PluginSignature]:
    """The signatures `records` name; ArtifactError if one is unknown or its digest differs from ours."""
    sigs = []
    for rec in records:
        sig = KNOWN_PLUGINS.get(str(rec.get("id")))
        if sig is None:
            raise ArtifactError(
                f"{source}: unknown TensorRT plugin {rec.get('id')!r}; known: {sorted(KNOWN_PLUGINS)}"
            )
        if rec.get("digest") != sig.digest() or rec.get("version") != sig.version:
            raise ArtifactError(
                f"{source}: plugin {sig.plugin_id} was recorded with signature digest {rec.get('digest')} "
                f"(version {rec.get('version')}), this m3export has {sig.digest()} (version {sig.version}): "
                "rebuild the engines with this m3export"
            )
        sigs.append(sig)
    return sigs


def register_from_manifest(records: Sequence[Mapping[str, Any]], source: str = "manifest") -> list[str]:
    """Check the manifest's plugin records, then register each plugin with TensorRT."""
    return [register_plugin(sig) for sig in check_plugin_records(records, source)]
