"""TensorRT engine builds (lazy `tensorrt`): availability, optimisation profiles, one build.

Everything that touches TensorRT is inside functions. On a machine without TensorRT or without a
GPU, `tensorrt_unavailable()` says why and callers report the engine step as skipped; nothing here
creates a TensorRT runtime or builder unless both are present.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m3export.errors import SpecError

if TYPE_CHECKING:
    from m3export.spec.export import TrtSpec
    from m3export.spec.models import M3Spec
    from m3export.split.plan import SubgraphPlan

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)
PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def tensorrt_unavailable() -> str | None:
    """None when TensorRT (with `tensorrt.plugin`) and a CUDA GPU are usable, else the reason."""
    try:
        import tensorrt
    except ImportError as err:
        return f"tensorrt is not installed ({err}); on a GPU machine: pip install 'm3export[trt]'"
    try:
        import tensorrt.plugin
    except ImportError:
        return f"tensorrt {getattr(tensorrt, '__version__', '?')} has no tensorrt.plugin (needs >= 10.8)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (the plugin runs m3::moe with torch on CUDA)"
    return None


def resolve_precision(spec: M3Spec) -> str:
    """The engine precision: `export.trt.precision`, which must be export.precision.dtype's (strong typing)."""
    trt = spec.export.trt
    implied = PRECISION_OF_DTYPE[spec.graph_dtype]
    if trt is None or trt.precision is None:
        return implied
    if trt.precision != implied:
        raise SpecError(
            f"export.trt.precision {trt.precision!r} does not match export.precision.dtype "
            f"{spec.graph_dtype!r}: TensorRT networks are strongly typed, so an engine computes in the "
            f"exported graph's dtype; accepted value: {implied!r} (or omit it), or set "
            "export.precision.dtype to the engine's"
        )
    return implied


def dim_ranges(trt: TrtSpec, spec: M3Spec) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic dim a plan can use."""
    p = trt.profiles
    out = {
        name: (r.min, r.opt, r.max)
        for name, r in (("batch", p.batch), ("seq", p.seq), ("past_seq", p.past_seq))
    }
    out["image_tokens"] = (p.image_tokens.min, p.image_tokens.opt, p.image_tokens.max)
    out["video_tokens"] = (p.video_tokens.min, p.video_tokens.opt, p.video_tokens.max)
    if spec.vision is not None:
        m2 = spec.vision.spatial_merge_size**2
        lo, opt, hi = (max(a, b) for a, b in zip(out["image_tokens"], out["video_tokens"], strict=True))
        out["patches"] = (
            max(lo, 1) * m2,
            max(opt, 1) * m2,
            hi * m2,
        )  # the vision engine runs with >= 1 image
    return out


def profile_shapes(plan: SubgraphPlan, trt: TrtSpec, spec: M3Spec) -> ProfileShapes:
    """min/opt/max shape of every input of `plan` from the spec's ranges."""
    ranges = dim_ranges(trt, spec)
    shapes: ProfileShapes = {}
    for sig in plan.inputs:
        lo, opt, hi = [], [], []
        for d in sig.dims:
            if isinstance(d, int):
                r = (d, d, d)
            elif d in ranges:
                r = ranges[d]
            else:
                raise SpecError(
                    f"subgraph {plan.name} input {sig.name}: dim {d!r} has no range in export.trt.profiles; "
                    f"known: {sorted(ranges)}"
                )
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        shapes[sig.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


@dataclass(frozen=True)
class EngineArtifact:
    """A serialized engine and how it was built."""

    path: Path
    timing_cache: Path
    precision: str
    profile: dict[str, list[list[int]]]
    tensorrt_version: str
    build_seconds: float


class EngineBuildError(RuntimeError):
    """The ONNX parser or the builder refused the graph (a failed gate, with TensorRT's messages)."""


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    shapes: Mapping[str, tuple[Shape, Shape, Shape]],
    *,
    precision: str,
    timing_cache: Path,
    optimization_level: int = 3,
    workspace_gib: float | None = None,
    tf32: bool = False,
) -> EngineArtifact:
    """Parse `onnx_path` (strongly typed), build with one optimisation profile, write the engine and
    the updated timing cache. Needs TensorRT and a GPU (see `tensorrt_unavailable`)."""
    import tensorrt as trt

    from m3export.ops.trt_plugin import register_plugin

    start = time.perf_counter()
    register_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # TensorRT 10; always on in 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path.name}: the TensorRT ONNX parser failed: {errors}")
    mark_attention_decomposable(trt, network)  # the builder keeps a dedicated kernel where one exists
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):  # fp32 parity needs true fp32 GEMMs
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path.name}: TensorRT could not build an engine (see the log above)")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return EngineArtifact(
        path=engine_path,
        timing_cache=timing_cache,
        precision=precision,
        profile={k: [list(s) for s in v] for k, v in shapes.items()},
        tensorrt_version=str(trt.__version__),
        build_seconds=time.perf_counter() - start,
    )


def mark_attention_decomposable(trt: Any, network: Any) -> int:
    """Let the builder decompose every parsed `Attention` layer; returns how many there were.

    fp32 Attention has no dedicated kernel in TensorRT-RTX (measured) and onnx-tensorrt's importer,
    shared with datacenter TensorRT, reads the same `TRT_decomposable` flag with default 0. The flag
    is set on the network, never written into the ONNX file (onnx.checker and ONNX Runtime reject it).
    """
    boundary = getattr(trt.LayerType, "ATTENTION_OUTPUT", None)
    if boundary is None:  # a TensorRT without IAttention imports Attention another way
        return 0
    seen = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == boundary:
            layer.__class__ = trt.IAttentionOutputLayer
            layer.attention.decomposable = True
            seen += 1
    return seen


def engine_io(engine: Any) -> tuple[list[str], list[str]]:
    """(input names, output names) of a deserialized engine."""
    import tensorrt as trt

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    return inputs, [n for n in names if n not in inputs]
